//! The public API through the gateway, in-process: the happy paths that matter and every
//! kind of bad input, which must get a 4xx problem+json, never a 5xx.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{spawn_app, spawn_with, test_settings};
use mercato::ServiceName;
use reqwest::{Method, StatusCode};
use serde_json::json;

const NIL: &str = "00000000-0000-0000-0000-000000000000";

#[tokio::test]
async fn every_bad_input_gets_a_4xx_problem() {
    let app = spawn_app().await;
    let user = app.create_user("ada@example.com").await;
    let product = app.create_product("SKU-1", "1999.99", 5).await;
    let order = app.place_order(&user, &[(&product, 1)]).await;
    let payment = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let huge_json = format!("{{\"name\":\"{}\"}}", "x".repeat(2 * 1024 * 1024)).into_bytes();

    type Case = (Method, String, &'static str, Vec<u8>, u16);
    let j = |v: serde_json::Value| v.to_string().into_bytes();
    let raw = |s: &str| s.as_bytes().to_vec();
    let ct = "application/json";
    let cases: Vec<Case> = vec![
        // users
        (
            Method::POST,
            "/api/v1/users".into(),
            ct,
            raw("{\"name\":"),
            400,
        ),
        (
            Method::POST,
            "/api/v1/users".into(),
            ct,
            j(json!({"name": 1, "email": "a@b.co"})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/users".into(),
            ct,
            j(json!({"email": "a@b.co"})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/users".into(),
            ct,
            j(json!({"name": "A", "email": "not-an-email"})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/users".into(),
            ct,
            j(json!({"name": "A", "email": "b@b.co", "phone": "call me"})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/users".into(),
            ct,
            j(json!({"name": "A", "email": "ADA@example.com"})),
            409,
        ),
        (
            Method::POST,
            "/api/v1/users".into(),
            "text/plain",
            raw("{}"),
            415,
        ),
        (
            Method::POST,
            "/api/v1/users".into(),
            ct,
            huge_json.clone(),
            413,
        ),
        (Method::POST, "/api/v1/users".into(), ct, huge.clone(), 413),
        (
            Method::GET,
            "/api/v1/users/not-a-uuid".into(),
            ct,
            vec![],
            400,
        ),
        (Method::GET, format!("/api/v1/users/{NIL}"), ct, vec![], 404),
        (Method::DELETE, "/api/v1/users/42".into(), ct, vec![], 400),
        (
            Method::DELETE,
            format!("/api/v1/users/{NIL}"),
            ct,
            vec![],
            404,
        ),
        (
            Method::GET,
            "/api/v1/users?limit=-1".into(),
            ct,
            vec![],
            400,
        ),
        (Method::GET, "/api/v1/users?limit=0".into(), ct, vec![], 400),
        (
            Method::GET,
            "/api/v1/users?skip=abc".into(),
            ct,
            vec![],
            400,
        ),
        (Method::PATCH, "/api/v1/users".into(), ct, vec![], 405),
        // products
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","#),
            400,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":"abc","stock":1,"sku":"X1"}"#),
            422,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":-1,"stock":1,"sku":"X1"}"#),
            422,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":1.999,"stock":1,"sku":"X1"}"#),
            422,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":0,"stock":1,"sku":"X1"}"#),
            422,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":1,"stock":-1,"sku":"X1"}"#),
            422,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":1,"stock":1.5,"sku":"X1"}"#),
            422,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":1,"stock":1}"#),
            422,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            raw(r#"{"name":"P","price":1,"stock":1,"sku":"SKU-1"}"#),
            409,
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            ct,
            huge_json.clone(),
            413,
        ),
        (Method::GET, "/api/v1/products/xyz".into(), ct, vec![], 400),
        (
            Method::GET,
            format!("/api/v1/products/{NIL}"),
            ct,
            vec![],
            404,
        ),
        (
            Method::GET,
            format!("/api/v1/products/{NIL}/stock"),
            ct,
            vec![],
            404,
        ),
        (
            Method::GET,
            "/api/v1/products/xyz/stock".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::GET,
            "/api/v1/products?limit=100000".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::PUT,
            format!("/api/v1/products/{product}"),
            ct,
            raw(r#"{"price":0}"#),
            422,
        ),
        (
            Method::PUT,
            format!("/api/v1/products/{product}"),
            ct,
            raw(r#"{"stock":"many"}"#),
            422,
        ),
        (
            Method::PUT,
            format!("/api/v1/products/{product}"),
            ct,
            raw("{"),
            400,
        ),
        (
            Method::PUT,
            format!("/api/v1/products/{NIL}"),
            ct,
            raw(r#"{"stock":1}"#),
            404,
        ),
        (
            Method::DELETE,
            format!("/api/v1/products/{NIL}"),
            ct,
            vec![],
            404,
        ),
        // orders
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            raw("{\"user_id\""),
            400,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(json!({"user_id": user, "shipping_address": "x"})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(json!({"user_id": user, "items": [], "shipping_address": "x"})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": user, "items": [{"product_id": product, "quantity": 0}], "shipping_address": "x"}),
            ),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": user, "items": [{"product_id": product, "quantity": -3}], "shipping_address": "x"}),
            ),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": user, "items": [{"product_id": product, "quantity": "two"}], "shipping_address": "x"}),
            ),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": user, "items": [{"product_id": product, "quantity": 1}], "shipping_address": ""}),
            ),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": "abc", "items": [{"product_id": product, "quantity": 1}], "shipping_address": "x"}),
            ),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": user, "items": [{"product_id": NIL, "quantity": 1}], "shipping_address": "x"}),
            ),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": NIL, "items": [{"product_id": product, "quantity": 1}], "shipping_address": "x"}),
            ),
            422,
        ),
        (
            Method::POST,
            "/api/v1/orders".into(),
            ct,
            j(
                json!({"user_id": user, "items": [{"product_id": product, "quantity": 99}], "shipping_address": "x"}),
            ),
            409,
        ),
        (Method::POST, "/api/v1/orders".into(), ct, huge.clone(), 413),
        (Method::GET, "/api/v1/orders/abc".into(), ct, vec![], 400),
        (
            Method::GET,
            format!("/api/v1/orders/{NIL}"),
            ct,
            vec![],
            404,
        ),
        (
            Method::GET,
            "/api/v1/orders/user/abc".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::PUT,
            format!("/api/v1/orders/{order}/status"),
            ct,
            j(json!({"status": "teleported"})),
            422,
        ),
        (
            Method::PUT,
            format!("/api/v1/orders/{order}/status"),
            ct,
            j(json!({"status": "refunded"})),
            409,
        ),
        (
            Method::PUT,
            format!("/api/v1/orders/{order}/status"),
            ct,
            j(json!({"status": "delivered"})),
            409,
        ),
        (
            Method::PUT,
            format!("/api/v1/orders/{NIL}/status"),
            ct,
            j(json!({"status": "shipped"})),
            404,
        ),
        (
            Method::PUT,
            format!("/api/v1/orders/{order}/status"),
            ct,
            j(json!({})),
            422,
        ),
        (Method::DELETE, "/api/v1/orders".into(), ct, vec![], 405),
        // payments
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            raw("nope"),
            400,
        ),
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            j(json!({})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            j(json!({"order_id": NIL})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            j(json!({"order_id": order, "amount": 1.00})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            j(json!({"order_id": order, "amount": -5})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            j(json!({"order_id": order, "card_number": "1234"})),
            422,
        ),
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            j(json!({"order_id": order})),
            409,
        ),
        (
            Method::POST,
            "/api/v1/payments".into(),
            ct,
            huge.clone(),
            413,
        ),
        (Method::GET, "/api/v1/payments/abc".into(), ct, vec![], 400),
        (
            Method::GET,
            format!("/api/v1/payments/{NIL}"),
            ct,
            vec![],
            404,
        ),
        (
            Method::GET,
            "/api/v1/payments/order/abc".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::POST,
            format!("/api/v1/payments/{NIL}/refund"),
            ct,
            vec![],
            404,
        ),
        (
            Method::POST,
            format!("/api/v1/payments/{payment}/refund"),
            ct,
            j(json!({"amount": 99999})),
            422,
        ),
        (
            Method::POST,
            format!("/api/v1/payments/{payment}/refund"),
            ct,
            raw("{"),
            400,
        ),
        (
            Method::POST,
            format!("/api/v1/payments/{payment}/refund"),
            ct,
            j(json!({"amount": "x"})),
            422,
        ),
        // notifications and analytics
        (
            Method::GET,
            "/api/v1/notifications?user_id=abc".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::GET,
            "/api/v1/notifications?limit=0".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::GET,
            "/api/v1/analytics/windows?from=yesterday".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::GET,
            "/api/v1/analytics/windows?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::GET,
            "/api/v1/analytics/windows?from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z".into(),
            ct,
            vec![],
            400,
        ),
        (
            Method::GET,
            "/api/v1/analytics/nothing-here".into(),
            ct,
            vec![],
            404,
        ),
        // the gateway itself
        (Method::GET, "/api/v1/unknown".into(), ct, vec![], 404),
        (
            Method::POST,
            "/internal/v1/reservations".into(),
            ct,
            j(json!({})),
            404,
        ),
        (Method::GET, "/internal/v1/orders/x".into(), ct, vec![], 404),
    ];

    let mut failures = Vec::new();
    for (method, path, content_type, body, expected) in cases {
        let a = app
            .send_raw(method.clone(), &path, content_type, body)
            .await;
        let problem_ok = a.content_type == "application/problem+json"
            && a.body["status"] == a.status.as_u16()
            && a.body["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("/problems/"));
        if a.status.as_u16() != expected || !problem_ok {
            failures.push(format!(
                "{method} {path}: {} {} {}",
                a.status, a.content_type, a.body
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "unexpected answers:\n{}",
        failures.join("\n")
    );
    app.stop().await;
}

#[tokio::test]
async fn lists_page_and_filter() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.create_user(&format!("u{i}@example.com")).await;
        app.create_product(&format!("LIST-{i}"), "1.00", 1).await;
    }
    let users = app.get("/api/v1/users?skip=1&limit=1").await;
    assert_eq!(users.status, StatusCode::OK, "{}", users.body);
    assert_eq!(users.body.as_array().unwrap().len(), 1);
    let products = app
        .get("/api/v1/products?skip=0&limit=2&category=test")
        .await;
    assert_eq!(products.status, StatusCode::OK, "{}", products.body);
    assert_eq!(products.body.as_array().unwrap().len(), 2);
    let none = app.get("/api/v1/products?category=nothing").await;
    assert_eq!(none.body.as_array().unwrap().len(), 0);
    let user = app.get("/api/v1/users?limit=1").await.body[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let orders = app
        .get(&format!("/api/v1/orders/user/{user}?skip=0&limit=5"))
        .await;
    assert_eq!(orders.status, StatusCode::OK);
    let notes = app
        .get(&format!("/api/v1/notifications?user_id={user}&limit=5"))
        .await;
    assert_eq!(notes.status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn analytics_reports_top_products_and_event_counts() {
    let app = spawn_app().await;
    let user = app.create_user("top@example.com").await;
    let cheap = app.create_product("TOP-CHEAP", "1.00", 100).await;
    let dear = app.create_product("TOP-DEAR", "50.00", 100).await;
    app.place_order(&user, &[(&cheap, 10), (&dear, 1)]).await;
    app.place_order(&user, &[(&dear, 2)]).await;
    let top = common::eventually(5, || async {
        let t = app.get("/api/v1/analytics/top-products?limit=5").await.body;
        (t.as_array()?.len() == 2 && t[0]["quantity"] == 3).then_some(t)
    })
    .await
    .expect("both orders are counted");
    assert_eq!(top[0]["product_id"], dear.as_str());
    assert_eq!(
        (top[0]["quantity"].as_i64(), top[0]["revenue"].as_f64()),
        (Some(3), Some(150.0))
    );
    assert_eq!(top[1]["revenue"].as_f64(), Some(10.0));
    let windows = app.get("/api/v1/analytics/windows").await.body;
    // Summed over windows: the two orders may straddle a minute boundary.
    let created: i64 = windows
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["event_counts"]["order.created"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(created, 2);
    for bad in ["limit=0", "limit=101", "limit=abc", "from=never"] {
        let a = app
            .get(&format!("/api/v1/analytics/top-products?{bad}"))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.body);
    }
    app.stop().await;
}

#[tokio::test]
async fn the_analytics_feed_streams_window_updates() {
    let app = spawn_app().await;
    let user = app.create_user("feed@example.com").await;
    let product = app.create_product("FEED-1", "2.50", 10).await;
    let mut feed = app
        .client
        .get(format!("{}/api/v1/analytics/stream", app.gateway))
        .bearer_auth(app.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), StatusCode::OK);
    assert_eq!(feed.headers()["content-type"], "text/event-stream");
    app.place_order(&user, &[(&product, 2)]).await;
    let mut seen = String::new();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Ok(Some(chunk)) = feed.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("event: window") && seen.contains(r#""order_count":1"#) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(got, Ok(true), "feed so far: {seen}");
    assert!(seen.contains(r#""total_revenue":5.00"#), "{seen}");
    app.stop().await;
}

#[tokio::test]
async fn problems_never_leak_internals_and_carry_request_ids() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/api/v1/orders/oops", app.gateway))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("x-request-id"));
    let text = response.text().await.unwrap();
    assert!(
        !text.to_lowercase().contains("sqlite") && !text.contains("src/"),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_order_total_comes_from_the_catalog_not_the_client() {
    let app = spawn_app().await;
    let user = app.create_user("bob@example.com").await;
    let product = app.create_product("CAT-1", "1999.99", 5).await;
    let a = app
        .post(
            "/api/v1/orders",
            json!({"user_id": user, "items": [{"product_id": product, "quantity": 2, "price": 0.01}], "shipping_address": "2 Side St"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.body["total_amount"].to_string(), "3999.98");
    assert_eq!(a.body["items"][0]["unit_price"].to_string(), "1999.99");
    assert_eq!(app.stock(&product).await, 3);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_orders_never_oversell() {
    let app = spawn_app().await;
    let user = app.create_user("crowd@example.com").await;
    let product = app.create_product("HOT-1", "10.00", 50).await;
    let plenty = app.create_product("PLENTY-1", "1.00", 1000).await;
    let scarce = app.create_product("SCARCE-1", "1.00", 10).await;

    let one = [(product.as_str(), 1)];
    let single = futures_util::future::join_all((0..200).map(|_| app.order(&user, &one))).await;
    let created = single
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    let conflicts = single
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .count();
    let others: Vec<_> = single
        .iter()
        .filter(|a| a.status != StatusCode::CREATED && a.status != StatusCode::CONFLICT)
        .map(|a| (a.status, a.body.clone()))
        .take(3)
        .collect();
    assert_eq!((created, conflicts), (50, 150), "{others:?}");
    assert_eq!(app.stock(&product).await, 0);

    // Multi-item orders where one item runs out: nothing of a refused order is kept.
    let both = [(plenty.as_str(), 2), (scarce.as_str(), 1)];
    let multi = futures_util::future::join_all((0..30).map(|_| app.order(&user, &both))).await;
    let created = multi
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    assert_eq!(created, 10);
    assert_eq!(app.stock(&scarce).await, 0);
    assert_eq!(app.stock(&plenty).await, 1000 - 2 * 10);
    app.stop().await;
}

#[tokio::test]
async fn a_declined_card_cancels_the_order_and_returns_the_stock() {
    let app = spawn_app().await;
    let user = app.create_user("declined@example.com").await;
    let product = app.create_product("DEC-1", "5.00", 3).await;
    let order = app.place_order(&user, &[(&product, 2)]).await;
    assert_eq!(app.stock(&product).await, 1);
    let a = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "card_number": "4000 0000 0000 0002"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED, "{}", a.body);
    assert_eq!(a.body["type"], "/problems/payment-declined");
    assert_eq!(
        app.get(&format!("/api/v1/orders/{order}")).await.body["status"],
        "cancelled"
    );
    assert_eq!(app.stock(&product).await, 3);
    assert!(
        app.notified(&order, "order.cancelled").await,
        "the notifier saw order.cancelled"
    );
    app.stop().await;
}

#[tokio::test]
async fn payment_refund_and_one_success_per_order() {
    let app = spawn_app().await;
    let user = app.create_user("pay@example.com").await;
    let product = app.create_product("PAY-1", "12.50", 3).await;
    let order = app.place_order(&user, &[(&product, 2)]).await;
    let paid = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "amount": "25.00"}),
        )
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    let payment = paid.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.post("/api/v1/payments", json!({"order_id": order}))
            .await
            .status,
        StatusCode::CONFLICT
    );
    let part = app
        .post(
            &format!("/api/v1/payments/{payment}/refund"),
            json!({"amount": 5}),
        )
        .await;
    assert_eq!(part.status, StatusCode::CREATED);
    assert_eq!(part.body["payment"]["status"], "partially_refunded");
    assert_eq!(
        app.get(&format!("/api/v1/orders/{order}")).await.body["status"],
        "paid"
    );
    let rest = app
        .send(
            Method::POST,
            &format!("/api/v1/payments/{payment}/refund"),
            None,
        )
        .await;
    assert_eq!(rest.status, StatusCode::CREATED);
    assert_eq!(rest.body["amount"].as_f64(), Some(20.0));
    assert_eq!(
        app.get(&format!("/api/v1/orders/{order}")).await.body["status"],
        "refunded"
    );
    let list = app.get(&format!("/api/v1/payments/order/{order}")).await;
    assert_eq!(list.body["payments"].as_array().unwrap().len(), 1);
    assert_eq!(list.body["count"], 1);
    app.stop().await;
}

#[tokio::test]
async fn a_dependency_down_answers_503_and_holds_no_stock() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    // Users is not started: its URL points at a port nobody listens on.
    settings.users.url = Some(common::unreachable_url());
    // No users service, so no sign-in: this test is about the dependency, not identity.
    settings.auth.mode = kit::config::AuthMode::Open;
    let app = spawn_with(settings, &common::all_but(ServiceName::Users), dir).await;
    let product = app.create_product("DOWN-1", "3.00", 4).await;
    let started = std::time::Instant::now();
    let a = app.order(NIL, &[(&product, 1)]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(a.body["dependency"], "users");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "answered within the client timeout"
    );
    assert_eq!(app.stock(&product).await, 4);
    // The gateway stays ready (its routes answer 503 for what is down), and readiness is on
    // the operations listener, not the public one.
    assert_eq!(app.get("/ready").await.status, StatusCode::NOT_FOUND);
    let ops = app.platform.as_ref().unwrap().ops_url();
    let ready = app.client.get(format!("{ops}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn the_gateway_serves_its_openapi_document() {
    let app = spawn_app().await;
    let a = app.get("/openapi.json").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["openapi"], "3.1.0");
    assert!(a.body["paths"]["/api/v1/orders"]["post"].is_object());
    app.stop().await;
}

#[tokio::test]
async fn metrics_label_routes_by_template() {
    let app = spawn_app().await;
    let _ = app.get(&format!("/api/v1/products/{NIL}")).await;
    assert_eq!(app.get("/metrics").await.status, StatusCode::NOT_FOUND);
    let text = common::scrape_metrics(&app.client, &app.platform.as_ref().unwrap().ops_url()).await;
    assert!(text.contains(r#"route="/api/v1/products/{id}""#), "{text}");
    assert!(!text.contains(NIL), "raw ids never become labels");
    assert!(text.contains("http_request_duration_seconds_bucket"));
    app.stop().await;
}

/// A scraper that asks for OpenMetrics (Prometheus does, first) gets it: counters' families
/// without `_total`, no blank line, `# EOF` last. Plain text stays the default.
#[tokio::test]
async fn metrics_speak_openmetrics_to_a_scraper_that_asks() {
    let app = spawn_app().await;
    let _ = app.get(&format!("/api/v1/products/{NIL}")).await;
    let ops = app.platform.as_ref().unwrap().ops_url();
    let asked = app
        .client
        .get(format!("{ops}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        asked.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = asked.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(!text.contains("\n\n"), "no blank lines in OpenMetrics");
    assert!(text.contains("# TYPE http_requests counter\n"), "{text}");
    assert!(text.contains("\nhttp_requests_total{"), "{text}");
    let plain = app
        .client
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.headers()["content-type"], "text/plain; version=0.0.4");
    let plain = plain.text().await.unwrap();
    assert!(
        plain.contains("# TYPE http_requests_total counter"),
        "{plain}"
    );
    assert!(!plain.contains("# EOF"));
    app.stop().await;
}

/// The pipeline's gauges: each relay's outbox backlog and the age of its oldest row, and the
/// notifier's queue depth, reported within seconds of start.
#[tokio::test]
async fn pipeline_gauges_report_the_outbox_and_the_queue() {
    let app = spawn_app().await;
    let ops = app.platform.as_ref().unwrap().ops_url();
    let reported = common::eventually(10, || async {
        let text = app
            .client
            .get(format!("{ops}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let has = |series: &str| text.lines().any(|l| l.starts_with(series));
        (has(r#"outbox_backlog{service="orders"}"#)
            && has(r#"outbox_backlog{service="payments"}"#)
            && has(r#"outbox_oldest_age_seconds{service="orders"}"#)
            && has(r#"queue_depth{queue="order-events"}"#))
        .then_some(text)
    })
    .await;
    assert!(reported.is_some(), "the pipeline gauges are on /metrics");
    app.stop().await;
}
