//! HTTP handlers and DTOs of the payments service: paying an order (intent first, then the
//! provider), reading payments, refunds (admin, `Idempotency-Key`), the compensation the orders
//! service calls, and Stripe's webhook.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::DateTime;
use kit::Money;
use kit::Problem;
use kit::auth::{Admin, AuthUser, Caller, ServiceCaller};
use kit::client::{CallError, ServiceClient};
use kit::config::Secret;
use kit::db::now_ms;
use kit::extract::{self, Path};
use kit::idempotency::{self, Idempotency};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::flow::{self, Followed};
use crate::provider::{
    Card, ChargeOutcome, ChargeRequest, Instrument, PaymentProvider, ProviderError,
};
use crate::simulator::SUCCESS_CARD;
use crate::store::{Payment, PaymentStore, Refund, StoreError};
use crate::stripe::{self, PaymentIntent};

#[derive(Debug, Clone)]
pub struct ApiContext {
    /// SQLite, PostgreSQL or DynamoDB, chosen at start-up from the database URL.
    pub store: Arc<dyn PaymentStore>,
    pub orders: ServiceClient,
    pub idempotency: Idempotency,
    pub provider: Arc<dyn PaymentProvider>,
    /// Stripe's webhook signing secret; webhooks are refused without one.
    pub webhook_secret: Option<Secret>,
}

#[derive(Debug, Deserialize)]
pub struct CreatePayment {
    pub order_id: Uuid,
    /// Optional; when sent it must equal the order's total.
    #[serde(default)]
    pub amount: Option<Money>,
    #[serde(default)]
    pub currency: Option<String>,
    /// Free text as the seed's clients send it (`credit_card`, ...): stored, returned, and
    /// passed to the provider as metadata.
    #[serde(default)]
    pub payment_method: Option<String>,
    /// The simulator only: a test card number (see its table); the always-succeeding card
    /// when absent. Never stored: only its brand and last four are.
    #[serde(default)]
    pub card_number: Option<CardNumber>,
    /// A real provider's payment method (`pm_...` at Stripe); required with one.
    #[serde(default)]
    pub payment_method_token: Option<String>,
    /// Sent by the seed's clients: when present it must be the order's user.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// Sent by the seed's clients and ignored: the last four digits come from the card.
    #[serde(default)]
    pub card_last_four: Option<String>,
}

/// A card number in a request body: `Debug` never shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct CardNumber(String);

impl std::fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardNumber(..)")
    }
}

/// A page of an order's payments, in the seed's shape.
#[derive(Debug, Serialize)]
pub struct OrderPayments {
    pub payments: Vec<Payment>,
    pub count: usize,
}

#[derive(Debug, Deserialize, Default)]
pub struct RefundRequest {
    /// Everything not yet refunded when absent.
    #[serde(default)]
    pub amount: Option<Money>,
}

/// The orders service's request to give an order's money back.
#[derive(Debug, Deserialize)]
pub struct Compensation {
    /// Why (`order_cancelled`, ...): 1 to 64 characters, kept with the refund.
    pub reason: String,
}

/// The part of an order payments needs.
#[derive(Debug, Deserialize)]
struct OrderView {
    id: Uuid,
    user_id: Uuid,
    status: String,
    total_amount: Money,
    currency: String,
}

pub fn router(ctx: ApiContext) -> Router {
    let keyed = || middleware::from_fn_with_state(ctx.idempotency.clone(), idempotency::guard);
    Router::new()
        .route("/api/v1/payments", post(create_payment).layer(keyed()))
        .route("/api/v1/payments/{id}", get(get_payment))
        .route("/api/v1/payments/order/{order_id}", get(payments_of_order))
        .route(
            "/api/v1/payments/{id}/refund",
            post(refund_payment).layer(keyed()),
        )
        .route("/api/v1/payments/webhooks/stripe", post(stripe_webhook))
        .route("/internal/v1/payments/{id}/compensate", post(compensate))
        .with_state(ctx)
}

pub(crate) fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::AlreadyPaid => Problem::conflict(
            "already-paid",
            "this order already has a successful payment",
        ),
        StoreError::InProgress => Problem::conflict(
            "payment-in-progress",
            "a payment of this order is in progress; its outcome will be known shortly",
        ),
        StoreError::NotFound => Problem::not_found("the payment"),
        StoreError::NotRefundable => Problem::conflict(
            "not-refundable",
            "only a successful payment can be refunded",
        ),
        StoreError::Conflict => Problem::conflict(
            "refund-conflict",
            "another refund of this payment was recorded meanwhile; retry",
        ),
        StoreError::RefundTooLarge {
            requested,
            remaining,
        } => Problem::invalid(format!(
            "a refund of {requested} exceeds the {remaining} left to refund"
        ))
        .with("remaining", remaining.to_string()),
        // Corrupt rows, encoding and database failures (whichever backend): the client can do
        // nothing about them.
        _ => {
            tracing::error!(error = %e, "payments store failed");
            Problem::internal()
        }
    }
}

/// What pays: a card (the simulator) or a payment method token (a real provider).
enum Paying {
    Card(Card),
    Token(String),
}

fn paying_with(ctx: &ApiContext, body: &CreatePayment) -> Result<Paying, Problem> {
    if !ctx.provider.needs_token() {
        let number = body
            .card_number
            .as_ref()
            .map_or(SUCCESS_CARD, |n| n.0.as_str());
        return Card::parse(number)
            .map(Paying::Card)
            .map_err(|e| Problem::invalid(e.to_string()).with("field", "card_number"));
    }
    if body.card_number.is_some() {
        return Err(Problem::invalid(
            "card numbers are not accepted: send the payment_method_token your payment form got from the provider",
        )
        .with("field", "card_number"));
    }
    match body.payment_method_token.as_deref().map(str::trim) {
        Some(token)
            if !token.is_empty()
                && token.len() <= 255
                && token.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Paying::Token(token.to_owned()))
        }
        _ => Err(Problem::invalid(
            "payment_method_token (1 to 255 printable characters) is required",
        )
        .with("field", "payment_method_token")),
    }
}

async fn create_payment(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    extract::Json(body): extract::Json<CreatePayment>,
) -> Result<(StatusCode, Json<Payment>), Problem> {
    let paying = paying_with(&ctx, &body)?;
    let method = body.payment_method.as_deref().unwrap_or("card").trim();
    if method.is_empty() || method.len() > 50 {
        return Err(
            Problem::invalid("payment_method must be 1 to 50 characters")
                .with("field", "payment_method"),
        );
    }

    // Someone else's order is as unknown as one that does not exist.
    let Some(order) = visible_order(&ctx, &caller, body.order_id).await? else {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown-order",
            "Unknown order",
        )
        .with_detail(format!("order {} does not exist", body.order_id)));
    };
    if body.user_id.is_some_and(|named| named != order.user_id) {
        return Err(Problem::invalid("user_id is not the order's user").with("field", "user_id"));
    }
    if let Some(amount) = body.amount
        && amount != order.total_amount
    {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount-mismatch",
            "Amount does not match the order",
        )
        .with_detail(format!(
            "the order total is {}, not {amount}",
            order.total_amount
        ))
        .with("expected", order.total_amount.to_string()));
    }
    if let Some(currency) = &body.currency
        && !currency.eq_ignore_ascii_case(&order.currency)
    {
        return Err(
            Problem::invalid(format!("the order is in {}", order.currency))
                .with("field", "currency"),
        );
    }
    if order.status != "pending" {
        let payments = ctx.store.by_order(order.id).await.map_err(store_problem)?;
        if payments
            .iter()
            .any(|p| matches!(p.status.as_str(), "succeeded" | "partially_refunded"))
        {
            return Err(store_problem(StoreError::AlreadyPaid));
        }
        return Err(Problem::conflict(
            "order-not-payable",
            format!("the order is {}", order.status),
        ));
    }

    // The intent, before any money moves: one per order, so a concurrent attempt stops here.
    let now = DateTime::from_timestamp_millis(now_ms()).unwrap_or_default();
    let (card_brand, card_last4) = match &paying {
        Paying::Card(card) => (Some(card.brand().to_owned()), Some(card.last4().to_owned())),
        Paying::Token(_) => (None, None),
    };
    let payment = Payment {
        id: Uuid::now_v7(),
        order_id: order.id,
        amount: order.total_amount,
        currency: order.currency.clone(),
        status: "pending".into(),
        payment_method: method.to_owned(),
        card_brand,
        card_last4,
        provider_reference: None,
        failure_reason: None,
        refunded_amount: Money::ZERO,
        version: 0,
        created_at: now,
        updated_at: now,
    };
    ctx.store.begin(&payment).await.map_err(store_problem)?;

    let request = ChargeRequest {
        payment_id: payment.id,
        order_id: order.id,
        amount: payment.amount,
        currency: &payment.currency,
        instrument: match &paying {
            Paying::Card(card) => Instrument::Card(card),
            Paying::Token(token) => Instrument::Token(token),
        },
        method_label: method,
    };
    let outcome = match ctx.provider.charge(&request).await {
        Ok(outcome) => outcome,
        Err(e) => return Err(charge_failed(&ctx, &payment, e).await),
    };
    let Some(settlement) = flow::settlement(outcome) else {
        // Still processing at the provider: a webhook or the reconciler finishes it.
        metrics::counter!("payments_total", "outcome" => "processing").increment(1);
        return Ok((StatusCode::ACCEPTED, Json(payment)));
    };
    let (finished, followed) = flow::finish(&ctx, payment.id, &settlement)
        .await
        .map_err(store_problem)?;
    let payment = finished.payment;
    match followed {
        Followed::RefundedUnpayable(_) | Followed::UnpayableNotRefunded => {
            let detail = if matches!(followed, Followed::RefundedUnpayable(_)) {
                "the order was cancelled while it was being paid; the charge has been refunded"
            } else {
                "the order was cancelled while it was being paid; the charge will be refunded"
            };
            return Err(Problem::conflict("order-not-payable", detail)
                .with("payment_id", payment.id.to_string()));
        }
        Followed::Done => {}
    }
    match payment.status.as_str() {
        "failed" => {
            let reason = payment.failure_reason.clone().unwrap_or_default();
            Err(Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment-declined",
                "Payment declined",
            )
            .with_detail(format!("the card was declined: {reason}"))
            .with("payment_id", payment.id.to_string())
            .with("reason", reason))
        }
        "pending" => Ok((StatusCode::ACCEPTED, Json(payment))),
        _ => Ok((StatusCode::CREATED, Json(payment))),
    }
}

/// The provider did not answer with an outcome: withdraw the intent when nothing can have been
/// charged; otherwise keep it pending for the reconciler (or a webhook) to finish.
async fn charge_failed(ctx: &ApiContext, payment: &Payment, e: ProviderError) -> Problem {
    let withdraw = !matches!(e, ProviderError::Unknown(_));
    if withdraw && let Err(abandon) = ctx.store.abandon(payment.id).await {
        tracing::error!(payment_id = %payment.id, error = %abandon, "a payment intent could not be withdrawn; the reconciler will");
    }
    match e {
        ProviderError::Refused {
            by_client: true,
            code,
            message,
        } => {
            metrics::counter!("payments_total", "outcome" => "method_refused").increment(1);
            Problem::invalid(format!(
                "the payment provider refused the payment method: {message}"
            ))
            .with("field", "payment_method_token")
            .with("reason", code)
        }
        ProviderError::Refused { code, message, .. } => {
            tracing::error!(
                provider = ctx.provider.name(),
                code,
                message,
                "the payment provider refused our request; check the payments.stripe settings"
            );
            metrics::counter!("payments_total", "outcome" => "provider_refused").increment(1);
            Problem::unavailable("payment provider")
        }
        ProviderError::NotSent(reason) => {
            tracing::warn!(
                provider = ctx.provider.name(),
                reason,
                "payment provider unreachable; nothing charged"
            );
            metrics::counter!("payments_total", "outcome" => "provider_unreachable").increment(1);
            Problem::unavailable("payment provider")
        }
        ProviderError::Unknown(reason) => {
            tracing::warn!(payment_id = %payment.id, provider = ctx.provider.name(), reason, "charge outcome unknown; the payment stays pending until it is looked up");
            metrics::counter!("payments_total", "outcome" => "unknown").increment(1);
            Problem::unavailable("payment provider")
                .with_detail("the payment's outcome is not known yet; it stays pending and is looked up shortly")
                .with("payment_id", payment.id.to_string())
        }
    }
}

/// Whether `caller` may see what belongs to order `order_id`: administrators may; a customer
/// only for their own order (asked of the orders service, which owns that fact).
async fn may_see_order(ctx: &ApiContext, caller: &Caller, order_id: Uuid) -> Result<bool, Problem> {
    Ok(caller.is_admin() || visible_order(ctx, caller, order_id).await?.is_some())
}

/// The order `order_id` from the orders service, if it exists and `caller` may see it.
async fn visible_order(
    ctx: &ApiContext,
    caller: &Caller,
    order_id: Uuid,
) -> Result<Option<OrderView>, Problem> {
    match ctx
        .orders
        .get::<OrderView>(&format!("/internal/v1/orders/{order_id}"))
        .await
    {
        Ok(order) => Ok(caller.may_access(order.user_id).then_some(order)),
        Err(CallError::Rejected {
            status: StatusCode::NOT_FOUND,
            ..
        }) => Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, "orders unavailable");
            Err(Problem::unavailable("orders"))
        }
    }
}

async fn get_payment(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<Payment>, Problem> {
    let payment = ctx
        .store
        .get(id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::not_found("the payment"))?;
    if !may_see_order(&ctx, &caller, payment.order_id).await? {
        return Err(Problem::not_found("the payment"));
    }
    Ok(Json(payment))
}

async fn payments_of_order(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    Path(order_id): Path<Uuid>,
) -> Result<Json<OrderPayments>, Problem> {
    if !may_see_order(&ctx, &caller, order_id).await? {
        return Err(Problem::not_found("the order"));
    }
    let payments = ctx.store.by_order(order_id).await.map_err(store_problem)?;
    Ok(Json(OrderPayments {
        count: payments.len(),
        payments,
    }))
}

async fn refund_payment(
    State(ctx): State<ApiContext>,
    Admin(_): Admin,
    Path(id): Path<Uuid>,
    extract::OptionalJson(body): extract::OptionalJson<RefundRequest>,
) -> Result<(StatusCode, Json<Refund>), Problem> {
    let request = body.unwrap_or_default();
    let payment = ctx
        .store
        .get(id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::not_found("the payment"))?;
    let refund = flow::refund(&ctx, payment, request.amount, None).await?;
    if refund.payment.status == "refunded" {
        flow::move_order(&ctx, refund.payment.order_id, &["refunded"]).await;
    }
    Ok((StatusCode::CREATED, Json(refund)))
}

/// How often a compensation re-reads the payment when a refund lands meanwhile.
const COMPENSATION_ATTEMPTS: usize = 3;

/// The orders service gives an order's money back (it was cancelled after it was paid):
/// whatever is left of the payment is refunded. Idempotent: a refunded payment is answered as
/// it is.
async fn compensate(
    State(ctx): State<ApiContext>,
    ServiceCaller(caller): ServiceCaller,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<Compensation>,
) -> Result<Json<Payment>, Problem> {
    let reason = body.reason.trim();
    if reason.is_empty() || reason.chars().count() > 64 {
        return Err(Problem::invalid("reason must be 1 to 64 characters").with("field", "reason"));
    }
    for _ in 0..COMPENSATION_ATTEMPTS {
        let payment = ctx
            .store
            .get(id)
            .await
            .map_err(store_problem)?
            .ok_or_else(|| Problem::not_found("the payment"))?;
        match payment.status.as_str() {
            "refunded" => return Ok(Json(payment)),
            "succeeded" | "partially_refunded" => {}
            other => {
                return Err(Problem::conflict(
                    "not-refundable",
                    format!("the payment is {other}: nothing was taken to give back"),
                ));
            }
        }
        match flow::refund(&ctx, payment, None, Some(reason)).await {
            Ok(refund) => {
                tracing::info!(payment_id = %id, caller, reason, "payment compensated");
                metrics::counter!("payments_compensations_total").increment(1);
                return Ok(Json(refund.payment));
            }
            // Another refund landed meanwhile: what is left changed, look again.
            Err(problem) if problem.status == StatusCode::CONFLICT.as_u16() => continue,
            Err(problem) => return Err(problem),
        }
    }
    Err(store_problem(StoreError::Conflict))
}

/// Stripe's webhook: a signed event finishes the pending payment its intent names.
async fn stripe_webhook(
    State(ctx): State<ApiContext>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, Problem> {
    let refused = |detail: String| {
        metrics::counter!("payments_webhooks_total", "outcome" => "refused").increment(1);
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-signature",
            "Invalid signature",
        )
        .with_detail(detail)
    };
    // Unconfigured, no signature can be valid: the same refusal as a forged one.
    let Some(secret) = &ctx.webhook_secret else {
        return Err(refused(
            "no webhook secret is configured (payments.stripe.webhook_secret_file)".into(),
        ));
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let now = now_ms() / 1000;
    stripe::verify_signature(signature, &body, secret.expose(), now)
        .map_err(|e| refused(e.to_string()))?;
    let event: stripe::Event = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("not a Stripe event: {e}")))?;
    let ignored = |why: &str| {
        metrics::counter!("payments_webhooks_total", "outcome" => "ignored").increment(1);
        Ok(Json(serde_json::json!({"received": true, "ignored": why})))
    };
    if !matches!(
        event.kind.as_str(),
        "payment_intent.succeeded" | "payment_intent.payment_failed" | "payment_intent.canceled"
    ) {
        return ignored("event type not used");
    }
    let intent: PaymentIntent = serde_json::from_value(event.data.object)
        .map_err(|e| Problem::bad_request(format!("not a payment intent: {e}")))?;
    let Some(payment_id) = intent.payment_id() else {
        return ignored("not a Mercato payment");
    };
    let outcome = intent.outcome();
    let Some(settlement) = flow::settlement(outcome.clone()) else {
        return ignored("still processing");
    };
    match flow::finish(&ctx, payment_id, &settlement).await {
        Ok((finished, _)) => {
            if !finished.changed && !agrees(&finished.payment, &outcome) {
                tracing::error!(%payment_id, status = finished.payment.status, ?outcome,
                    "Stripe reports another outcome than the one recorded; look at this payment");
                metrics::counter!("payments_webhooks_total", "outcome" => "disagrees").increment(1);
            } else {
                metrics::counter!("payments_webhooks_total", "outcome" => "applied").increment(1);
            }
            Ok(Json(serde_json::json!({"received": true})))
        }
        Err(StoreError::NotFound) => {
            tracing::error!(%payment_id, intent = intent.id, "Stripe reports a payment this service does not have");
            ignored("unknown payment")
        }
        Err(e) => Err(store_problem(e)),
    }
}

/// Whether a recorded payment says what the provider says.
fn agrees(payment: &Payment, outcome: &ChargeOutcome) -> bool {
    match outcome {
        ChargeOutcome::Succeeded { .. } => {
            payment.status != "failed" && payment.status != "pending"
        }
        ChargeOutcome::Declined { .. } => payment.status == "failed",
        ChargeOutcome::Processing { .. } => true,
    }
}
