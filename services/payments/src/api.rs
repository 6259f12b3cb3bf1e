//! HTTP handlers and DTOs of the payments service.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::DateTime;
use http::Method;
use kit::Money;
use kit::Problem;
use kit::auth::{Admin, AuthUser, Caller};
use kit::client::{CallError, ServiceClient};
use kit::db::now_ms;
use kit::extract::{self, Path};
use kit::idempotency::{self, Idempotency};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::provider::{self, Card, Charge};
use crate::store::{Payment, PaymentStore, Refund, StoreError};

#[derive(Debug, Clone)]
pub struct ApiContext {
    /// SQLite or PostgreSQL, chosen at start-up from the database URL.
    pub store: Arc<dyn PaymentStore>,
    pub orders: ServiceClient,
    pub idempotency: Idempotency,
}

#[derive(Debug, Deserialize)]
pub struct CreatePayment {
    pub order_id: Uuid,
    /// Optional; when sent it must equal the order's total.
    #[serde(default)]
    pub amount: Option<Money>,
    #[serde(default)]
    pub currency: Option<String>,
    /// Free text as the seed's clients send it (`credit_card`, ...).
    #[serde(default)]
    pub payment_method: Option<String>,
    /// A test card number (see the provider table); the always-succeeding card when absent.
    #[serde(default)]
    pub card_number: Option<String>,
    /// Sent by the seed's clients: when present it must be the order's user.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// Sent by the seed's clients and ignored: the last four digits come from the card.
    #[serde(default)]
    pub card_last_four: Option<String>,
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

/// The part of an order payments needs.
#[derive(Debug, Deserialize)]
struct OrderView {
    id: Uuid,
    user_id: Uuid,
    status: String,
    total_amount: Money,
    currency: String,
}

#[derive(Debug, Serialize)]
struct StatusChange<'a> {
    status: &'a str,
}

pub fn router(ctx: ApiContext) -> Router {
    Router::new()
        .route(
            "/api/v1/payments",
            post(create_payment).layer(middleware::from_fn_with_state(
                ctx.idempotency.clone(),
                idempotency::guard,
            )),
        )
        .route("/api/v1/payments/{id}", get(get_payment))
        .route("/api/v1/payments/order/{order_id}", get(payments_of_order))
        .route("/api/v1/payments/{id}/refund", post(refund_payment))
        .with_state(ctx)
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::AlreadyPaid => Problem::conflict(
            "already-paid",
            "this order already has a successful payment",
        ),
        StoreError::NotFound => Problem::not_found("the payment"),
        StoreError::NotRefundable => Problem::conflict(
            "not-refundable",
            "only a successful payment can be refunded",
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

async fn create_payment(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    extract::Json(body): extract::Json<CreatePayment>,
) -> Result<(StatusCode, Json<Payment>), Problem> {
    let card = Card::parse(
        body.card_number
            .as_deref()
            .unwrap_or(provider::SUCCESS_CARD),
    )
    .map_err(|e| Problem::invalid(e.to_string()).with("field", "card_number"))?;
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
    if ctx
        .store
        .has_success(order.id)
        .await
        .map_err(store_problem)?
    {
        return Err(store_problem(StoreError::AlreadyPaid));
    }
    if order.status != "pending" {
        return Err(Problem::conflict(
            "order-not-payable",
            format!("the order is {}", order.status),
        ));
    }

    let now = DateTime::from_timestamp_millis(now_ms()).unwrap_or_default();
    let mut payment = Payment {
        id: Uuid::now_v7(),
        order_id: order.id,
        amount: order.total_amount,
        currency: order.currency.clone(),
        status: String::new(),
        payment_method: method.to_owned(),
        card_last4: Some(card.last4().to_owned()),
        provider_reference: None,
        failure_reason: None,
        refunded_amount: Money::ZERO,
        created_at: now,
        updated_at: now,
    };
    match provider::charge(&card, order.total_amount) {
        Charge::Succeeded { reference } => {
            payment.status = "succeeded".into();
            payment.provider_reference = Some(reference);
            ctx.store.record(&payment).await.map_err(store_problem)?;
            metrics::counter!("payments_total", "outcome" => "succeeded").increment(1);
            if let Err(CallError::Rejected {
                status: StatusCode::CONFLICT,
                ..
            }) = move_order(&ctx, order.id, &["paid"]).await
            {
                // The order stopped being payable while the card was charged (it expired or
                // was cancelled): give the money back rather than keep it for nothing.
                let refund = ctx
                    .store
                    .refund(payment.id, None)
                    .await
                    .map_err(store_problem)?;
                metrics::counter!("payments_total", "outcome" => "refunded_unpayable").increment(1);
                return Err(Problem::conflict(
                    "order-not-payable",
                    "the order was cancelled while it was being paid; the charge has been refunded",
                )
                .with("payment_id", refund.payment.id.to_string()));
            }
            Ok((StatusCode::CREATED, Json(payment)))
        }
        Charge::Declined { reason } => {
            payment.status = "failed".into();
            payment.failure_reason = Some(reason.to_owned());
            ctx.store.record(&payment).await.map_err(store_problem)?;
            metrics::counter!("payments_total", "outcome" => "declined").increment(1);
            let _ = move_order(&ctx, order.id, &["payment_failed", "cancelled"]).await;
            Err(Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment-declined",
                "Payment declined",
            )
            .with_detail(format!("the card was declined: {reason}"))
            .with("payment_id", payment.id.to_string())
            .with("reason", reason))
        }
        Charge::Unreachable => {
            metrics::counter!("payments_total", "outcome" => "provider_unreachable").increment(1);
            Err(Problem::unavailable("payment provider"))
        }
    }
}

/// The fast path of the saga: move the order now. If this fails the order still follows,
/// from the `payment.*` event the orders service consumes.
async fn move_order(ctx: &ApiContext, order_id: Uuid, statuses: &[&str]) -> Result<(), CallError> {
    for status in statuses {
        if let Err(e) = ctx
            .orders
            .send(
                Method::POST,
                &format!("/internal/v1/orders/{order_id}/status"),
                Some(&StatusChange { status }),
            )
            .await
        {
            tracing::warn!(%order_id, status, error = %e, "order not moved now; the payment event will move it");
            return Err(e);
        }
    }
    Ok(())
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
    let refund = ctx
        .store
        .refund(id, request.amount)
        .await
        .map_err(store_problem)?;
    if refund.payment.status == "refunded" {
        let _ = move_order(&ctx, refund.payment.order_id, &["refunded"]).await;
    }
    Ok((StatusCode::CREATED, Json(refund)))
}
