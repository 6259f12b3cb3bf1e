//! Money safety of the payments service (issue 13): one charge per order under concurrency, a
//! charge taken before a crash recorded after it (never charged twice), refunds idempotent and
//! exact, a refunded payment no longer the order's success, the compensation the orders service
//! calls, Stripe's webhooks, and no simulator in production. Runs the platform in-process (and,
//! for the crash, the real binary) against a fake Stripe that counts what it charged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fake_stripe;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestApp, eventually, spawn_app, spawn_with, test_settings};
use fake_stripe::FakeStripe;
use hmac::{KeyInit, Mac};
use kit::config::Settings;
use mercato::ServiceName;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WEBHOOK_SECRET: &str = "whsec_test_0123456789";

/// `settings` with `patch` merged in, through their serialized form: the keys a deployment
/// writes in mercato.toml, checked by the same deserializer.
fn patched(settings: Settings, patch: Value) -> Settings {
    fn merge(into: &mut Value, patch: Value) {
        match (into, patch) {
            (Value::Object(into), Value::Object(patch)) => {
                for (k, v) in patch {
                    merge(into.entry(k).or_insert(Value::Null), v);
                }
            }
            (into, patch) => *into = patch,
        }
    }
    let mut value = serde_json::to_value(&settings).unwrap();
    merge(&mut value, patch);
    serde_json::from_value(value).unwrap()
}

/// Settings of a platform whose payments go to `stripe`, secrets in files under `dir`.
fn with_stripe(dir: &tempfile::TempDir, stripe: &FakeStripe) -> Settings {
    let key = dir.path().join("stripe-secret-key");
    let webhook = dir.path().join("stripe-webhook-secret");
    std::fs::write(&key, format!("{}\n", fake_stripe::SECRET_KEY)).unwrap();
    std::fs::write(&webhook, WEBHOOK_SECRET).unwrap();
    patched(
        test_settings(dir),
        json!({"payments": {"provider": "stripe", "stripe": {
            "api_base": stripe.url,
            "secret_key_file": key,
            "webhook_secret_file": webhook,
        }}}),
    )
}

async fn stripe_app(stripe: &FakeStripe) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let settings = with_stripe(&dir, stripe);
    spawn_with(settings, &ServiceName::ALL, dir).await
}

/// A pending order of one product at `price`, for a new customer named after `tag`.
async fn order_of(app: &TestApp, tag: &str, price: &str) -> String {
    let user = app.create_user(&format!("{tag}@example.com")).await;
    let product = app.create_product(&format!("SKU-{tag}"), price, 1000).await;
    app.place_order(&user, &[(&product, 1)]).await
}

async fn order_status(app: &TestApp, order: &str) -> Value {
    app.get(&format!("/api/v1/orders/{order}")).await.body["status"].clone()
}

/// Finding 3: 50 concurrent payments for one order, each with its own Idempotency-Key: the
/// provider is charged once, one 201, 49 × 409, nothing to refund.
#[tokio::test]
async fn fifty_concurrent_payments_for_one_order_charge_the_provider_once() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe).await;
    let order = order_of(&app, "fifty", "19.99").await;
    let body = json!({"order_id": order, "payment_method": "credit_card", "payment_method_token": "pm_card_visa"});
    let keys: Vec<String> = (0..50).map(|i| format!("pay-{i}")).collect();
    let answers = futures_util::future::join_all(
        keys.iter()
            .map(|key| app.post_with_key("/api/v1/payments", key, &body)),
    )
    .await;
    let created = answers
        .iter()
        .filter(|a| a.0 == StatusCode::CREATED)
        .count();
    let conflicts: Vec<&(StatusCode, String, bool)> = answers
        .iter()
        .filter(|a| a.0 == StatusCode::CONFLICT)
        .collect();
    assert_eq!(stripe.charges(), 1, "charges at the provider");
    assert_eq!((created, conflicts.len()), (1, 49), "{answers:?}");
    for (_, body, _) in conflicts {
        let problem: Value = serde_json::from_str(body).unwrap();
        assert!(
            ["/problems/payment-in-progress", "/problems/already-paid"]
                .contains(&problem["type"].as_str().unwrap()),
            "{problem}"
        );
    }
    assert!(
        stripe.refunds().is_empty(),
        "nothing taken needed refunding"
    );
    assert_eq!(order_status(&app, &order).await, "paid");
    app.stop().await;
}

/// An orders service that shows one pending order for ever and accepts every move: the payments
/// service alone decides whether another attempt may charge.
async fn orders_stub_always_pending(order_id: &str) -> (String, tokio::task::JoinHandle<()>) {
    use axum::routing::{get, post};
    let order = json!({"id": order_id, "user_id": "00000000-0000-0000-0000-0000000000aa", "status": "pending", "total_amount": 12.34, "currency": "USD"});
    let app = axum::Router::new()
        .route(
            "/internal/v1/orders/{id}",
            get(move || async move { axum::Json(order.clone()) }),
        )
        .route(
            "/internal/v1/orders/{id}/status",
            post(|| async { axum::Json(json!({})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (
        url,
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
    )
}

/// Finding 4 (payments' half): once refunded, a payment is no longer the order's success, so it
/// does not block a later attempt.
#[tokio::test]
async fn a_refunded_payment_does_not_block_a_later_attempt() {
    let order = "01a20f00-0000-7000-8000-00000000beef";
    let (orders_url, stub) = orders_stub_always_pending(order).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.orders.url = Some(orders_url);
    let app = spawn_with(
        settings,
        &[ServiceName::Gateway, ServiceName::Payments],
        dir,
    )
    .await;
    let first = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let id = first.body["id"].as_str().unwrap();
    let refund = app
        .send(Method::POST, &format!("/api/v1/payments/{id}/refund"), None)
        .await;
    assert_eq!(refund.status, StatusCode::CREATED, "{}", refund.body);
    assert_eq!(refund.body["payment"]["status"], "refunded");
    let again = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(
        again.status,
        StatusCode::CREATED,
        "a refunded payment must not count as the order's success: {}",
        again.body
    );
    let payments = app.get(&format!("/api/v1/payments/order/{order}")).await;
    let statuses: Vec<&Value> = payments.body["payments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["status"])
        .collect();
    assert_eq!(statuses, [&json!("refunded"), &json!("succeeded")]);
    app.stop().await;
    stub.abort();
}

/// Finding 5: a partial refund retried with its Idempotency-Key refunds once.
#[tokio::test]
async fn a_retried_refund_with_one_key_refunds_once() {
    let app = spawn_app().await;
    let order = order_of(&app, "refund-once", "25.00").await;
    let paid = app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    let id = paid.body["id"].as_str().unwrap();
    let path = format!("/api/v1/payments/{id}/refund");
    let body = json!({"amount": "10.00"});
    let first = app.post_with_key(&path, "refund-key-1", &body).await;
    let second = app.post_with_key(&path, "refund-key-1", &body).await;
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    assert_eq!(
        (second.0, &second.1),
        (first.0, &first.1),
        "the same answer"
    );
    let payment = app.get(&format!("/api/v1/payments/{id}")).await.body;
    assert_eq!(
        payment["refunded_amount"].as_f64(),
        Some(10.0),
        "one refund of 10.00, not two: {payment}"
    );
    assert!(second.2, "the retry is a replay");
    // The key with another amount is another request: refused, nothing refunded.
    let reused = app
        .post_with_key(&path, "refund-key-1", &json!({"amount": "5.00"}))
        .await;
    assert_eq!(reused.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", reused.1);
    // Partial refunds sum exactly: 10.00 + 0.10 + 14.90 = 25.00.
    for (key, amount) in [("refund-key-2", "0.10"), ("refund-key-3", "14.90")] {
        let a = app
            .post_with_key(&path, key, &json!({"amount": amount}))
            .await;
        assert_eq!(a.0, StatusCode::CREATED, "{}", a.1);
    }
    let payment = app.get(&format!("/api/v1/payments/{id}")).await.body;
    assert_eq!(payment["status"], "refunded", "{payment}");
    assert_eq!(payment["refunded_amount"].as_f64(), Some(25.0));
    let refunded = eventually(5, || async {
        (order_status(&app, &order).await == "refunded").then_some(())
    })
    .await;
    assert!(refunded.is_some(), "the order follows the full refund");
    app.stop().await;
}

/// Finding 7: the simulator takes no money; a production platform refuses to start with it.
#[tokio::test]
async fn the_simulator_is_refused_in_production() {
    let dir = tempfile::tempdir().unwrap();
    let settings = patched(test_settings(&dir), json!({"environment": "production"}));
    let refused = mercato::startup::start(&settings, &[ServiceName::Payments]).await;
    let Err(e) = refused else {
        panic!("a production platform started with the payment simulator");
    };
    assert!(format!("{e:#}").contains("simulator"), "{e:#}");
}

/// Finding 7: with a real provider a payment needs a payment method token; a bare request (as
/// the simulator accepts) is a 422, and a raw card number is never sent on.
#[tokio::test]
async fn with_a_real_provider_a_payment_needs_a_payment_method_token() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe).await;
    let order = order_of(&app, "token", "5.00").await;
    let bare = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "payment_method": "credit_card"}),
        )
        .await;
    assert_eq!(
        bare.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        bare.body
    );
    assert_eq!(bare.body["field"], "payment_method_token");
    let raw = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "card_number": "4242424242424242"}),
        )
        .await;
    assert_eq!(raw.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", raw.body);
    assert_eq!(stripe.charges(), 0);
    let declined = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "payment_method_token": "pm_card_chargeDeclined"}),
        )
        .await;
    assert_eq!(
        declined.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        declined.body
    );
    assert_eq!(declined.body["reason"], "card_declined");
    let payment = app
        .get(&format!(
            "/api/v1/payments/{}",
            declined.body["payment_id"].as_str().unwrap()
        ))
        .await
        .body;
    assert_eq!(payment["status"], "failed", "{payment}");
    assert_eq!(payment["provider_reference"], "pi_fake_1");
    app.stop().await;
}

/// Card numbers are kept nowhere: the payment shows the brand (from the BIN) and the last four,
/// and the database files do not hold the number.
#[tokio::test]
async fn card_numbers_are_kept_as_brand_and_last_four_only() {
    let app = spawn_app().await;
    let order = order_of(&app, "brand", "3.00").await;
    let number = "5555555555554444";
    let paid = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "card_number": number, "payment_method": "credit_card"}),
        )
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    assert_eq!(paid.body["card_brand"], "mastercard", "{}", paid.body);
    assert_eq!(paid.body["card_last4"], "4444");
    assert_eq!(paid.body["payment_method"], "credit_card");
    assert!(!paid.body.to_string().contains(number));
    // The files as the running platform has them (the WAL included).
    for entry in std::fs::read_dir(app.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(number.len()).any(|w| w == number.as_bytes()),
                "{} holds the card number",
                path.display()
            );
        }
    }
    app.stop().await;
}

/// A service token for calls to `/internal/*`, signed with the platform's service key.
fn service_token(app: &TestApp) -> String {
    let file = app.dir.path().join("auth").join("service-test.pem");
    let key = kit::auth::ServiceKey::new(kit::auth::SigningKey::from_file(&file).unwrap());
    key.token_for("orders").unwrap()
}

async fn compensate(
    app: &TestApp,
    payment: &str,
    token: Option<&str>,
    body: Value,
) -> common::Answer {
    let base = app
        .platform
        .as_ref()
        .unwrap()
        .url(ServiceName::Payments)
        .unwrap();
    let mut req = app
        .client
        .post(format!("{base}/internal/v1/payments/{payment}/compensate"))
        .json(&body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    common::answer(req.send().await.unwrap()).await
}

/// The orders service's compensation: refunds what is left of a payment, once, at the provider.
#[tokio::test]
async fn compensation_refunds_what_is_left_once_at_the_provider() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe).await;
    let order = order_of(&app, "compensate", "30.00").await;
    let paid = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "payment_method_token": "pm_card_visa"}),
        )
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    let id = paid.body["id"].as_str().unwrap();
    let part = app
        .post(
            &format!("/api/v1/payments/{id}/refund"),
            json!({"amount": "5.00"}),
        )
        .await;
    assert_eq!(part.status, StatusCode::CREATED, "{}", part.body);
    let token = service_token(&app);
    let reason = json!({"reason": "order_cancelled"});

    let anonymous = compensate(&app, id, None, reason.clone()).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let customer = compensate(&app, id, app.token.as_deref(), reason.clone()).await;
    assert_eq!(
        customer.status,
        StatusCode::UNAUTHORIZED,
        "a user is not a service"
    );
    let long = compensate(&app, id, Some(&token), json!({"reason": "x".repeat(65)})).await;
    assert_eq!(
        long.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        long.body
    );
    let unknown = compensate(
        &app,
        "01a20f00-0000-7000-8000-000000000000",
        Some(&token),
        reason.clone(),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);

    let done = compensate(&app, id, Some(&token), reason.clone()).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(done.body["status"], "refunded");
    assert_eq!(done.body["refunded_amount"].as_f64(), Some(30.0));
    let again = compensate(&app, id, Some(&token), reason.clone()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body, done.body, "idempotent");
    let refunds = stripe.refunds();
    let amounts: Vec<i64> = refunds
        .iter()
        .map(|r| r["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(
        amounts,
        [500, 2500],
        "the partial refund, then the rest, once"
    );

    let declined_order = order_of(&app, "compensate-failed", "2.00").await;
    let declined = app
        .post(
            "/api/v1/payments",
            json!({"order_id": declined_order, "payment_method_token": "pm_card_chargeDeclined"}),
        )
        .await;
    let failed = declined.body["payment_id"].as_str().unwrap();
    let refused = compensate(&app, failed, Some(&token), reason).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    app.stop().await;
}

/// `Stripe-Signature: t=..,v1=..` for `body` at `t`.
fn sign(body: &str, t: i64, secret: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

async fn webhook(app: &TestApp, body: &str, signature: Option<&str>) -> common::Answer {
    let mut req = app
        .client
        .post(format!("{}/api/v1/payments/webhooks/stripe", app.gateway))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(signature) = signature {
        req = req.header("stripe-signature", signature);
    }
    common::answer(req.send().await.unwrap()).await
}

/// A payment the provider is still processing stays pending (one attempt in flight), until
/// Stripe's signed webhook finishes it; unsigned, forged or stale webhooks are refused.
#[tokio::test]
async fn a_signed_stripe_webhook_finishes_a_pending_payment() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe).await;
    let order = order_of(&app, "webhook", "8.00").await;
    let pending = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "payment_method_token": "pm_card_processing"}),
        )
        .await;
    assert_eq!(pending.status, StatusCode::ACCEPTED, "{}", pending.body);
    assert_eq!(pending.body["status"], "pending");
    let id = pending.body["id"].as_str().unwrap().to_owned();
    let second = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "payment_method_token": "pm_card_visa"}),
        )
        .await;
    assert_eq!(second.status, StatusCode::CONFLICT, "{}", second.body);
    assert_eq!(second.body["type"], "/problems/payment-in-progress");
    assert_eq!(stripe.charges(), 1);

    let intent = stripe.settle("pi_fake_1", "succeeded");
    let event =
        json!({"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": intent}});
    let body = event.to_string();
    let now = chrono::Utc::now().timestamp();
    assert_eq!(
        webhook(&app, &body, None).await.status,
        StatusCode::BAD_REQUEST
    );
    let forged = sign(&body, now, "whsec_not_the_secret");
    assert_eq!(
        webhook(&app, &body, Some(&forged)).await.status,
        StatusCode::BAD_REQUEST
    );
    let stale = sign(&body, now - 600, WEBHOOK_SECRET);
    assert_eq!(
        webhook(&app, &body, Some(&stale)).await.status,
        StatusCode::BAD_REQUEST
    );
    let tampered = sign(&body, now, WEBHOOK_SECRET);
    let other_body = body.replace("succeeded", "canceled");
    assert_eq!(
        webhook(&app, &other_body, Some(&tampered)).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.get(&format!("/api/v1/payments/{id}")).await.body["status"],
        "pending",
        "nothing refused changed the payment"
    );

    let signed = sign(&body, now, WEBHOOK_SECRET);
    let accepted = webhook(&app, &body, Some(&signed)).await;
    assert_eq!(accepted.status, StatusCode::OK, "{}", accepted.body);
    let again = webhook(&app, &body, Some(&signed)).await;
    assert_eq!(again.status, StatusCode::OK, "a redelivery is harmless");
    let payment = app.get(&format!("/api/v1/payments/{id}")).await.body;
    assert_eq!(payment["status"], "succeeded", "{payment}");
    assert_eq!(payment["provider_reference"], "pi_fake_1");
    let paid = eventually(5, || async {
        (order_status(&app, &order).await == "paid").then_some(())
    })
    .await;
    assert!(paid.is_some(), "the order follows the payment");
    assert_eq!(stripe.charges(), 1);
    app.stop().await;
}

/// A running `mercato up` (the real binary); killed when dropped.
struct Running {
    child: Option<Child>,
    gateway: String,
    ops: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn launch(data: &std::path::Path, env: &[(&str, String)]) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mercato"));
    cmd.arg("--data-dir").arg(data).arg("up").arg("--no-demo");
    for svc in [
        "GATEWAY",
        "USERS",
        "PRODUCTS",
        "ORDERS",
        "PAYMENTS",
        "NOTIFICATIONS",
        "ANALYTICS",
    ] {
        cmd.env(format!("MERCATO_{svc}__PORT"), "0");
    }
    cmd.env("MERCATO_OPS__PORT", "0");
    cmd.env("MERCATO_AUTH__ADMIN_EMAIL", common::ADMIN_EMAIL);
    cmd.env("MERCATO_AUTH__ADMIN_PASSWORD", common::ADMIN_PASSWORD);
    cmd.env("MERCATO_LOG__LEVEL", "warn");
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.with_extension("log"))
        .unwrap();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("mercato starts");
    let stdout = child.stdout.take().unwrap();
    let (mut gateway, mut ops) = (None, None);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("gateway") {
            gateway = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("operations") {
            ops = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let (Some(gateway), Some(ops)) = (gateway, ops) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "mercato did not print its banner: {}",
            std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
        );
    };
    Running {
        child: Some(child),
        gateway,
        ops,
    }
}

async fn client_for(running: &Running) -> TestApp {
    let mut app = TestApp {
        gateway: running.gateway.clone(),
        client: reqwest::Client::new(),
        platform: None,
        dir: tempfile::tempdir().unwrap(),
        token: None,
    };
    let ready = eventually(20, || async {
        let answer = app
            .client
            .get(format!("{}/ready", running.ops))
            .send()
            .await
            .ok()?;
        (answer.status() == StatusCode::OK).then_some(())
    })
    .await;
    assert!(ready.is_some(), "the platform became ready");
    app.token = Some(
        app.sign_in(common::ADMIN_EMAIL, common::ADMIN_PASSWORD)
            .await,
    );
    app
}

/// The charge reaches the provider and the process is SIGKILLed before it hears the answer (the
/// fake Stripe kills it on receipt). After a restart the pending intent is looked up at the
/// provider by its idempotency key and finished: the order ends paid, charged once.
#[tokio::test]
async fn a_charge_taken_before_a_crash_is_recorded_after_restart_and_never_repeated() {
    let stripe = FakeStripe::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = dir.path().join("stripe-secret-key");
    std::fs::write(&key, fake_stripe::SECRET_KEY).unwrap();
    let env = [
        ("MERCATO_PAYMENTS__PROVIDER", "stripe".to_owned()),
        ("MERCATO_PAYMENTS__STRIPE__API_BASE", stripe.url.clone()),
        (
            "MERCATO_PAYMENTS__STRIPE__SECRET_KEY_FILE",
            key.display().to_string(),
        ),
        // Pending intents are looked up once they are a second old, every second.
        ("MERCATO_PAYMENTS__RECONCILE_AFTER_SECS", "1".to_owned()),
        ("MERCATO_PAYMENTS__RECONCILE_INTERVAL_SECS", "1".to_owned()),
    ];
    let mut running = launch(&data, &env);
    let app = client_for(&running).await;
    let order = order_of(&app, "crash", "42.00").await;

    let child = running.child.take().unwrap();
    stripe.kill_on_charge(child.id());
    let cut = app
        .client
        .post(format!("{}/api/v1/payments", app.gateway))
        .bearer_auth(app.token.as_deref().unwrap())
        .json(&json!({"order_id": order, "payment_method_token": "pm_card_visa"}))
        .send()
        .await;
    assert!(
        cut.as_ref().map_or(true, |r| r.status().is_server_error()),
        "the client heard no answer: {cut:?}"
    );
    let status = wait_exit(child);
    assert!(!status.success(), "killed: {status:?}");
    assert_eq!(stripe.charges(), 1, "the charge was taken before the crash");

    let running = launch(&data, &env);
    let app = client_for(&running).await;
    let finished = eventually(20, || async {
        let list = app
            .get(&format!("/api/v1/payments/order/{order}"))
            .await
            .body;
        let payment = list["payments"].as_array()?.first()?.clone();
        (payment["status"] == "succeeded").then_some(payment)
    })
    .await;
    let payment = finished.expect("the pending payment was finished after the restart");
    assert_eq!(payment["provider_reference"], "pi_fake_1");
    let paid = eventually(10, || async {
        (order_status(&app, &order).await == "paid").then_some(())
    })
    .await;
    assert!(paid.is_some(), "the order follows the recovered payment");
    let retry = app
        .post(
            "/api/v1/payments",
            json!({"order_id": order, "payment_method_token": "pm_card_visa"}),
        )
        .await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{}", retry.body);
    assert_eq!(stripe.charges(), 1, "never charged twice");
    drop(running);
}

fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("mercato did not stop within 15 s");
}
