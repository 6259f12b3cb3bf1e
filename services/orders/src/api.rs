//! HTTP handlers and DTOs of the orders service, and the status changes they share with the saga.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use kit::Money;
use kit::Problem;
use kit::auth::{AuthUser, Caller, ServiceCaller};
use kit::client::CallError;
use kit::extract::{self, Path, Query};
use kit::idempotency::{self, Idempotency, IdempotencyKey};
use kit::page::{self, PageParams};
use serde::Deserialize;
use std::sync::Arc;

use uuid::Uuid;

use crate::clients::{Dependencies, ReservationStatus};
use crate::domain::{OrderError, OrderRequest, OrderStatus};
use crate::store::{Order, OrderStore, StoreError, Transition, new_order};

/// What every handler and the saga work with.
#[derive(Debug, Clone)]
pub struct ApiContext {
    /// SQLite or PostgreSQL, chosen at start-up from the database URL.
    pub store: Arc<dyn OrderStore>,
    pub deps: Dependencies,
    /// How long an order may stay unpaid before it is cancelled.
    pub order_ttl: chrono::Duration,
    pub idempotency: Idempotency,
    /// The platform's currency (`currency` setting): every order is in it.
    pub currency: Arc<str>,
    /// Bounds on one order's lines and total (`limits` settings).
    pub limits: kit::config::LimitsSettings,
}

/// Namespace of order ids derived from an Idempotency-Key (UUIDv5).
const IDEMPOTENT_ORDER_IDS: Uuid = Uuid::from_u128(0x6d65_7263_6174_6f00_0000_0000_0000_0001);

#[derive(Debug, Deserialize)]
pub struct CreateOrderItem {
    pub product_id: Uuid,
    pub quantity: i64,
    /// Accepted for compatibility with the seed's clients and ignored: prices come from the catalog.
    #[serde(default)]
    pub price: Option<Money>,
}

#[derive(Debug, Deserialize)]
pub struct CreateOrder {
    /// The signed-in customer when absent; a customer naming someone else is refused (403).
    #[serde(default)]
    pub user_id: Option<Uuid>,
    pub items: Vec<CreateOrderItem>,
    pub shipping_address: crate::domain::AddressInput,
}

#[derive(Debug, Deserialize)]
pub struct StatusChange {
    pub status: String,
}

pub fn router(ctx: ApiContext) -> Router {
    Router::new()
        .route(
            "/api/v1/orders",
            post(create_order).layer(middleware::from_fn_with_state(
                ctx.idempotency.clone(),
                idempotency::guard,
            )),
        )
        .route("/api/v1/orders/{id}", get(get_order))
        .route("/api/v1/orders/user/{user_id}", get(list_user_orders))
        .route("/api/v1/orders/{id}/status", put(set_status_by_operator))
        .route("/internal/v1/orders/{id}", get(get_order_internal))
        .route("/internal/v1/orders/{id}/status", post(set_status_internal))
        .with_state(ctx)
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::NotFound => Problem::not_found("the order"),
        StoreError::Duplicate => Problem::conflict("duplicate-order", "this order already exists"),
        StoreError::IllegalTransition { from, to } => Problem::conflict(
            "illegal-transition",
            format!("an order cannot go from {from} to {to}"),
        )
        .with("from", from.as_str())
        .with("to", to.as_str()),
        StoreError::Overflow => Problem::invalid("the order total is too large"),
        StoreError::BadCursor(bad) => bad.into(),
        // Corrupt rows, encoding and database failures (whichever backend): the client can do
        // nothing about them.
        _ => {
            tracing::error!(error = %e, "orders store failed");
            Problem::internal()
        }
    }
}

/// A dependency's answer as this service's answer: its 4xx problems pass through (they are
/// about the client's request), anything else is "unavailable".
fn dependency_problem(e: CallError) -> Problem {
    match e {
        CallError::Unavailable { service, reason } => {
            tracing::warn!(service, reason, "dependency unavailable");
            Problem::unavailable(service)
        }
        CallError::Rejected {
            problem: Some(problem),
            status,
            ..
        } if status != StatusCode::NOT_FOUND => *problem,
        CallError::Rejected {
            service, status, ..
        } => Problem::invalid(format!("{service} refused the request ({status})")),
    }
}

async fn create_order(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    key: Option<Extension<IdempotencyKey>>,
    extract::Json(body): extract::Json<CreateOrder>,
) -> Result<(StatusCode, Json<Order>), Problem> {
    let items: Vec<(Uuid, i64)> = body
        .items
        .iter()
        .map(|i| (i.product_id, i.quantity))
        .collect();
    let user_id = caller.acting_for(body.user_id, "user_id")?;
    let address = body
        .shipping_address
        .to_stored()
        .map_err(|e| Problem::invalid(e.to_string()).with("field", e.field()))?;
    let request = OrderRequest::parse(user_id, &items, &address)
        .map_err(|e: OrderError| Problem::invalid(e.to_string()).with("field", e.field()))?;

    // A signed-in user ordering for themselves is known by their verified token (Mercato's
    // own, or an external provider's whose users never register here); only an order placed
    // for someone else (an operator's, or any in open mode) needs the users service to vouch.
    let vouched_by_token = !caller.is_open() && caller.user_id() == Some(request.user_id);
    match if vouched_by_token {
        Ok(None)
    } else {
        ctx.deps.user(request.user_id).await.map(Some)
    } {
        Ok(_) => {}
        Err(CallError::Rejected {
            status: StatusCode::NOT_FOUND,
            ..
        }) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-user",
                "Unknown user",
            )
            .with_detail(format!("user {} does not exist", request.user_id))
            .with("user_id", request.user_id.to_string()));
        }
        Err(e) => return Err(dependency_problem(e)),
    }

    if let Some((_, quantity)) = request
        .lines
        .iter()
        .find(|(_, q)| *q > ctx.limits.max_line_quantity)
    {
        return Err(Problem::invalid(format!(
            "quantity must be at most {} per product, {quantity} requested",
            ctx.limits.max_line_quantity
        ))
        .with("field", "quantity")
        .with("limit", ctx.limits.max_line_quantity));
    }

    // With an Idempotency-Key the order id is derived from the request, so even a retry after
    // a crash (before the answer was stored) reserves nothing twice and finds the same order.
    let order_id = match &key {
        Some(Extension(k)) => Uuid::new_v5(
            &IDEMPOTENT_ORDER_IDS,
            format!("{}\n{}", k.key, k.fingerprint).as_bytes(),
        ),
        None => Uuid::now_v7(),
    };
    if key.is_some()
        && let Some(existing) = ctx.store.get(order_id).await.map_err(store_problem)?
    {
        // A retry of a request that created this order before its answer was stored.
        return Ok((StatusCode::CREATED, Json(existing)));
    }
    within_pending_quota(&ctx, request.user_id, &request.lines).await?;
    // No order has this id, so the reservation is renewed for this attempt: held again if a
    // failed attempt's clean-up released it, and safe from that clean-up if it comes late.
    let attempt = Uuid::now_v7();
    // Held a minute past the order's own expiry, so a late payment still finds its stock.
    let hold_secs =
        u32::try_from(ctx.order_ttl.num_seconds().saturating_add(60)).unwrap_or(u32::MAX);
    let reservation = match ctx
        .deps
        .reserve(order_id, &request.lines, hold_secs, attempt)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, CallError::Unavailable { .. }) {
                // The reservation may have been made before the call failed: give it back.
                release_in_background(ctx.deps.clone(), order_id, attempt);
            }
            return Err(dependency_problem(e));
        }
    };
    if reservation.status != ReservationStatus::Held {
        // Only if the order was lost after its stock was settled: nothing safe to build on.
        tracing::warn!(%order_id, status = ?reservation.status, "reservation not held for a new order");
        return Err(Problem::conflict(
            "reservation-settled",
            "the stock for this request was already settled; start over with a new Idempotency-Key",
        ));
    }
    let lines: Vec<(Uuid, i64, Money)> = reservation
        .items
        .iter()
        .map(|l| (l.product_id, l.quantity, l.unit_price))
        .collect();
    let order = match new_order(
        order_id,
        request.user_id,
        &lines,
        request.shipping_address,
        &ctx.currency,
        ctx.order_ttl,
    ) {
        Ok(order) if order.total_amount <= ctx.limits.max_order_total => order,
        refused => {
            release_now(&ctx.deps, order_id, attempt).await;
            return Err(match refused {
                Err(e) => store_problem(e),
                Ok(order) => total_too_large(order.total_amount, ctx.limits.max_order_total),
            });
        }
    };
    match ctx.store.insert(&order).await {
        Ok(()) => {}
        Err(StoreError::Duplicate) => {
            // A retry of a request that already created this order.
            let existing = ctx
                .store
                .get(order_id)
                .await
                .map_err(store_problem)?
                .ok_or_else(Problem::internal)?;
            return Ok((StatusCode::CREATED, Json(existing)));
        }
        Err(e) => {
            release_in_background(ctx.deps.clone(), order_id, attempt);
            return Err(store_problem(e));
        }
    }
    metrics::counter!("orders_created_total").increment(1);
    Ok((StatusCode::CREATED, Json(order)))
}

fn total_too_large(total: Money, limit: Money) -> Problem {
    let limit_json = serde_json::to_value(limit).unwrap_or_default();
    Problem::invalid(format!(
        "the order total {total} is more than the {limit} one order may come to"
    ))
    .with("field", "items")
    .with("limit", limit_json)
}

/// Gives back what `attempt` reserved before answering a refusal, so the client sees the
/// stock back at once; in the background if the products service does not answer.
async fn release_now(deps: &Dependencies, order_id: Uuid, attempt: Uuid) {
    if let Err(e) = deps.release_attempt(order_id, attempt).await {
        tracing::warn!(%order_id, error = %e, "releasing a refused order's stock failed; retrying in the background");
        release_in_background(deps.clone(), order_id, attempt);
    }
}

fn release_in_background(deps: Dependencies, order_id: Uuid, attempt: Uuid) {
    tokio::spawn(async move {
        if let Err(e) = deps.release_attempt(order_id, attempt).await {
            tracing::warn!(%order_id, error = %e, "could not release the reservation of a failed order");
        }
    });
}

/// An order the caller may see: their own, or any for an administrator; 404 otherwise.
async fn visible_order(ctx: &ApiContext, caller: &Caller, id: Uuid) -> Result<Order, Problem> {
    ctx.store
        .get(id)
        .await
        .map_err(store_problem)?
        .filter(|order| caller.may_access(order.user_id))
        .ok_or_else(|| Problem::not_found("the order"))
}

async fn get_order(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<Order>, Problem> {
    visible_order(&ctx, &caller, id).await.map(Json)
}

/// For the payments service, which checks the caller against the order's user itself.
async fn get_order_internal(
    State(ctx): State<ApiContext>,
    ServiceCaller(_): ServiceCaller,
    Path(id): Path<Uuid>,
) -> Result<Json<Order>, Problem> {
    ctx.store
        .get(id)
        .await
        .map_err(store_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the order"))
}

/// A page of a user's orders, in the seed's shape, with the next page's cursor (also in the
/// `Link` header; `null` on the last page).
#[derive(Debug, serde::Serialize)]
pub struct UserOrders {
    pub orders: Vec<Order>,
    pub count: usize,
    pub next: Option<String>,
}

async fn list_user_orders(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    Path(user_id): Path<Uuid>,
    uri: Uri,
    Query(params): Query<PageParams>,
) -> Result<(HeaderMap, Json<UserOrders>), Problem> {
    if !caller.may_access(user_id) {
        return Err(Problem::not_found("the user"));
    }
    let page = ctx
        .store
        .list_by_user(user_id, &params.checked()?)
        .await
        .map_err(store_problem)?;
    let headers = page::link_headers(&uri, &page);
    Ok((
        headers,
        Json(UserOrders {
            count: page.items.len(),
            next: page.next.map(|next| next.token()),
            orders: page.items,
        }),
    ))
}

fn parse_status(raw: &str) -> Result<OrderStatus, Problem> {
    raw.parse::<OrderStatus>().map_err(|()| {
        Problem::invalid(format!("unknown status `{raw}`"))
            .with("field", "status")
            .with(
                "allowed",
                OrderStatus::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>(),
            )
    })
}

/// Operators move orders along fulfilment (shipped, delivered) or cancel them; a customer may
/// only cancel their own order while it is pending. Payment states follow the payments
/// service only.
async fn set_status_by_operator(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<StatusChange>,
) -> Result<Json<Order>, Problem> {
    let to = parse_status(&body.status)?;
    if !caller.is_admin() {
        let order = visible_order(&ctx, &caller, id).await?;
        if to != OrderStatus::Cancelled {
            return Err(kit::auth::forbidden(
                "customers may only cancel their own orders",
            ));
        }
        if order.status != OrderStatus::Pending {
            return Err(Problem::conflict(
                "not-cancellable",
                format!(
                    "the order is {}; only a pending order can be cancelled",
                    order.status
                ),
            ));
        }
    }
    if !to.settable_by_operator() {
        return Err(Problem::conflict(
            "status-not-settable",
            format!("status `{to}` follows from payments and cannot be set directly"),
        ));
    }
    Ok(Json(apply_status(&ctx, id, to, None).await?.order))
}

async fn set_status_internal(
    State(ctx): State<ApiContext>,
    ServiceCaller(_): ServiceCaller,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<StatusChange>,
) -> Result<Json<Order>, Problem> {
    let to = parse_status(&body.status)?;
    Ok(Json(apply_status(&ctx, id, to, None).await?.order))
}

/// Moves an order to `to`, settling its stock first: the products service's reservation
/// (held → released or committed, each at most once) decides races between a payment and a
/// cancellation, so stock is never both sold and given back.
/// The oldest creation time an order still pending can have: its TTL ago, with a margin for
/// the expiry sweep (an order past it is being cancelled).
fn pending_since(ctx: &ApiContext) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - ctx.order_ttl - chrono::Duration::minutes(5)
}

/// Refuses an order that would take its user past the unpaid-order quota (orders or units):
/// held stock is stock nobody else can buy, so one account cannot lock the shelves. Two
/// concurrent orders may both pass the check: the quota can be passed by what is in flight.
async fn within_pending_quota(
    ctx: &ApiContext,
    user_id: Uuid,
    lines: &[(Uuid, i64)],
) -> Result<(), Problem> {
    let (max_orders, max_units) = (
        ctx.limits.max_pending_orders_per_user,
        ctx.limits.max_pending_units_per_user,
    );
    if max_orders <= 0 && max_units <= 0 {
        return Ok(());
    }
    let (orders, units) = ctx
        .store
        .pending_of_user(user_id, pending_since(ctx))
        .await
        .map_err(store_problem)?;
    let wanted: i64 = lines.iter().map(|(_, q)| *q).sum();
    let refused = if max_orders > 0 && orders >= max_orders {
        Some((
            "orders",
            max_orders,
            format!("{orders} unpaid orders already"),
        ))
    } else if max_units > 0 && units.saturating_add(wanted) > max_units {
        Some((
            "units",
            max_units,
            format!("{units} units held by unpaid orders, {wanted} more asked"),
        ))
    } else {
        None
    };
    let Some((quota, limit, held)) = refused else {
        return Ok(());
    };
    metrics::counter!("orders_refused_quota_total", "quota" => quota).increment(1);
    // No Retry-After: the quota frees when the customer pays or cancels, or an order expires.
    Err(Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "pending-quota",
        "Too many unpaid orders",
    )
    .with_detail(format!(
        "{held}: pay or cancel an order first (at most {limit} {quota} unpaid)"
    ))
    .with("quota", quota)
    .with("limit", limit))
}

pub async fn apply_status(
    ctx: &ApiContext,
    id: Uuid,
    to: OrderStatus,
    event_id: Option<Uuid>,
) -> Result<Transition, Problem> {
    let current = ctx
        .store
        .get(id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::not_found("the order"))?;
    if current.status != to && !current.status.can_become(to) {
        return Err(store_problem(StoreError::IllegalTransition {
            from: current.status,
            to,
        }));
    }
    if current.status != to {
        if to.releases_stock() {
            ctx.deps.release(id).await.map_err(dependency_problem)?;
        } else if to == OrderStatus::Paid {
            ctx.deps.commit(id).await.map_err(|e| match e {
                // Released (409), or released and pruned since (404): the stock is not held.
                CallError::Rejected { status, .. }
                    if status == StatusCode::CONFLICT || status == StatusCode::NOT_FOUND =>
                {
                    Problem::conflict(
                        "reservation-state",
                        "the order's stock is no longer held for it",
                    )
                }
                e => dependency_problem(e),
            })?;
        }
    }
    let moved = ctx
        .store
        .transition(id, to, event_id)
        .await
        .map_err(store_problem)?;
    if moved.changed {
        count_money(&moved.order, to);
    }
    Ok(moved)
}

/// Revenue as counters of the currency's minor units (exact, unlike a float sum): taken when
/// an order becomes paid, given back when it is refunded. Counted by the one call that moved
/// the order, so a redelivered event or a retried request never counts twice.
fn count_money(order: &Order, to: OrderStatus) {
    let cents = u64::try_from(order.total_amount.cents()).unwrap_or(0);
    let counter = match to {
        OrderStatus::Paid => "revenue_minor_units_total",
        OrderStatus::Refunded => "refunded_minor_units_total",
        _ => return,
    };
    metrics::counter!(counter, "currency" => order.currency.clone()).increment(cents);
}
