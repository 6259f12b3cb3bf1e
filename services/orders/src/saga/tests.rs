//! The payment listener's decisions, driven through the real handler and a SQLite store, with
//! a fake products and payments service on a local port that records what it was asked.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use bus::Event;
use bus::event::{PaymentEvent, types};
use kit::Money;
use kit::client::ServiceClient;
use kit::idempotency::Idempotency;
use uuid::Uuid;

use crate::ApiContext;
use crate::clients::Dependencies;
use crate::domain::OrderStatus;
use crate::store::{CURRENCY, SqliteOrderStore, new_order};

/// What the fake payments service was asked, and whether it is up.
#[derive(Default)]
pub(crate) struct Payments {
    pub(crate) compensated: Mutex<Vec<(Uuid, serde_json::Value)>>,
    pub(crate) down: std::sync::atomic::AtomicBool,
}

async fn compensate(
    State(payments): State<Arc<Payments>>,
    Path(id): Path<Uuid>,
    Json(body): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>, StatusCode> {
    if payments.down.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    payments.compensated.lock().unwrap().push((id, body));
    Ok(Json(serde_json::json!({ "id": id, "status": "refunded" })))
}

/// Where the fake products service keeps an order's reservation: held until committed
/// (paid) or released (cancelled), and never both, as the real one refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stock {
    Held,
    Committed,
    Released,
    /// Released, then pruned after its retention: products answers 404.
    Pruned,
}

/// The fake products service: each order's reservation (held when never touched), and the
/// orders whose reservation it cannot move (it answers 503, as a products service in trouble).
#[derive(Default)]
pub(crate) struct Products {
    pub(crate) reservations: Mutex<std::collections::HashMap<Uuid, Stock>>,
    pub(crate) failing: Mutex<std::collections::HashSet<Uuid>>,
}

impl Products {
    pub(crate) fn state(&self, order: Uuid) -> Stock {
        self.reservations
            .lock()
            .unwrap()
            .get(&order)
            .copied()
            .unwrap_or(Stock::Held)
    }

    /// Moves the reservation to `to` as products does: repeating a move is fine, leaving
    /// committed or released is a 409.
    fn settle(&self, order: Uuid, to: Stock) -> StatusCode {
        if self.failing.lock().unwrap().contains(&order) {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let mut all = self.reservations.lock().unwrap();
        let now = all.entry(order).or_insert(Stock::Held);
        if *now == Stock::Pruned {
            StatusCode::NOT_FOUND
        } else if *now == Stock::Held || *now == to {
            *now = to;
            StatusCode::NO_CONTENT
        } else {
            StatusCode::CONFLICT
        }
    }
}

/// Serves the products routes the saga calls (commit and release, with products' rules) and
/// payments' compensation route; returns its base URL.
pub(crate) async fn fake_dependencies(products: Arc<Products>, payments: Arc<Payments>) -> String {
    let stock = axum::Router::new()
        .route(
            "/internal/v1/reservations/{id}/commit",
            post(
                |State(p): State<Arc<Products>>, Path(id): Path<Uuid>| async move {
                    p.settle(id, Stock::Committed)
                },
            ),
        )
        .route(
            "/internal/v1/reservations/{id}",
            delete(
                |State(p): State<Arc<Products>>, Path(id): Path<Uuid>| async move {
                    p.settle(id, Stock::Released)
                },
            ),
        )
        .with_state(products);
    let app = axum::Router::new()
        .route("/internal/v1/payments/{id}/compensate", post(compensate))
        .with_state(payments)
        .merge(stock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    db: kit::db::Db,
    pub(crate) ctx: ApiContext,
    pub(crate) payments: Arc<Payments>,
    pub(crate) products: Arc<Products>,
    pub(crate) saga: super::Saga,
}

impl Harness {
    pub(crate) async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/orders.db", dir.path().display());
        let store = SqliteOrderStore::open(&url, &kit::config::SqliteSettings::default())
            .await
            .unwrap();
        let db = store.db().clone();
        let payments = Arc::new(Payments::default());
        let products = Arc::new(Products::default());
        let base = fake_dependencies(products.clone(), payments.clone()).await;
        let http = kit::client::http_client(&kit::config::HttpSettings::default()).unwrap();
        let ctx = ApiContext {
            idempotency: Idempotency::new(
                store.db().clone(),
                std::time::Duration::from_secs(60),
                1 << 20,
            ),
            store: Arc::new(store),
            deps: Dependencies {
                users: ServiceClient::new("users", &base, http.clone()),
                products: ServiceClient::new("products", &base, http.clone()),
            },
            order_ttl: chrono::Duration::minutes(15),
            currency: Arc::from(CURRENCY),
            limits: kit::config::LimitsSettings::default(),
        };
        let saga = super::Saga {
            ctx: ctx.clone(),
            payments: crate::compensation::PaymentsClient::new(ServiceClient::new(
                "payments", &base, http,
            )),
            retry: crate::saga::Retry::default(),
        };
        Harness {
            _dir: dir,
            db,
            ctx,
            payments,
            products,
            saga,
        }
    }

    /// A pending order of `cents`.
    pub(crate) async fn order(&self, cents: i64) -> Uuid {
        let order = new_order(
            Uuid::now_v7(),
            Uuid::now_v7(),
            &[(Uuid::now_v7(), 1, Money::from_cents(cents).unwrap())],
            "1 Main St".into(),
            CURRENCY,
            chrono::Duration::minutes(15),
        )
        .unwrap();
        self.ctx.store.insert(&order).await.unwrap();
        order.id
    }

    pub(crate) async fn status(&self, order: Uuid) -> OrderStatus {
        self.ctx.store.get(order).await.unwrap().unwrap().status
    }

    /// Hands `event` to the listener: `Err` means it stays uncommitted and comes again.
    pub(crate) async fn deliver(&self, event: &Event) -> Result<(), String> {
        let record = event.to_record();
        super::handle_payment_event(&self.saga, &record.headers, &record.payload).await
    }

    /// The event types the order's customer is told about (its `order-events` queue rows).
    pub(crate) async fn queued(&self, order: Uuid) -> Vec<String> {
        let key = order.to_string();
        self.db
            .read(move |c| {
                let mut stmt = c.prepare(
                    "SELECT payload FROM outbox WHERE key = ?1 AND destination LIKE 'queue:%' ORDER BY seq",
                )?;
                let rows = stmt
                    .query_map([key], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, kit::db::DbError>(rows)
            })
            .await
            .unwrap()
            .iter()
            .map(|p| {
                let v: serde_json::Value = serde_json::from_str(p).unwrap();
                v["event_type"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    pub(crate) fn compensations(&self) -> Vec<(Uuid, serde_json::Value)> {
        self.payments.compensated.lock().unwrap().clone()
    }
}

/// A `payment.*` event as the payments service writes it.
pub(crate) fn payment_event(
    event_type: &str,
    order: Uuid,
    payment: Uuid,
    status: &str,
    cents: i64,
    sequence: u64,
) -> Event {
    let id = Uuid::now_v7();
    Event::new(
        id,
        event_type,
        "mercato/payments",
        order.to_string(),
        &PaymentEvent {
            event_id: id,
            event_type: event_type.to_owned(),
            payment_id: payment,
            order_id: order,
            amount: Money::from_cents(cents).unwrap(),
            currency: CURRENCY.to_owned(),
            status: status.to_owned(),
            occurred_at: chrono::Utc::now(),
            sequence,
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_success_for_a_cancelled_order_is_compensated() {
    let h = Harness::new().await;
    let order = h.order(10_000).await;
    h.ctx
        .store
        .transition(order, OrderStatus::Cancelled, None)
        .await
        .unwrap();
    let payment = Uuid::now_v7();
    let succeeded = payment_event(
        types::PAYMENT_SUCCEEDED,
        order,
        payment,
        "succeeded",
        10_000,
        1,
    );
    h.deliver(&succeeded).await.unwrap();
    assert_eq!(
        h.compensations(),
        vec![(payment, serde_json::json!({ "reason": "order_cancelled" }))],
        "the customer's money is given back"
    );
    assert_eq!(h.status(order).await, OrderStatus::Cancelled);
    let told = [
        types::ORDER_CREATED,
        types::ORDER_CANCELLED,
        types::ORDER_PAYMENT_REFUNDED,
    ];
    assert_eq!(h.queued(order).await, told, "and told so");

    // A redelivery asks payments again (idempotent there) but tells the customer once.
    h.deliver(&succeeded).await.unwrap();
    assert_eq!(h.compensations().len(), 2);
    assert_eq!(h.queued(order).await, told);
}

#[tokio::test]
async fn a_success_for_a_pending_order_whose_stock_was_released_cancels_and_refunds() {
    // Its hold ran out before the order expired (the orders sweeper lagging), and products
    // released the stock, and may have pruned the reservation since: the order cannot be
    // filled, so it is cancelled and the money given back, not kept with the order pending.
    for gone in [Stock::Released, Stock::Pruned] {
        let h = Harness::new().await;
        let order = h.order(10_000).await;
        h.products.reservations.lock().unwrap().insert(order, gone);
        let payment = Uuid::now_v7();
        let succeeded = payment_event(
            types::PAYMENT_SUCCEEDED,
            order,
            payment,
            "succeeded",
            10_000,
            1,
        );
        h.deliver(&succeeded).await.unwrap();
        assert_eq!(h.status(order).await, OrderStatus::Cancelled, "{gone:?}");
        assert_eq!(h.compensations().len(), 1, "{gone:?}: refunded");
        assert_eq!(
            h.queued(order).await,
            [
                types::ORDER_CREATED,
                types::ORDER_CANCELLED,
                types::ORDER_PAYMENT_REFUNDED,
            ],
            "{gone:?}"
        );
        assert_eq!(h.products.state(order), gone, "nothing sold");
    }
}

#[tokio::test]
async fn a_partial_refund_for_an_expired_order_compensates_the_rest() {
    let h = Harness::new().await;
    let order = h.order(10_000).await;
    h.ctx
        .store
        .transition(order, OrderStatus::Cancelled, None)
        .await
        .unwrap();
    let payment = Uuid::now_v7();
    let partial = payment_event(
        types::PAYMENT_REFUNDED,
        order,
        payment,
        "partially_refunded",
        2_500,
        2,
    );
    h.deliver(&partial).await.unwrap();
    assert_eq!(h.compensations().len(), 1, "the rest is refunded");
    assert_eq!(h.compensations()[0].0, payment);
}

#[tokio::test]
async fn a_compensation_payments_cannot_take_now_is_retried() {
    let h = Harness::new().await;
    let order = h.order(10_000).await;
    h.ctx
        .store
        .transition(order, OrderStatus::Cancelled, None)
        .await
        .unwrap();
    let payment = Uuid::now_v7();
    let succeeded = payment_event(
        types::PAYMENT_SUCCEEDED,
        order,
        payment,
        "succeeded",
        10_000,
        1,
    );
    h.payments
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        h.deliver(&succeeded).await.is_err(),
        "payments down: the event stays uncommitted"
    );
    h.payments
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    h.deliver(&succeeded).await.unwrap();
    assert_eq!(h.compensations().len(), 1);
}

#[tokio::test]
async fn a_refund_before_its_success_leaves_the_order_refunded() {
    let h = Harness::new().await;
    let order = h.order(10_000).await;
    let payment = Uuid::now_v7();
    let succeeded = payment_event(
        types::PAYMENT_SUCCEEDED,
        order,
        payment,
        "succeeded",
        10_000,
        1,
    );
    let refunded = payment_event(
        types::PAYMENT_REFUNDED,
        order,
        payment,
        "refunded",
        10_000,
        2,
    );
    h.deliver(&refunded).await.unwrap();
    h.deliver(&succeeded).await.unwrap();
    assert_eq!(h.status(order).await, OrderStatus::Refunded);
    // Duplicates and the stale success again: nothing moves, nobody is asked to refund.
    h.deliver(&refunded).await.unwrap();
    h.deliver(&succeeded).await.unwrap();
    assert_eq!(h.status(order).await, OrderStatus::Refunded);
    assert_eq!(h.compensations(), vec![]);
}

#[tokio::test]
async fn a_partial_refund_before_its_success_pays_the_order() {
    let h = Harness::new().await;
    let order = h.order(10_000).await;
    let payment = Uuid::now_v7();
    let partial = payment_event(
        types::PAYMENT_REFUNDED,
        order,
        payment,
        "partially_refunded",
        1_000,
        2,
    );
    h.deliver(&partial).await.unwrap();
    assert_eq!(h.status(order).await, OrderStatus::Paid);
    assert_eq!(h.compensations(), vec![]);
}

#[tokio::test]
async fn a_stale_success_after_the_full_refund_asks_nothing_of_payments() {
    // The order expired; payments refunded the charge itself (its synchronous path) and that
    // refund's event came first. The success, older, must not ask for a second refund.
    let h = Harness::new().await;
    let order = h.order(10_000).await;
    h.ctx
        .store
        .transition(order, OrderStatus::Cancelled, None)
        .await
        .unwrap();
    let payment = Uuid::now_v7();
    h.deliver(&payment_event(
        types::PAYMENT_REFUNDED,
        order,
        payment,
        "refunded",
        10_000,
        2,
    ))
    .await
    .unwrap();
    h.deliver(&payment_event(
        types::PAYMENT_SUCCEEDED,
        order,
        payment,
        "succeeded",
        10_000,
        1,
    ))
    .await
    .unwrap();
    assert_eq!(h.compensations(), vec![]);
    assert_eq!(h.status(order).await, OrderStatus::Cancelled);
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_later_payments_still_flow() {
    let mut h = Harness::new().await;
    h.saga.retry = super::Retry {
        attempts: 3,
        first_pause: std::time::Duration::from_millis(10),
    };
    let dir = tempfile::tempdir().unwrap();
    let bus = bus::embedded::EmbeddedBus::open(
        &format!("sqlite://{}/bus.db", dir.path().display()),
        &kit::config::SqliteSettings::default(),
        bus::embedded::EmbeddedOptions::default(),
    )
    .await
    .unwrap();
    let (poisoned, healthy) = (h.order(10_000).await, h.order(5_000).await);
    // Products cannot settle the first order's stock, whatever happens: its payment can never
    // apply, and it comes first on the one partition.
    h.products.failing.lock().unwrap().insert(poisoned);
    let events = [
        payment_event(
            types::PAYMENT_SUCCEEDED,
            poisoned,
            Uuid::now_v7(),
            "succeeded",
            10_000,
            1,
        ),
        payment_event(
            types::PAYMENT_SUCCEEDED,
            healthy,
            Uuid::now_v7(),
            "succeeded",
            5_000,
            1,
        ),
    ];
    let records: Vec<_> = events.iter().map(Event::to_record).collect();
    bus::Stream::publish(&bus, bus::names::PAYMENTS_TOPIC, &records)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let listener = tokio::spawn(super::run_payment_listener(
        h.saga.clone(),
        Arc::new(bus.clone()),
        shutdown.clone(),
    ));
    let started = std::time::Instant::now();
    while h.status(healthy).await != OrderStatus::Paid {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the payment behind a poison event never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let letters = h.ctx.store.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].key, poisoned.to_string());
    assert_eq!(letters[0].attempts, 3);
    assert!(!letters[0].reason.is_empty());
    assert!(letters[0].payload.contains(&poisoned.to_string()));
    assert_eq!(h.status(poisoned).await, OrderStatus::Pending);
    shutdown.cancel();
    listener.await.unwrap();
}
