//! Issue 13, findings 4, 8 and 9 (bounds), through the whole platform: an Idempotency-Key
//! retry after a 503 never creates an order on a released reservation; operators count stock
//! on hand without losing what unpaid orders hold; prices, order totals and line quantities
//! have upper bounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use common::{eventually, spawn_app, spawn_with, test_settings};
use mercato::startup::ServiceName;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Sits between the platform and its products service, and holds back the answer to the next
/// stock reservation for longer than the orders service waits: the reservation is made, but
/// the orders service sees a timeout.
struct StallingProxy {
    target: String,
    http: reqwest::Client,
    stall_next_reservation: AtomicBool,
}

async fn forward(State(proxy): State<Arc<StallingProxy>>, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = proxy
        .http
        .request(parts.method.clone(), format!("{}{path}", proxy.target))
        .body(body);
    for (name, value) in &parts.headers {
        if name != axum::http::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let answer = upstream.send().await.unwrap();
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap();
    if parts.method == Method::POST
        && parts.uri.path() == "/internal/v1/reservations"
        && proxy.stall_next_reservation.swap(false, Ordering::SeqCst)
    {
        // Well past the orders service's 300 ms client timeout.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    let mut response = (status, bytes).into_response();
    for (name, value) in &headers {
        if name != axum::http::header::CONTENT_LENGTH
            && name != axum::http::header::TRANSFER_ENCODING
        {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// A platform whose products service is reached through a [`StallingProxy`].
async fn platform_behind_a_stalling_proxy() -> (common::TestApp, Arc<StallingProxy>) {
    let products_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = Arc::new(StallingProxy {
        target: format!("http://127.0.0.1:{products_port}"),
        http: reqwest::Client::new(),
        stall_next_reservation: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.products.port = products_port;
    settings.products.url = Some(proxy_url);
    settings.http.client_timeout_ms = 300;
    (spawn_with(settings, &ServiceName::ALL, dir).await, proxy)
}

#[tokio::test]
async fn a_retry_after_a_503_never_creates_an_order_on_a_released_reservation() {
    let (app, proxy) = platform_behind_a_stalling_proxy().await;
    let user = app.create_user("retry-503@example.com").await;
    let product = app.create_product("RETRY-503", "10.00", 5).await;
    let body = json!({"user_id": user, "items": [{"product_id": product, "quantity": 2}], "shipping_address": "1 Retry Rd"});

    proxy.stall_next_reservation.store(true, Ordering::SeqCst);
    let (status, text, _) = app
        .post_with_key("/api/v1/orders", "retry-503", &body)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    // The orders service gives back the stock it may have taken, in the background.
    assert!(
        eventually(5, || async {
            (app.stock(&product).await == 5).then_some(())
        })
        .await
        .is_some(),
        "the reservation of the failed attempt was released"
    );

    // The client does the right thing: the same request with the same key.
    let (status, text, replayed) = app
        .post_with_key("/api/v1/orders", "retry-503", &body)
        .await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{text}");
    let order: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        app.stock(&product).await,
        3,
        "the order created by the retry holds its stock"
    );
    let paid = app
        .post("/api/v1/payments", json!({"order_id": order["id"]}))
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    assert_eq!(
        app.get(&format!("/api/v1/orders/{}", order["id"].as_str().unwrap()))
            .await
            .body["status"],
        "paid"
    );
    let level = app
        .get(&format!("/api/v1/products/{product}/stock"))
        .await
        .body;
    assert_eq!(
        (&level["on_hand"], &level["reserved"], &level["stock"]),
        (&json!(3), &json!(0), &json!(3)),
        "sold stock left the shelf: {level}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_retry_whose_released_stock_was_sold_meanwhile_is_refused_and_creates_nothing() {
    let (app, proxy) = platform_behind_a_stalling_proxy().await;
    let user = app.create_user("retry-gone@example.com").await;
    let product = app.create_product("RETRY-GONE", "10.00", 2).await;
    let body = json!({"user_id": user, "items": [{"product_id": product, "quantity": 2}], "shipping_address": "1 Retry Rd"});

    proxy.stall_next_reservation.store(true, Ordering::SeqCst);
    let (status, text, _) = app
        .post_with_key("/api/v1/orders", "retry-gone", &body)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(
        eventually(5, || async {
            (app.stock(&product).await == 2).then_some(())
        })
        .await
        .is_some()
    );
    // Someone else buys the stock the failed attempt gave back.
    app.place_order(&user, &[(&product, 2)]).await;

    let (status, text, _) = app
        .post_with_key("/api/v1/orders", "retry-gone", &body)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(problem["type"], "/problems/insufficient-stock", "{problem}");
    let orders = app.get(&format!("/api/v1/orders/user/{user}")).await.body;
    assert_eq!(orders["count"], 1, "only the other order exists: {orders}");
    assert_eq!(app.stock(&product).await, 0);
    app.stop().await;
}

async fn put(app: &common::TestApp, path: &str, body: Value) -> common::Answer {
    app.send(Method::PUT, path, Some(body)).await
}

async fn stock_level(app: &common::TestApp, product: &str) -> Value {
    app.get(&format!("/api/v1/products/{product}/stock"))
        .await
        .body
}

#[tokio::test]
async fn counting_stock_on_hand_keeps_what_unpaid_orders_hold() {
    let app = spawn_app().await;
    let user = app.create_user("count@example.com").await;
    let product = app.create_product("COUNT-1", "4.00", 5).await;
    let order = app.place_order(&user, &[(&product, 2)]).await;
    assert_eq!(app.stock(&product).await, 3);

    // The operator counts the shelf: still 5 units, 2 of them held for the unpaid order.
    let a = put(
        &app,
        &format!("/api/v1/products/{product}"),
        json!({"stock": 5}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let level = stock_level(&app, &product).await;
    assert_eq!(
        (
            &level["stock"],
            &level["on_hand"],
            &level["reserved"],
            &level["available"]
        ),
        (&json!(3), &json!(5), &json!(2), &json!(3)),
        "{level}"
    );
    // Cancelling gives the 2 back to what can be sold: 5, not 7.
    let a = put(
        &app,
        &format!("/api/v1/orders/{order}/status"),
        json!({"status": "cancelled"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(app.stock(&product).await, 5, "no stock invented");
    app.stop().await;
}

#[tokio::test]
async fn operators_set_or_adjust_on_hand_never_below_what_is_held() {
    let app = spawn_app().await;
    let user = app.create_user("onhand@example.com").await;
    let product = app.create_product("ONHAND-1", "4.00", 10).await;
    let order = app.place_order(&user, &[(&product, 4)]).await;
    let path = format!("/api/v1/products/{product}/stock");

    let a = put(&app, &path, json!({"on_hand": 12})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        (
            &a.body["on_hand"],
            &a.body["reserved"],
            &a.body["available"],
            &a.body["stock"]
        ),
        (&json!(12), &json!(4), &json!(8), &json!(8)),
        "{}",
        a.body
    );
    let a = put(&app, &path, json!({"adjust": -5})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        (&a.body["on_hand"], &a.body["available"]),
        (&json!(7), &json!(3))
    );
    let a = put(&app, &path, json!({"adjust": 2})).await;
    assert_eq!(
        (&a.body["on_hand"], &a.body["available"]),
        (&json!(9), &json!(5))
    );

    // Fewer on hand than unpaid orders hold: refused, with the held figure.
    for body in [json!({"on_hand": 3}), json!({"adjust": -6})] {
        let a = put(&app, &path, body.clone()).await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{body}: {}", a.body);
        assert_eq!(a.content_type, "application/problem+json");
        assert_eq!(a.body["reserved"], 4, "{}", a.body);
    }
    let a = put(
        &app,
        &format!("/api/v1/products/{product}"),
        json!({"stock": 3}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
    assert_eq!(a.body["reserved"], 4, "{}", a.body);
    // Malformed stock changes are 422s.
    for body in [
        json!({}),
        json!({"on_hand": 1, "adjust": 1}),
        json!({"on_hand": -1}),
        json!({"on_hand": 1_000_000_001_i64}),
        json!({"adjust": 1_000_000_000_i64}),
    ] {
        let a = put(&app, &path, body.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            a.body
        );
    }
    let level = stock_level(&app, &product).await;
    assert_eq!(
        (&level["on_hand"], &level["reserved"]),
        (&json!(9), &json!(4))
    );
    // Customers may not count stock.
    let (_, token) = app.register("onhand-customer@example.com").await;
    let a = app
        .as_caller(Some(&token))
        .send(Method::PUT, &path, Some(json!({"on_hand": 100})))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    // Paying sells the held units: they leave the shelf.
    let paid = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    let level = stock_level(&app, &product).await;
    assert_eq!(
        (&level["on_hand"], &level["reserved"], &level["available"]),
        (&json!(5), &json!(0), &json!(5)),
        "{level}"
    );
    let p = app.get(&format!("/api/v1/products/{product}")).await.body;
    assert_eq!(
        (&p["stock"], &p["on_hand"], &p["reserved"], &p["available"]),
        (&json!(5), &json!(5), &json!(0), &json!(5)),
        "{p}"
    );
    app.stop().await;
}

#[tokio::test]
async fn prices_are_bounded() {
    let app = spawn_app().await;
    let create = |price: &str| {
        format!(
            r#"{{"name":"Dear","price":{price},"stock":10,"sku":"DEAR-{}","category":"x"}}"#,
            price.len()
        )
    };
    let a = app
        .send_raw(
            Method::POST,
            "/api/v1/products",
            "application/json",
            create("1000000.01").into_bytes(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
    assert_eq!(a.content_type, "application/problem+json");
    assert_eq!(a.body["field"], "price", "{}", a.body);
    assert_eq!(a.body["limit"], 1_000_000.0, "{}", a.body);

    let dear = app.create_product("DEAR-MAX", "1000000.00", 10).await;
    assert_eq!(
        app.get(&format!("/api/v1/products/{dear}")).await.body["price"],
        1_000_000.0
    );
    let a = put(
        &app,
        &format!("/api/v1/products/{dear}"),
        json!({"price": 1_000_000.5}),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
    assert_eq!(
        (&a.body["field"], &a.body["limit"]),
        (&json!("price"), &json!(1_000_000.0))
    );
    app.stop().await;
}

#[tokio::test]
async fn order_totals_are_bounded() {
    let app = spawn_app().await;
    let user = app.create_user("total@example.com").await;
    let dear = app.create_product("DEAR-MAX", "1000000.00", 10).await;
    // Six units at the highest price come to ₹60,00,000.00: past the ₹50,00,000.00 bound.
    let a = app.order(&user, &[(&dear, 6)]).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
    assert_eq!(a.content_type, "application/problem+json");
    assert_eq!(
        (&a.body["field"], &a.body["limit"]),
        (&json!("items"), &json!(5_000_000.0)),
        "{}",
        a.body
    );
    assert_eq!(
        app.stock(&dear).await,
        10,
        "the refused order holds nothing"
    );
    let five = app.order(&user, &[(&dear, 5)]).await;
    assert_eq!(five.status, StatusCode::CREATED, "{}", five.body);
    app.stop().await;
}

#[tokio::test]
async fn order_line_quantities_are_bounded() {
    let app = spawn_app().await;
    let user = app.create_user("quantity@example.com").await;
    // One line of more units than a shop sells at once.
    let cheap = app.create_product("CHEAP-1", "0.01", 1_000_000).await;
    let a = app.order(&user, &[(&cheap, 1_001)]).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
    assert_eq!(
        (&a.body["field"], &a.body["limit"]),
        (&json!("quantity"), &json!(1_000)),
        "{}",
        a.body
    );
    assert_eq!(app.stock(&cheap).await, 1_000_000);
    assert_eq!(
        app.order(&user, &[(&cheap, 1_000)]).await.status,
        StatusCode::CREATED
    );
    app.stop().await;
}

#[tokio::test]
async fn a_reservation_holds_stock_a_day_at_most() {
    let app = spawn_app().await;
    let product = app.create_product("HOLD-1", "10.00", 5).await;
    let base = app
        .platform
        .as_ref()
        .unwrap()
        .url(mercato::startup::ServiceName::Products)
        .unwrap();
    let settings = common::test_settings(&app.dir);
    let service = kit::auth::service_key(&settings.auth, &settings.data_dir).unwrap();
    let token = service.token_for("orders").unwrap();
    let reserve = |hold_secs: u64| {
        app.client
            .post(format!("{base}/internal/v1/reservations"))
            .bearer_auth(&token)
            .json(&json!({
                "order_id": uuid::Uuid::now_v7(),
                "items": [{"product_id": product, "quantity": 1}],
                "hold_secs": hold_secs,
            }))
            .send()
    };
    for too_long in [86_401, u64::from(u32::MAX), 0] {
        let answer = reserve(too_long).await.unwrap();
        assert_eq!(
            answer.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{too_long}"
        );
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["field"], "hold_secs", "{body}");
    }
    assert_eq!(app.stock(&product).await, 5, "nothing was held");
    assert_eq!(reserve(86_400).await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(app.stock(&product).await, 4);
    app.stop().await;
}

#[tokio::test]
async fn one_user_cannot_lock_the_shelves_with_unpaid_orders() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.limits.max_pending_orders_per_user = 2;
    settings.limits.max_pending_units_per_user = 10;
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let (hoarder, other) = (
        app.create_user("hoarder@example.com").await,
        app.create_user("shopper@example.com").await,
    );
    let product = app.create_product("QUOTA-1", "5.00", 1_000).await;

    // Units: 10 at most held by one user's unpaid orders.
    let too_many_units = app.order(&hoarder, &[(&product, 11)]).await;
    assert_eq!(
        too_many_units.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        too_many_units.body
    );
    assert_eq!(
        too_many_units.body["quota"], "units",
        "{}",
        too_many_units.body
    );
    assert_eq!(too_many_units.body["limit"], 10);

    // Orders: two unpaid at most.
    let first = app.order(&hoarder, &[(&product, 1)]).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(
        app.order(&hoarder, &[(&product, 1)]).await.status,
        StatusCode::CREATED
    );
    let third = app.order(&hoarder, &[(&product, 1)]).await;
    assert_eq!(
        third.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        third.body
    );
    assert_eq!(third.body["quota"], "orders", "{}", third.body);
    assert!(
        third.body["type"]
            .as_str()
            .unwrap()
            .ends_with("pending-quota")
    );
    assert_eq!(
        app.stock(&product).await,
        998,
        "the refused order holds nothing"
    );

    // Another customer is not affected, and a cancelled order frees its place.
    assert_eq!(
        app.order(&other, &[(&product, 1)]).await.status,
        StatusCode::CREATED
    );
    let id = first.body["id"].as_str().unwrap();
    let cancelled = put(
        &app,
        &format!("/api/v1/orders/{id}/status"),
        json!({"status": "cancelled"}),
    )
    .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(
        app.order(&hoarder, &[(&product, 1)]).await.status,
        StatusCode::CREATED
    );
    app.stop().await;
}
