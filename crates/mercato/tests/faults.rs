//! Fault injection through the admin API (`kit::faults`): refused where it is not allowed and to
//! anyone but an administrator; each fault doing what its documentation says to a running
//! platform, every injected failure counted in `/metrics`; the platform's guarantees (stock
//! released, events delivered, notifications exactly once) holding through them; hostile
//! parameters refused with problem+json.
//!
//! Faults are process-wide, as in production, and this binary's tests share a process: each
//! test holds [`ONE_AT_A_TIME`] and clears every fault before and after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Answer, TestApp, all_but, answer, eventually, scrape_metrics, spawn_app, spawn_with,
    test_settings, unreachable_url,
};
use mercato::startup::ServiceName;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const FAULTS: &str = "/api/v1/admin/faults";
const PROBLEM: &str = "application/problem+json";

/// Sends `body` (raw bytes, as JSON) to `path` on `base` with `token`.
async fn call(
    app: &TestApp,
    base: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> Answer {
    let mut req = app.client.request(method, format!("{base}{path}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_vec());
    }
    answer(req.send().await.unwrap()).await
}

async fn put_fault(app: &TestApp, name: &str, params: Value) -> Answer {
    app.send(
        Method::PUT,
        &format!("{FAULTS}/{name}"),
        Some(params.clone()),
    )
    .await
}

async fn set_fault(app: &TestApp, name: &str, params: Value) -> Value {
    let a = put_fault(app, name, params).await;
    assert_eq!(a.status, StatusCode::OK, "{name}: {}", a.body);
    a.body
}

/// The value of one series in the platform's `/metrics` (0 when absent).
async fn metric(app: &TestApp, series: &str) -> f64 {
    let ops = app.platform.as_ref().unwrap().ops_url();
    let text = scrape_metrics(&app.client, &ops).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn injected(fault: &str) -> String {
    format!("faults_injected_total{{fault=\"{fault}\"}}")
}

/// The faults the gateway lists.
async fn listed(app: &TestApp) -> Vec<Value> {
    let a = app.get(FAULTS).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    a.body["faults"].as_array().unwrap().clone()
}

fn service_url(app: &TestApp, service: ServiceName) -> String {
    app.platform.as_ref().unwrap().url(service).unwrap()
}

#[tokio::test]
async fn faults_are_refused_in_production_unless_allowed_and_to_all_but_administrators() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    // Production refuses the payment simulator: the services that need no payments suffice.
    let services = [
        ServiceName::Gateway,
        ServiceName::Users,
        ServiceName::Products,
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.environment = "production".into();
    let app = spawn_with(settings.clone(), &services, dir).await;
    let (_, customer) = app.register("shopper@example.com").await;

    let list = app.get(FAULTS).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert_eq!(list.body, json!({"allowed": false, "faults": []}));
    let one = format!("{FAULTS}/payment-decline");
    for (method, path) in [
        (Method::PUT, one.as_str()),
        (Method::DELETE, one.as_str()),
        (Method::DELETE, FAULTS),
    ] {
        let refused = app
            .send(method.clone(), path, Some(json!({"rate": 1.0})))
            .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(refused.content_type, PROBLEM);
        assert_eq!(refused.body["type"], "/problems/faults-disabled");
        let detail = refused.body["detail"].as_str().unwrap();
        assert!(
            detail.contains("faults.allowed = true") && detail.contains("\"production\""),
            "{detail}"
        );
    }
    // Each service's own route refuses alike.
    let products = service_url(&app, ServiceName::Products);
    let direct = call(
        &app,
        &products,
        app.token.as_deref(),
        Method::PUT,
        &one,
        Some(br#"{"rate": 1}"#),
    )
    .await;
    assert_eq!(direct.status, StatusCode::FORBIDDEN, "{}", direct.body);
    assert_eq!(direct.body["type"], "/problems/faults-disabled");
    assert!(kit::faults::registry().list().is_empty(), "nothing set");

    // Only administrators, wherever they ask: the gateway and a service itself.
    for base in [app.gateway.as_str(), products.as_str()] {
        for (token, status) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some(customer.as_str()), StatusCode::FORBIDDEN),
        ] {
            for (method, path, body) in [
                (Method::GET, FAULTS, None),
                (Method::PUT, one.as_str(), Some(&br#"{"rate": 1}"#[..])),
                (Method::DELETE, one.as_str(), None),
                (Method::DELETE, FAULTS, None),
            ] {
                let a = call(&app, base, token, method.clone(), path, body).await;
                assert_eq!(a.status, status, "{method} {base}{path}: {}", a.body);
                assert_eq!(a.content_type, PROBLEM);
            }
        }
    }
    app.stop().await;

    // Allowed explicitly, production takes them.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.environment = "production".into();
    settings.faults.allowed = Some(true);
    let app = spawn_with(settings, &services, dir).await;
    let set = put_fault(&app, "route-latency", json!({"service": "users", "ms": 5})).await;
    // Set here, and said not to have reached the services this test does not run.
    assert_eq!(set.status, StatusCode::BAD_GATEWAY, "{}", set.body);
    let missing: Vec<&String> = set.body["services"].as_object().unwrap().keys().collect();
    assert_eq!(
        missing,
        ["analytics", "notifications", "orders", "payments"]
    );
    let list = app.get(FAULTS).await.body;
    assert_eq!(list["allowed"], true);
    assert_eq!(list["faults"][0]["name"], "route-latency", "{list}");
    let cleared = app.send(Method::DELETE, FAULTS, None).await;
    assert_eq!(cleared.status, StatusCode::BAD_GATEWAY);
    assert!(listed(&app).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn an_injected_decline_cancels_the_order_releases_its_stock_and_is_counted() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    let app = spawn_app().await;
    let before = metric(&app, &injected("payment-decline")).await;
    let fault = set_fault(&app, "payment-decline", json!({"rate": 1.0})).await;
    assert_eq!(fault["name"], "payment-decline");
    assert_eq!(fault["params"], json!({"rate": 1.0}));
    assert_eq!(fault["injected"], 0);
    assert!(fault["until"].is_null());
    assert!(
        chrono::DateTime::parse_from_rfc3339(fault["since"].as_str().unwrap()).is_ok(),
        "{fault}"
    );
    assert_eq!(
        metric(&app, "faults_active{fault=\"payment-decline\"}").await,
        1.0
    );

    let user = app.create_user("decline@example.com").await;
    let product = app.create_product("FAULT-DECLINE", "25.00", 5).await;
    let order = app.place_order(&user, &[(&product, 2)]).await;
    assert_eq!(app.stock(&product).await, 3);
    let paid = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(paid.status, StatusCode::PAYMENT_REQUIRED, "{}", paid.body);
    assert_eq!(paid.content_type, PROBLEM);
    assert_eq!(paid.body["type"], "/problems/payment-declined");
    let settled = eventually(10, || async {
        let status = app.get(&format!("/api/v1/orders/{order}")).await.body["status"].clone();
        (status == "cancelled" && app.stock(&product).await == 5).then_some(())
    })
    .await;
    assert!(settled.is_some(), "the order is cancelled, its stock back");

    let faults = listed(&app).await;
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0]["injected"], 1);
    assert_eq!(
        metric(&app, &injected("payment-decline")).await - before,
        1.0
    );

    let cleared = app
        .send(Method::DELETE, &format!("{FAULTS}/payment-decline"), None)
        .await;
    assert_eq!(cleared.status, StatusCode::NO_CONTENT);
    assert_eq!(
        metric(&app, "faults_active{fault=\"payment-decline\"}").await,
        0.0
    );
    let again = app.place_order(&user, &[(&product, 1)]).await;
    let paid = app
        .post("/api/v1/payments", json!({"order_id": again}))
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    app.stop().await;
}

#[tokio::test]
async fn an_injected_provider_timeout_charges_nothing_and_answers_503() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    let app = spawn_app().await;
    set_fault(&app, "payment-timeout", json!({"rate": 1})).await;
    let user = app.create_user("timeout@example.com").await;
    let product = app.create_product("FAULT-TIMEOUT", "10.00", 5).await;
    let order = app.place_order(&user, &[(&product, 1)]).await;
    let paid = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(
        paid.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        paid.body
    );
    assert_eq!(paid.body["type"], "/problems/dependency-unavailable");
    assert_eq!(paid.body["dependency"], "payment provider");
    // As with the unreachable test card: the order waits to be paid, and can be once the
    // provider answers again.
    assert_eq!(
        app.get(&format!("/api/v1/orders/{order}")).await.body["status"],
        "pending"
    );
    kit::faults::clear_all();
    let paid = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    app.stop().await;
}

#[tokio::test]
async fn route_faults_slow_or_fail_one_services_routes_until_cleared() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    let app = spawn_app().await;
    set_fault(&app, "route-error", json!({"service": "products"})).await;
    let failed = app.get("/api/v1/products").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.content_type, PROBLEM);
    assert_eq!(failed.body["type"], "/problems/fault-injected");
    assert!(
        failed.body["title"]
            .as_str()
            .unwrap()
            .contains("Fault injected"),
        "{}",
        failed.body
    );
    // Other services, health and the fault routes themselves are untouched.
    assert_eq!(app.get("/api/v1/users/me").await.status, StatusCode::OK);
    let products = service_url(&app, ServiceName::Products);
    let health = app
        .client
        .get(format!("{products}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let own = call(
        &app,
        &products,
        app.token.as_deref(),
        Method::GET,
        FAULTS,
        None,
    )
    .await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    assert_eq!(own.body["faults"][0]["name"], "route-error");
    assert_eq!(listed(&app).await[0]["injected"], 1);

    let cleared = app
        .send(Method::DELETE, &format!("{FAULTS}/route-error"), None)
        .await;
    assert_eq!(cleared.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get("/api/v1/products").await.status, StatusCode::OK);

    set_fault(
        &app,
        "route-latency",
        json!({"service": "users", "ms": 300, "rate": 1.0}),
    )
    .await;
    let started = std::time::Instant::now();
    assert_eq!(app.get("/api/v1/users/me").await.status, StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    // On the gateway itself, the fault routes are never slowed, or a drill could not be stopped.
    set_fault(
        &app,
        "route-latency",
        json!({"service": "gateway", "ms": 5000}),
    )
    .await;
    let started = std::time::Instant::now();
    assert_eq!(app.get(FAULTS).await.status, StatusCode::OK);
    let cleared = app.send(Method::DELETE, FAULTS, None).await;
    assert_eq!(cleared.status, StatusCode::NO_CONTENT);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(metric(&app, &injected("route-latency")).await >= 1.0);
    kit::faults::clear_all();
    app.stop().await;
}

#[tokio::test]
async fn events_held_back_while_the_stream_and_queue_are_down_arrive_after() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    let app = spawn_app().await;
    let stream = set_fault(&app, "stream-publish", json!({"seconds": 2})).await;
    set_fault(&app, "queue-publish", json!({"seconds": 2})).await;
    let since = chrono::DateTime::parse_from_rfc3339(stream["since"].as_str().unwrap()).unwrap();
    let until = chrono::DateTime::parse_from_rfc3339(stream["until"].as_str().unwrap()).unwrap();
    assert_eq!((until - since).num_milliseconds(), 2000);

    let user = app.create_user("outage@example.com").await;
    let product = app.create_product("FAULT-OUTAGE", "12.50", 10).await;
    let order = app.place_order(&user, &[(&product, 1)]).await;
    // The relays tried, and failed as told.
    let tried = eventually(10, || async {
        let stream = metric(&app, &injected("stream-publish")).await;
        let queue = metric(&app, &injected("queue-publish")).await;
        (stream >= 1.0 && queue >= 1.0).then_some(())
    })
    .await;
    assert!(tried.is_some(), "the relays met the faults");

    // The faults end by themselves, and the held rows go out: analytics counts the order and
    // the notifier records it.
    let arrived = eventually(60, || async {
        let summary = app.get("/api/v1/analytics/summary").await.body;
        let notified = app
            .get(&format!("/api/v1/notifications?order_id={order}"))
            .await
            .body;
        let notified = notified
            .as_array()?
            .iter()
            .any(|n| n["event_type"] == "order.created");
        (summary["order_count"] == 1 && notified).then_some(())
    })
    .await;
    assert!(
        arrived.is_some(),
        "the order's events arrived after the outage"
    );
    assert!(listed(&app).await.is_empty(), "both ended by themselves");
    assert_eq!(
        metric(&app, "faults_active{fault=\"stream-publish\"}").await,
        0.0
    );
    app.stop().await;
}

/// The `order.created` records of `order`, once the notifier has at least one.
async fn created_notices(app: &TestApp, order: &str) -> usize {
    let n = app
        .get(&format!("/api/v1/notifications?order_id={order}"))
        .await
        .body;
    n.as_array()
        .map(|all| {
            all.iter()
                .filter(|n| n["event_type"] == "order.created")
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_consumer_crashing_mid_batch_still_has_each_effect_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    // What a crash leaves unacknowledged comes back after the visibility timeout.
    settings.bus.visibility_timeout_ms = 1_000;
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let user = app.create_user("crash@example.com").await;
    let product = app.create_product("FAULT-CRASH", "3.00", 100).await;
    let line = [(product.as_str(), 1)];

    // The notifier.
    let duplicates = "notifications_processed_total{outcome=\"duplicate\"}";
    let before = metric(&app, duplicates).await;
    set_fault(
        &app,
        "consumer-crash",
        json!({"count": 1, "consumer": "notifications"}),
    )
    .await;
    let orders: Vec<String> =
        futures_util::future::join_all((0..6).map(|_| app.place_order(&user, &line))).await;
    let redelivered = eventually(30, || async {
        let used_up = listed(&app).await.is_empty();
        (used_up && metric(&app, duplicates).await > before).then_some(())
    })
    .await;
    assert!(
        redelivered.is_some(),
        "the crash happened and what it left came back"
    );
    for order in &orders {
        let once = eventually(30, || async {
            (created_notices(&app, order).await >= 1).then_some(())
        })
        .await;
        assert!(once.is_some(), "{order} notified");
        assert_eq!(created_notices(&app, order).await, 1, "{order}");
    }
    assert!(metric(&app, &injected("consumer-crash")).await >= 1.0);

    // The analytics consumer: an order after the crash is read after the replay of what the
    // crash left uncommitted, so once it is counted, the replay is too.
    let counted = |n: i64| {
        let app = &app;
        async move {
            eventually(30, || async {
                let summary = app.get("/api/v1/analytics/summary").await.body;
                (summary["order_count"].as_i64()? >= n).then_some(())
            })
            .await
        }
    };
    assert!(counted(6).await.is_some());
    set_fault(
        &app,
        "consumer-crash",
        json!({"count": 1, "consumer": "analytics"}),
    )
    .await;
    futures_util::future::join_all((0..4).map(|_| app.place_order(&user, &line))).await;
    let crashed = eventually(30, || async { listed(&app).await.is_empty().then_some(()) }).await;
    assert!(crashed.is_some(), "the analytics consumer crashed");
    app.place_order(&user, &line).await;
    assert!(counted(11).await.is_some());
    let summary = app.get("/api/v1/analytics/summary").await.body;
    assert_eq!(summary["order_count"], 11, "{summary}");
    app.stop().await;
}

#[tokio::test]
async fn hostile_fault_requests_are_refused_with_problem_json() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    let app = spawn_app().await;
    let gateway = app.gateway.clone();
    let token = app.token.clone();
    for (name, body, status, kind) in [
        ("disk-full", &br#"{"rate": 1}"#[..], 400, "unknown-fault"),
        ("PAYMENT-DECLINE", br#"{"rate": 1}"#, 400, "unknown-fault"),
        (
            "payment-decline",
            br#"{"rate": 0}"#,
            422,
            "validation-error",
        ),
        (
            "payment-decline",
            br#"{"rate": 2}"#,
            422,
            "validation-error",
        ),
        (
            "payment-decline",
            br#"{"rate": "all"}"#,
            422,
            "validation-error",
        ),
        ("payment-decline", br#"{}"#, 422, "validation-error"),
        ("payment-decline", br#"[1]"#, 422, "validation-error"),
        (
            "payment-decline",
            br#"{"rate": 1, "extra": true}"#,
            422,
            "validation-error",
        ),
        (
            "route-latency",
            br#"{"service": "products", "ms": -5}"#,
            422,
            "validation-error",
        ),
        (
            "route-latency",
            br#"{"service": "products", "ms": 30001}"#,
            422,
            "validation-error",
        ),
        (
            "route-latency",
            br#"{"service": "products", "ms": 1e300}"#,
            422,
            "validation-error",
        ),
        (
            "route-latency",
            br#"{"service": "products", "ms": 18446744073709551616}"#,
            422,
            "validation-error",
        ),
        (
            "route-error",
            br#"{"service": "../../etc"}"#,
            422,
            "validation-error",
        ),
        (
            "stream-publish",
            br#"{"seconds": 86400}"#,
            422,
            "validation-error",
        ),
        (
            "consumer-crash",
            br#"{"rate": 0.5, "count": 1}"#,
            422,
            "validation-error",
        ),
        ("payment-decline", b"rate=1", 400, "bad-request"),
        ("payment-decline", b"{\"rate\": 1", 400, "bad-request"),
        ("payment-decline", b"\xff\xfe", 400, "bad-request"),
    ] {
        let a = call(
            &app,
            &gateway,
            token.as_deref(),
            Method::PUT,
            &format!("{FAULTS}/{name}"),
            Some(body),
        )
        .await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(a.status.as_u16(), status, "{name} {shown}: {}", a.body);
        assert_eq!(a.content_type, PROBLEM, "{name} {shown}");
        assert_eq!(
            a.body["type"],
            format!("/problems/{kind}"),
            "{name} {shown}"
        );
        assert!(a.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let unknown = app
        .send(Method::DELETE, &format!("{FAULTS}/disk-full"), None)
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    let long = "x".repeat(5_000);
    let long = app
        .send(Method::PUT, &format!("{FAULTS}/{long}"), Some(json!({})))
        .await;
    assert!(long.status.is_client_error(), "{}", long.status);
    let not_set = app
        .send(Method::DELETE, &format!("{FAULTS}/route-error"), None)
        .await;
    assert_eq!(
        not_set.status,
        StatusCode::NO_CONTENT,
        "clearing is idempotent"
    );
    let wrong_method = app.send(Method::POST, FAULTS, Some(json!({}))).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(listed(&app).await.is_empty(), "nothing was set");
    app.stop().await;
}

#[tokio::test]
async fn the_gateway_passes_changes_on_to_services_elsewhere_and_says_which_missed_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    kit::faults::clear_all();
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(&dir);
    // Every service but the gateway and analytics in one platform; the gateway in another,
    // reaching them at their URLs (as between pods), and analytics nowhere.
    let mut running = all_but(ServiceName::Gateway);
    running.retain(|s| *s != ServiceName::Analytics);
    let services = spawn_with(settings.clone(), &running, dir).await;
    let mut edge = settings.clone();
    for service in &running {
        let url = service_url(&services, *service);
        match service {
            ServiceName::Users => edge.users.url = Some(url),
            ServiceName::Products => edge.products.url = Some(url),
            ServiceName::Orders => edge.orders.url = Some(url),
            ServiceName::Payments => edge.payments.url = Some(url),
            ServiceName::Notifications => edge.notifications.url = Some(url),
            _ => {}
        }
    }
    edge.analytics.url = Some(unreachable_url());
    let gateway = spawn_with(edge, &[ServiceName::Gateway], tempfile::tempdir().unwrap()).await;

    let missed = put_fault(
        &gateway,
        "route-latency",
        json!({"service": "orders", "ms": 1}),
    )
    .await;
    assert_eq!(missed.status, StatusCode::BAD_GATEWAY, "{}", missed.body);
    assert_eq!(missed.body["type"], "/problems/faults-not-applied");
    let missing: Vec<&String> = missed.body["services"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(missing, ["analytics"], "{}", missed.body);
    // The others took it (here: the same process, which they answer without doing it twice).
    let list = gateway.get(FAULTS).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(
        list.body["faults"].as_array().unwrap().len(),
        1,
        "{}",
        list.body
    );
    assert_eq!(list.body["faults"][0]["injected"], 0, "counted once");
    assert!(
        list.body["unreachable"]["analytics"].is_string(),
        "{}",
        list.body
    );
    let cleared = gateway.send(Method::DELETE, FAULTS, None).await;
    assert_eq!(cleared.status, StatusCode::BAD_GATEWAY);
    assert!(kit::faults::registry().list().is_empty(), "cleared here");
    gateway.stop().await;
    services.stop().await;
}
