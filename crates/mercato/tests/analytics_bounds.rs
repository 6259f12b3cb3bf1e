//! Issue 13, finding 9 (analytics): no order event can break a window. Two orders of
//! 90,000,000,000,000,000.00 (near the largest amount an order can carry) in one window sum
//! past 64-bit cents; the summary, the windows, the top products and the final window handed
//! to the results sink must still answer, exactly to the cent. The events are put on the
//! orders stream directly (a second handle on the platform's embedded bus), as the orders
//! service would publish them, so no cap on prices elsewhere can hide the case.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bus::Stream as _;
use bus::embedded::{EmbeddedBus, EmbeddedOptions};
use bus::event::{OrderEvent, OrderEventItem, types};
use chrono::{DateTime, Utc};
use common::{eventually, spawn_with, test_settings};
use kit::Money;
use mercato::ServiceName;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

/// 90,000,000,000,000,000.00 in cents: two of them overflow an i64.
const HUGE_CENTS: i64 = 9_000_000_000_000_000_000;

fn order(n: u128, cents: i64, at: &str) -> OrderEvent {
    OrderEvent {
        event_id: Uuid::from_u128(0xb0_0000 + n),
        event_type: types::ORDER_CREATED.into(),
        order_id: Uuid::from_u128(0xa0_0000 + n),
        user_id: Uuid::from_u128(n),
        total_amount: Money::from_cents(cents).unwrap(),
        currency: Some("USD".into()),
        status: "pending".into(),
        items_count: 1,
        created_at: at.parse::<DateTime<Utc>>().unwrap(),
        occurred_at: None,
        items: vec![OrderEventItem {
            product_id: Uuid::from_u128(0xc0_0000),
            quantity: 1,
            unit_price: Money::from_cents(cents).unwrap(),
        }],
    }
}

/// GET as the administrator: the status and the body's exact text (a JSON parse into f64
/// would round the very digits under test).
async fn get_text(app: &common::TestApp, path: &str) -> (StatusCode, String) {
    let response = app
        .client
        .get(format!("{}{path}", app.gateway))
        .bearer_auth(app.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test]
async fn revenue_past_64_bit_cents_is_reported_exactly_and_the_window_is_emitted() {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(&dir);
    let app = spawn_with(
        settings.clone(),
        &[
            ServiceName::Gateway,
            ServiceName::Users,
            ServiceName::Analytics,
        ],
        dir,
    )
    .await;
    let bus = EmbeddedBus::open(
        &settings.bus_url(),
        &settings.sqlite,
        EmbeddedOptions {
            partitions: settings.bus.stream_partitions,
            ..EmbeddedOptions::default()
        },
    )
    .await
    .unwrap();
    let events = [
        order(1, HUGE_CENTS, "2026-01-01T10:00:10Z"),
        order(2, HUGE_CENTS, "2026-01-01T10:00:20Z"),
        // Five minutes on: the watermark passes 10:01, so the first window is final.
        order(3, 100, "2026-01-01T10:05:00Z"),
    ];
    let records: Vec<bus::Record> = events
        .iter()
        .map(|e| bus::Record {
            // One key, one partition: the watermark follows it alone.
            key: "orders".into(),
            headers: Default::default(),
            payload: serde_json::to_vec(e).unwrap(),
        })
        .collect();
    bus.publish(bus::names::ORDERS_TOPIC, &records)
        .await
        .unwrap();

    let summary = eventually(10, || async {
        let (status, text) = get_text(&app, "/api/v1/analytics/summary").await;
        let v: Value = serde_json::from_str(&text).ok()?;
        (status != StatusCode::OK || v["events_processed"] == 3).then_some((status, text))
    })
    .await
    .expect("analytics read the three events");
    assert_eq!(summary.0, StatusCode::OK, "{}", summary.1);
    assert!(
        summary
            .1
            .contains(r#""total_revenue":180000000000000001.00"#),
        "two huge orders and one of 1.00, exactly: {}",
        summary.1
    );
    assert!(
        summary
            .1
            .contains(r#""avg_order_value":60000000000000000.33"#),
        "{}",
        summary.1
    );
    assert!(summary.1.contains(r#""order_count":3"#), "{}", summary.1);

    let range = "from=2026-01-01T10:00:00Z&to=2026-01-01T10:10:00Z";
    let (status, windows) = get_text(&app, &format!("/api/v1/analytics/windows?{range}")).await;
    assert_eq!(status, StatusCode::OK, "{windows}");
    let first: Value = serde_json::from_str::<Vec<Value>>(&windows).unwrap()[0].clone();
    assert_eq!(
        (
            &first["window_start"],
            &first["order_count"],
            &first["final"]
        ),
        (
            &Value::from("2026-01-01T10:00:00Z"),
            &Value::from(2),
            &Value::from(true)
        ),
        "{windows}"
    );
    for exact in [
        r#""total_revenue":180000000000000000.00"#,
        r#""avg_order_value":90000000000000000.00"#,
        r#""revenue":180000000000000000.00"#,
    ] {
        assert!(windows.contains(exact), "{exact} in {windows}");
    }

    let (status, top) = get_text(
        &app,
        &format!("/api/v1/analytics/top-products?{range}&limit=5"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{top}");
    assert!(
        top.contains(r#""quantity":3"#) && top.contains(r#""revenue":180000000000000001.00"#),
        "{top}"
    );

    // The final window reaches the results sink (a directory under the data dir by default).
    let results = app.dir.path().join("analytics-results");
    let emitted = eventually(10, || async {
        let mut files = Vec::new();
        for day in std::fs::read_dir(&results).ok()? {
            for file in std::fs::read_dir(day.ok()?.path()).ok()? {
                files.push(std::fs::read_to_string(file.ok()?.path()).ok()?);
            }
        }
        files
            .into_iter()
            .find(|f| f.contains(r#""window_start":"2026-01-01T10:00:00Z""#))
    })
    .await
    .expect("the final window was emitted");
    assert!(
        emitted.contains(r#""total_revenue":180000000000000000.00"#),
        "{emitted}"
    );
    app.stop().await;
}
