//! Payment events that reach the orders service late or out of order, through the whole
//! platform (issue 13, finding 2): the events are appended to the embedded `payments` stream
//! the way the payments service's outbox relay would, out of order, and the order must end as
//! the payment ended. (Money for an order cancelled before its payment's success arrived is
//! covered with a recording payments service in the orders crate's saga tests; through the
//! platform it needs payments' compensation route.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bus::event::{PaymentEvent, types};
use bus::names::PAYMENTS_TOPIC;
use bus::{Event, Stream as _};
use common::{eventually, spawn_app};
use kit::Money;
use uuid::Uuid;

fn payment_event(
    event_type: &str,
    order: Uuid,
    payment: Uuid,
    status: &str,
    amount: Money,
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
            amount,
            currency: "INR".to_owned(),
            status: status.to_owned(),
            occurred_at: chrono::Utc::now(),
            sequence,
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_refund_that_overtakes_its_success_leaves_the_order_refunded() {
    let app = spawn_app().await;
    let user = app.create_user("late-events@test.example").await;
    let product = app.create_product("LATE-1", "250.00", 5).await;
    let order = app.place_order(&user, &[(&product, 2)]).await;
    let order_id: Uuid = order.parse().unwrap();
    let total: Money = serde_json::from_value(
        app.get(&format!("/api/v1/orders/{order}")).await.body["total_amount"].clone(),
    )
    .unwrap();

    let stream = bus::embedded::EmbeddedBus::open(
        &format!("sqlite://{}/bus.db", app.dir.path().display()),
        &kit::config::SqliteSettings::default(),
        bus::embedded::EmbeddedOptions::default(),
    )
    .await
    .unwrap();
    let payment = Uuid::now_v7();
    let succeeded = payment_event(
        types::PAYMENT_SUCCEEDED,
        order_id,
        payment,
        "succeeded",
        total,
        1,
    );
    let refunded = payment_event(
        types::PAYMENT_REFUNDED,
        order_id,
        payment,
        "refunded",
        total,
        2,
    );
    // The refund first, then its success, twice (a redelivery).
    for event in [&refunded, &succeeded, &succeeded] {
        stream
            .publish(PAYMENTS_TOPIC, &[event.to_record()])
            .await
            .unwrap();
    }

    let status = eventually(10, || async {
        let status = app.get(&format!("/api/v1/orders/{order}")).await.body["status"].clone();
        (status == "refunded").then_some(status)
    })
    .await;
    assert_eq!(
        status,
        Some(serde_json::json!("refunded")),
        "the payment ended refunded, so must the order"
    );
    assert!(
        app.notified(&order, "order.refunded").await,
        "the refund is announced"
    );
    app.stop().await;
}
