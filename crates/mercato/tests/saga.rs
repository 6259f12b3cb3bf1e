//! The order saga under retries, timeouts and failures, in-process through the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{eventually, spawn_app, spawn_with, test_settings};
use mercato::ServiceName;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn one_idempotency_key_sent_20_times_concurrently_makes_one_order() {
    let app = spawn_app().await;
    let user = app.create_user("idem@example.com").await;
    let product = app.create_product("IDEM-1", "9.99", 10).await;
    let body = json!({"user_id": user, "items": [{"product_id": product, "quantity": 3}], "shipping_address": "1 Key St"});
    let answers = futures_util::future::join_all(
        (0..20).map(|_| app.post_with_key("/api/v1/orders", "order-key-1", &body)),
    )
    .await;
    let first = &answers[0];
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    for a in &answers {
        assert_eq!((a.0, &a.1), (first.0, &first.1), "identical responses");
    }
    assert_eq!(
        answers.iter().filter(|a| !a.2).count(),
        1,
        "the handler ran once; 19 replays"
    );
    let orders = app.get(&format!("/api/v1/orders/user/{user}")).await.body;
    assert_eq!(orders["orders"].as_array().unwrap().len(), 1, "one order");
    assert_eq!(app.stock(&product).await, 7, "one reservation");

    // Same key, different request → 422; a new key → a new order.
    let other = json!({"user_id": user, "items": [{"product_id": product, "quantity": 1}], "shipping_address": "1 Key St"});
    let (status, text, _) = app
        .post_with_key("/api/v1/orders", "order-key-1", &other)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert!(text.contains("idempotency-key-reused"));
    let (status, _, replayed) = app
        .post_with_key("/api/v1/orders", "order-key-2", &other)
        .await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(app.stock(&product).await, 6);

    // A rejected request is replayed as rejected, without touching stock again.
    let too_many = json!({"user_id": user, "items": [{"product_id": product, "quantity": 50}], "shipping_address": "x"});
    let a = app
        .post_with_key("/api/v1/orders", "order-key-3", &too_many)
        .await;
    let b = app
        .post_with_key("/api/v1/orders", "order-key-3", &too_many)
        .await;
    assert_eq!(
        (a.0, b.0, b.2),
        (StatusCode::CONFLICT, StatusCode::CONFLICT, true)
    );
    let bad_key = app
        .client
        .post(format!("{}/api/v1/orders", app.gateway))
        .bearer_auth(app.token.as_deref().unwrap())
        .header("idempotency-key", "")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

#[tokio::test]
async fn payment_retries_with_a_key_charge_once() {
    let app = spawn_app().await;
    let user = app.create_user("idem-pay@example.com").await;
    let product = app.create_product("IDEM-PAY", "4.00", 2).await;
    let order = app.place_order(&user, &[(&product, 1)]).await;
    let body = json!({"order_id": order});
    let answers = futures_util::future::join_all(
        (0..5).map(|_| app.post_with_key("/api/v1/payments", "pay-key", &body)),
    )
    .await;
    assert!(
        answers
            .iter()
            .all(|a| a.0 == StatusCode::CREATED && a.1 == answers[0].1),
        "{answers:?}"
    );
    let payments = app
        .get(&format!("/api/v1/payments/order/{order}"))
        .await
        .body;
    assert_eq!(payments["payments"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn unpaid_orders_expire_and_give_their_stock_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.saga.pending_order_ttl_secs = 1;
    settings.saga.sweep_interval_ms = 100;
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let user = app.create_user("late@example.com").await;
    let product = app.create_product("EXPIRE-1", "2.00", 5).await;
    let order = app.place_order(&user, &[(&product, 4)]).await;
    assert_eq!(app.stock(&product).await, 1);
    let cancelled = eventually(10, || async {
        (app.get(&format!("/api/v1/orders/{order}")).await.body["status"] == "cancelled")
            .then_some(())
    })
    .await;
    assert!(cancelled.is_some(), "the order expired");
    assert_eq!(app.stock(&product).await, 5);
    assert!(app.notified(&order, "order.cancelled").await);
    let late = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(
        late.status,
        StatusCode::CONFLICT,
        "an expired order cannot be paid: {}",
        late.body
    );
    app.stop().await;
}

#[tokio::test]
async fn a_slow_dependency_gives_a_fast_503_and_leaves_nothing_behind() {
    // A "users service" that accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = black_hole.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            open.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.users.url = Some(format!("http://{address}"));
    settings.http.client_timeout_ms = 300;
    let app = spawn_with(settings, &common::all_but(ServiceName::Users), dir).await;
    let product = app.create_product("SLOW-1", "1.00", 3).await;
    let started = Instant::now();
    let a = app
        .order("00000000-0000-0000-0000-000000000001", &[(&product, 1)])
        .await;
    let took = started.elapsed();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert!(
        took < Duration::from_secs(2),
        "answered in {took:?}, within the 300 ms timeout plus overhead"
    );
    assert_eq!(app.stock(&product).await, 3, "no stock held");
    app.stop().await;
    held.abort();
}

#[tokio::test]
async fn payment_network_errors_and_an_absent_orders_service_are_503s() {
    let app = spawn_app().await;
    let user = app.create_user("neterr@example.com").await;
    let product = app.create_product("NET-1", "1.50", 2).await;
    let order = app.place_order(&user, &[(&product, 1)]).await;
    let a = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "card_number": "4000000000000119"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(
        app.get(&format!("/api/v1/orders/{order}")).await.body["status"],
        "pending"
    );
    assert!(
        app.get(&format!("/api/v1/payments/order/{order}"))
            .await
            .body["payments"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    app.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.orders.url = Some(common::unreachable_url());
    let app = spawn_with(
        settings,
        &[ServiceName::Gateway, ServiceName::Payments],
        dir,
    )
    .await;
    let a = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(a.body["dependency"], "orders");
    app.stop().await;
}

#[tokio::test]
async fn an_explicit_cancellation_releases_stock_once_and_is_announced() {
    let app = spawn_app().await;
    let user = app.create_user("cancel@example.com").await;
    let product = app.create_product("CANCEL-1", "7.00", 4).await;
    let order = app.place_order(&user, &[(&product, 3)]).await;
    assert_eq!(app.stock(&product).await, 1);
    let path = format!("/api/v1/orders/{order}/status");
    let a = app
        .send(
            reqwest::Method::PUT,
            &path,
            Some(json!({"status": "cancelled"})),
        )
        .await;
    assert_eq!(
        (a.status, a.body["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let again = app
        .send(
            reqwest::Method::PUT,
            &path,
            Some(json!({"status": "cancelled"})),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "cancelling twice is a no-op");
    assert_eq!(app.stock(&product).await, 4, "released exactly once");
    let ship = app
        .send(
            reqwest::Method::PUT,
            &path,
            Some(json!({"status": "shipped"})),
        )
        .await;
    assert_eq!(ship.status, StatusCode::CONFLICT);
    let pay = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(
        pay.status,
        StatusCode::CONFLICT,
        "a cancelled order cannot be paid"
    );
    assert!(app.notified(&order, "order.cancelled").await);
    app.stop().await;
}

#[tokio::test]
async fn idempotency_keys_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.http.idempotency_ttl_secs = 0;
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let user = app.create_user("expiry@example.com").await;
    let product = app.create_product("KEYEXP-1", "1.00", 5).await;
    let first = json!({"user_id": user, "items": [{"product_id": product, "quantity": 1}], "shipping_address": "x"});
    let second = json!({"user_id": user, "items": [{"product_id": product, "quantity": 2}], "shipping_address": "x"});
    assert_eq!(
        app.post_with_key("/api/v1/orders", "k", &first).await.0,
        StatusCode::CREATED
    );
    // With a zero lifetime the key is forgotten at once: the same key may name a new request.
    let (status, text, replayed) = app.post_with_key("/api/v1/orders", "k", &second).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{text}");
    assert_eq!(app.stock(&product).await, 2);
    app.stop().await;
}

#[tokio::test]
async fn products_down_gives_a_503_and_no_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.products.url = Some(common::unreachable_url());
    let app = spawn_with(settings, &common::all_but(ServiceName::Products), dir).await;
    let user = app.create_user("noproducts@example.com").await;
    let started = Instant::now();
    let a = app
        .order(&user, &[("00000000-0000-0000-0000-0000000000aa", 1)])
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(a.body["dependency"], "products");
    assert!(started.elapsed() < Duration::from_secs(3));
    let orders = app.get(&format!("/api/v1/orders/user/{user}")).await.body;
    assert_eq!(
        orders["orders"].as_array().unwrap().len(),
        0,
        "no order without its stock"
    );
    app.stop().await;
}

/// An orders service that shows a pending order but refuses to mark it paid, as when the order
/// expires while its payment is in flight.
async fn orders_stub_that_cancels_under_payment(
    order_id: &str,
) -> (String, tokio::task::JoinHandle<()>) {
    use axum::routing::{get, post};
    let order = json!({"id": order_id, "user_id": "00000000-0000-0000-0000-0000000000aa", "status": "pending", "total_amount": 12.34, "currency": "USD"});
    let app = axum::Router::new()
        .route(
            "/internal/v1/orders/{id}",
            get(move || async move { axum::Json(order.clone()) }),
        )
        .route(
            "/internal/v1/orders/{id}/status",
            post(|| async {
                kit::Problem::conflict(
                    "illegal-transition",
                    "an order cannot go from cancelled to paid",
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (
        url,
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
    )
}

#[tokio::test]
async fn a_payment_for_an_order_cancelled_meanwhile_is_refunded() {
    let order = "01a20f00-0000-7000-8000-00000000abcd";
    let (orders_url, stub) = orders_stub_that_cancels_under_payment(order).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.orders.url = Some(orders_url);
    let app = spawn_with(
        settings,
        &[ServiceName::Gateway, ServiceName::Payments],
        dir,
    )
    .await;
    let a = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
    assert_eq!(a.body["type"], "/problems/order-not-payable");
    let payments = app
        .get(&format!("/api/v1/payments/order/{order}"))
        .await
        .body;
    let payment = &payments["payments"].as_array().unwrap()[0];
    assert_eq!(
        payment["status"], "refunded",
        "the money went back: {payment}"
    );
    assert_eq!(payment["refunded_amount"].as_f64(), Some(12.34));
    app.stop().await;
    stub.abort();
}
