//! Shared test helpers: start the platform in-process on free ports, and talk JSON to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use kit::config::Settings;
use mercato::startup::{self, Platform, ServiceName};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub struct TestApp {
    pub gateway: String,
    pub client: reqwest::Client,
    pub platform: Option<Platform>,
    pub dir: tempfile::TempDir,
    /// Sent as `Authorization: Bearer` on every request: the administrator's by default (the
    /// tests that are not about access control act as the operator), see [`TestApp::as_caller`].
    pub token: Option<String>,
}

/// The administrator every test platform starts with (`auth.admin_email`).
pub const ADMIN_EMAIL: &str = "admin@test.example";
pub const ADMIN_PASSWORD: &str = "an admin password for tests";
/// The password [`TestApp::register`] gives customers.
pub const CUSTOMER_PASSWORD: &str = "a customer password for tests";

/// Settings for a private platform: every port 0, data in a fresh directory, no demo data.
pub fn test_settings(dir: &tempfile::TempDir) -> Settings {
    let mut s = Settings {
        data_dir: dir.path().to_owned(),
        demo: false,
        ..Settings::default()
    };
    // Keys from configuration, as a deployment has them: services started separately (in
    // several `spawn_with` calls of one test) share them.
    let keys = dir.path().join("auth");
    s.auth.signing_key_file = Some(keys.join("signing-test.pem"));
    s.auth.service_key_file = Some(keys.join("service-test.pem"));
    for file in [&s.auth.signing_key_file, &s.auth.service_key_file]
        .into_iter()
        .flatten()
    {
        kit::auth::keys::key_in_file(file).unwrap();
    }
    s.auth.admin_email = Some(ADMIN_EMAIL.into());
    s.auth.admin_password = Some(kit::config::Secret(ADMIN_PASSWORD.into()));
    s.ops.port = 0;
    // Tests drive the platform far faster than a person from one address, and leave many
    // orders unpaid; the tests about limits (edge.rs, stock_and_limits.rs) turn them on.
    s.rate_limit = kit::config::RateLimitSettings::off();
    s.limits.max_pending_orders_per_user = 0;
    s.limits.max_pending_units_per_user = 0;
    for svc in [
        &mut s.gateway,
        &mut s.users,
        &mut s.products,
        &mut s.orders,
        &mut s.payments.service,
        &mut s.notifications,
        &mut s.analytics,
    ] {
        svc.port = 0;
    }
    s
}

/// A URL where nothing listens: a dependency that is down. Its port stays bound, never
/// listening, until the test process ends: connections are refused, and no other test's
/// server can be given the port and answer in its place (a released port could be).
pub fn unreachable_url() -> String {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    std::mem::forget(socket);
    format!("http://127.0.0.1:{port}")
}

/// Test settings with orders, payments and notifications on DynamoDB, in fresh tables on the
/// server at `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts moto; never skipped without
/// it), and each table's URL by its service name.
#[cfg(feature = "dynamodb")]
pub fn on_dynamodb(dir: &tempfile::TempDir) -> (Settings, impl Fn(&str) -> String + use<>) {
    let endpoint = std::env::var("TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "TEST_DYNAMODB_ENDPOINT is not set: run scripts/check-aws (it starts \
             moto[server]==5.2.1), or point it at a DynamoDB-compatible server"
        )
    });
    let run = uuid::Uuid::new_v4().simple().to_string();
    let url =
        move |table: &str| format!("dynamodb://{table}-{run}?region=us-east-1&endpoint={endpoint}");
    let mut settings = test_settings(dir);
    settings.orders.database_url = Some(url("orders"));
    settings.payments.database_url = Some(url("payments"));
    settings.notifications.database_url = Some(url("notifications"));
    settings.dynamodb.create_tables = true;
    (settings, url)
}

/// Every service but `missing`.
pub fn all_but(missing: ServiceName) -> Vec<ServiceName> {
    ServiceName::ALL
        .into_iter()
        .filter(|s| *s != missing)
        .collect()
}

pub async fn spawn_app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    spawn_with(test_settings(&dir), &ServiceName::ALL, dir).await
}

pub async fn spawn_with(
    settings: Settings,
    services: &[ServiceName],
    dir: tempfile::TempDir,
) -> TestApp {
    let platform = startup::start(&settings, services)
        .await
        .expect("platform starts");
    let mut app = TestApp {
        gateway: platform.url(ServiceName::Gateway).unwrap_or_default(),
        client: reqwest::Client::new(),
        platform: Some(platform),
        dir,
        token: None,
    };
    if services.contains(&ServiceName::Gateway) && services.contains(&ServiceName::Users) {
        app.token = Some(app.sign_in(ADMIN_EMAIL, ADMIN_PASSWORD).await);
    } else if let Some(file) = &settings.auth.signing_key_file {
        // No users service to sign in with: an administrator's token made with the key.
        let ring = kit::auth::KeyRing {
            current: kit::auth::SigningKey::from_file(file).unwrap(),
            previous: Vec::new(),
        };
        let issuer = kit::auth::TokenIssuer::new(ring, &settings.auth);
        app.token = Some(
            issuer
                .access_token(uuid::Uuid::new_v4(), kit::auth::Role::Admin)
                .unwrap()
                .token,
        );
    }
    app
}

pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
    /// The target of a `Link: <…>; rel="next"` header: the next page of a list.
    pub next: Option<String>,
}

impl TestApp {
    pub async fn stop(mut self) {
        if let Some(p) = self.platform.take() {
            p.stop().await;
        }
    }

    /// The same platform, called with `token` (`None`: anonymously).
    pub fn as_caller(&self, token: Option<&str>) -> Caller<'_> {
        Caller {
            app: self,
            token: token.map(str::to_owned),
        }
    }

    /// Signs in through the gateway; the access token.
    pub async fn sign_in(&self, email: &str, password: &str) -> String {
        let a = self
            .as_caller(None)
            .send(
                Method::POST,
                "/api/v1/auth/token",
                Some(json!({"grant_type": "password", "email": email, "password": password})),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "sign-in of {email}: {}", a.body);
        a.body["access_token"].as_str().unwrap().to_owned()
    }

    /// Registers a customer (anonymously, as a shopper would) and signs them in: (id, token).
    pub async fn register(&self, email: &str) -> (String, String) {
        let a = self
            .as_caller(None)
            .send(
                Method::POST,
                "/api/v1/users",
                Some(json!({"name": "A Customer", "email": email, "password": CUSTOMER_PASSWORD})),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        let id = a.body["id"].as_str().unwrap().to_owned();
        (id, self.sign_in(email, CUSTOMER_PASSWORD).await)
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .client
            .request(method, format!("{}{}", self.gateway, path));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    pub async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        answer(req.send().await.unwrap()).await
    }

    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Answer {
        let req = self
            .request(method, path)
            .header("content-type", content_type)
            .body(body);
        answer(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn create_user(&self, email: &str) -> String {
        let a = self
            .post(
                "/api/v1/users",
                json!({"name": "Test User", "email": email, "phone": "+1 555 010 9999"}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().unwrap().to_owned()
    }

    pub async fn create_product(&self, sku: &str, price: &str, stock: i64) -> String {
        let body = format!(
            r#"{{"name":"Product {sku}","price":{price},"stock":{stock},"sku":"{sku}","category":"test"}}"#
        );
        let a = self
            .send_raw(
                Method::POST,
                "/api/v1/products",
                "application/json",
                body.into_bytes(),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().unwrap().to_owned()
    }

    pub async fn order(&self, user: &str, items: &[(&str, i64)]) -> Answer {
        let items: Vec<Value> = items
            .iter()
            .map(|(p, q)| json!({"product_id": p, "quantity": q}))
            .collect();
        self.post(
            "/api/v1/orders",
            json!({"user_id": user, "items": items, "shipping_address": "1 Main St, Pune"}),
        )
        .await
    }

    /// Places an order that must succeed; returns its id.
    pub async fn place_order(&self, user: &str, items: &[(&str, i64)]) -> String {
        let a = self.order(user, items).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().unwrap().to_owned()
    }

    /// Waits (5 s at most) for the notifier's record of `event_type` for `order`.
    pub async fn notified(&self, order: &str, event_type: &str) -> bool {
        eventually(5, || async {
            let n = self
                .get(&format!("/api/v1/notifications?order_id={order}"))
                .await
                .body;
            n.as_array()?
                .iter()
                .any(|n| n["event_type"] == event_type)
                .then_some(())
        })
        .await
        .is_some()
    }

    /// POSTs `body` with an `Idempotency-Key`: (status, body text, whether it was a replay).
    pub async fn post_with_key(
        &self,
        path: &str,
        key: &str,
        body: &Value,
    ) -> (StatusCode, String, bool) {
        let response = self
            .request(Method::POST, path)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        (response.status(), response.text().await.unwrap(), replayed)
    }

    pub async fn stock(&self, product: &str) -> i64 {
        self.get(&format!("/api/v1/products/{product}/stock"))
            .await
            .body["stock"]
            .as_i64()
            .unwrap()
    }
}

/// The platform seen by one caller (a customer's token, or nobody's).
pub struct Caller<'a> {
    pub app: &'a TestApp,
    pub token: Option<String>,
}

impl Caller<'_> {
    pub async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = self
            .app
            .client
            .request(method, format!("{}{}", self.app.gateway, path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        answer(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(body)).await
    }
}

pub async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let next = response
        .headers()
        .get("link")
        .and_then(|v| v.to_str().ok())
        .and_then(|link| link.strip_suffix(">; rel=\"next\""))
        .and_then(|link| link.strip_prefix('<'))
        .map(str::to_owned);
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        content_type,
        body,
        next,
    }
}

/// The text of an operations listener's `/metrics` (`ops`: its base URL).
pub async fn scrape_metrics(client: &reqwest::Client, ops: &str) -> String {
    client
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `check` until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// What the saga promises whatever the stores' backend, checked through the gateway: one
/// Idempotency-Key sent 20 times concurrently makes one order, 60 concurrent orders for 20 in
/// stock make exactly 20, a payment retried with one key charges once and moves the order, and
/// the events reach the notifier through the backend's outbox. Returns (the paid order, the
/// user with its 21 orders).
pub async fn saga_keeps_its_promises(app: &TestApp, tag: &str) -> (String, String) {
    let user = app.create_user(&format!("{tag}-saga@example.com")).await;
    let product = app.create_product(&format!("{tag}-IDEM"), "9.99", 10).await;
    let body = json!({"user_id": user, "items": [{"product_id": product, "quantity": 3}], "shipping_address": "1 Key St"});
    let key = format!("{tag}-order-key");
    let answers = futures_util::future::join_all(
        (0..20).map(|_| app.post_with_key("/api/v1/orders", &key, &body)),
    )
    .await;
    let first = &answers[0];
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    assert!(answers.iter().all(|a| (a.0, &a.1) == (first.0, &first.1)));
    assert_eq!(answers.iter().filter(|a| !a.2).count(), 1, "19 replays");
    assert_eq!(app.stock(&product).await, 7);
    let order: Value = serde_json::from_str(&first.1).unwrap();
    let order = order["id"].as_str().unwrap().to_owned();

    let hot = app.create_product(&format!("{tag}-HOT"), "1.00", 20).await;
    let one = [(hot.as_str(), 1)];
    let crowd = futures_util::future::join_all((0..60).map(|_| app.order(&user, &one))).await;
    let created = crowd
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    let refused = crowd
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, refused), (20, 40));
    assert_eq!(app.stock(&hot).await, 0);
    let listed = app
        .get(&format!("/api/v1/orders/user/{user}?limit=100"))
        .await;
    assert_eq!(
        listed.body["orders"].as_array().unwrap().len(),
        21,
        "{}",
        listed.body
    );
    assert_eq!(listed.body["count"], 21);

    let pay = json!({"order_id": order});
    let key = format!("{tag}-pay-key");
    let answers = futures_util::future::join_all(
        (0..5).map(|_| app.post_with_key("/api/v1/payments", &key, &pay)),
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
    assert_eq!(
        app.get(&format!("/api/v1/orders/{order}")).await.body["status"],
        "paid"
    );
    assert!(app.notified(&order, "order.created").await);
    assert!(app.notified(&order, "order.paid").await);
    (order, user)
}

/// A PostgreSQL database for one test, dropped with it.
#[cfg(feature = "postgres")]
pub struct FreshDatabase {
    name: String,
    pub url: String,
}

#[cfg(feature = "postgres")]
impl FreshDatabase {
    /// Runs `sql` on the test server's own database, from a thread of its own (the tests'
    /// runtime cannot be blocked on).
    pub fn admin(sql: String) {
        let admin = kit::pg::test_database_url();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::Executor as _;
                let pool = sqlx::PgPool::connect(&admin).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL at {admin} (TEST_DATABASE_URL): {e}; scripts/test starts one"
                    )
                });
                pool.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
                pool.close().await;
            });
        })
        .join()
        .unwrap();
    }

    /// A database named `<prefix>_<uuid>`.
    pub fn create(prefix: &str) -> FreshDatabase {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        FreshDatabase::admin(format!("CREATE DATABASE {name}"));
        let base = kit::pg::test_database_url();
        let (server, _) = base.rsplit_once('/').unwrap();
        FreshDatabase {
            url: format!("{server}/{name}"),
            name,
        }
    }
}

#[cfg(feature = "postgres")]
impl Drop for FreshDatabase {
    fn drop(&mut self) {
        FreshDatabase::admin(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// `mercato <args> --target <target>` as the administrator (`mercato load`, `mercato verify`),
/// its output echoed for a failing test's log.
pub fn mercato_tool(target: &str, admin: (&str, &str), args: &[&str]) -> std::process::Output {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mercato"))
        .args(args)
        .args(["--target", target])
        .env("MERCATO_AUTH__ADMIN_EMAIL", admin.0)
        .env("MERCATO_AUTH__ADMIN_PASSWORD", admin.1)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "mercato {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
