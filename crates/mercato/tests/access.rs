//! Who may call what: every public route of the gateway's table tried as an anonymous caller,
//! another customer, the owner and an administrator; `/internal/*` closed to everyone but the
//! services; forged, expired and replayed tokens refused; an external OpenID Connect issuer
//! (Cognito's claims) trusted for exactly what it says; password guessing slowed down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{Answer, TestApp, answer, spawn_app, spawn_with, test_settings};
use gateway::routes::{Access, FAULT_ROUTES, OPENAPI_ROUTE, PUBLIC_ROUTES};
use kit::auth::SigningKey;
use mercato::startup::ServiceName;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ANON: usize = 0;
const OTHER: usize = 1;
const OWNER: usize = 2;
const ADMIN: usize = 3;
const CALLERS: [&str; 4] = ["anonymous", "another customer", "the owner", "admin"];

/// One route's trial: per caller, the path and body to send and the status expected.
struct Case {
    paths: [String; 4],
    bodies: [Option<Value>; 4],
    expect: [u16; 4],
}

fn same(path: String) -> [String; 4] {
    [path.clone(), path.clone(), path.clone(), path]
}

fn case(path: String, body: Option<Value>, expect: [u16; 4]) -> Case {
    Case {
        paths: same(path),
        bodies: [body.clone(), body.clone(), body.clone(), body],
        expect,
    }
}

struct World {
    app: TestApp,
    tokens: [Option<String>; 4],
    owner: String,
    owner_email: String,
    product: String,
    order: String,
    payment: String,
}

async fn world() -> World {
    let app = spawn_app().await;
    let (_, other) = app.register("other@example.com").await;
    let owner_email = "owner@example.com".to_owned();
    let (owner, owner_token) = app.register(&owner_email).await;
    let product = app.create_product("ACCESS-1", "10.00", 1000).await;
    let owner_app = app.as_caller(Some(&owner_token));
    let order = owner_app
        .post(
            "/api/v1/orders",
            json!({"items": [{"product_id": product, "quantity": 1}], "shipping_address": "1 Owner St"}),
        )
        .await;
    assert_eq!(order.status, StatusCode::CREATED, "{}", order.body);
    assert_eq!(
        order.body["user_id"],
        owner.as_str(),
        "user_id from the token"
    );
    let order = order.body["id"].as_str().unwrap().to_owned();
    let paid = owner_app
        .post("/api/v1/payments", json!({"order_id": order}))
        .await;
    assert_eq!(paid.status, StatusCode::CREATED, "{}", paid.body);
    let payment = paid.body["id"].as_str().unwrap().to_owned();
    let admin = app.token.clone();
    World {
        tokens: [None, Some(other), Some(owner_token), admin],
        app,
        owner,
        owner_email,
        product,
        order,
        payment,
    }
}

impl World {
    /// A pending order of the owner's, for each caller (cancelling and paying change it).
    async fn fresh_orders(&self) -> [String; 4] {
        let owner = self.app.as_caller(self.tokens[OWNER].as_deref());
        let mut out = Vec::new();
        for _ in 0..4 {
            let a = owner
                .post(
                    "/api/v1/orders",
                    json!({"items": [{"product_id": self.product, "quantity": 1}], "shipping_address": "1 Owner St"}),
                )
                .await;
            assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
            out.push(a.body["id"].as_str().unwrap().to_owned());
        }
        out.try_into().unwrap()
    }

    async fn cases(&self) -> BTreeMap<(&'static str, &'static str), Case> {
        let (owner, order, payment, product) =
            (&self.owner, &self.order, &self.payment, &self.product);
        let mut cases = BTreeMap::new();
        let unique_users: [Option<Value>; 4] = std::array::from_fn(|i| {
            Some(
                json!({"name": "New", "email": format!("new{i}@example.com"), "password": common::CUSTOMER_PASSWORD}),
            )
        });
        cases.insert(
            ("POST", "/api/v1/users"),
            Case {
                paths: same("/api/v1/users".into()),
                bodies: unique_users,
                expect: [201, 201, 201, 201],
            },
        );
        cases.insert(
            ("GET", "/api/v1/users"),
            case("/api/v1/users".into(), None, [401, 403, 403, 200]),
        );
        cases.insert(
            ("GET", "/api/v1/users/me"),
            case("/api/v1/users/me".into(), None, [401, 200, 200, 200]),
        );
        cases.insert(
            ("GET", "/api/v1/users/{id}"),
            case(format!("/api/v1/users/{owner}"), None, [401, 404, 200, 200]),
        );
        // Someone else's account: only an administrator may close it (the owner case is below).
        let victim = self.app.create_user("victim@example.com").await;
        cases.insert(
            ("DELETE", "/api/v1/users/{id}"),
            case(
                format!("/api/v1/users/{victim}"),
                None,
                [401, 404, 404, 204],
            ),
        );
        cases.insert(
            ("POST", "/api/v1/auth/token"),
            case(
                "/api/v1/auth/token".into(),
                Some(json!({"email": self.owner_email, "password": common::CUSTOMER_PASSWORD})),
                [200, 200, 200, 200],
            ),
        );
        cases.insert(
            ("POST", "/api/v1/auth/logout"),
            case(
                "/api/v1/auth/logout".into(),
                Some(json!({"refresh_token": "not-a-token"})),
                [204, 204, 204, 204],
            ),
        );
        cases.insert(
            ("GET", "/openapi.json"),
            case("/openapi.json".into(), None, [200, 200, 200, 200]),
        );
        cases.insert(
            ("GET", "/.well-known/jwks.json"),
            case("/.well-known/jwks.json".into(), None, [200, 200, 200, 200]),
        );
        cases.insert(
            ("GET", "/api/v1/products"),
            case("/api/v1/products".into(), None, [200, 200, 200, 200]),
        );
        cases.insert(
            ("POST", "/api/v1/products"),
            Case {
                paths: same("/api/v1/products".into()),
                bodies: std::array::from_fn(|i| {
                    Some(json!({"name": "New", "price": 1999.99, "stock": 1, "sku": format!("NEW-{i}"), "category": "x"}))
                }),
                expect: [401, 403, 403, 201],
            },
        );
        cases.insert(
            ("GET", "/api/v1/products/{id}"),
            case(
                format!("/api/v1/products/{product}"),
                None,
                [200, 200, 200, 200],
            ),
        );
        cases.insert(
            ("PUT", "/api/v1/products/{id}"),
            case(
                format!("/api/v1/products/{product}"),
                Some(json!({"price": 11.00})),
                [401, 403, 403, 200],
            ),
        );
        let doomed = self.app.create_product("DOOMED-1", "1.00", 1).await;
        cases.insert(
            ("DELETE", "/api/v1/products/{id}"),
            case(
                format!("/api/v1/products/{doomed}"),
                None,
                [401, 403, 403, 204],
            ),
        );
        cases.insert(
            ("GET", "/api/v1/products/{id}/stock"),
            case(
                format!("/api/v1/products/{product}/stock"),
                None,
                [200, 200, 200, 200],
            ),
        );
        cases.insert(
            ("PUT", "/api/v1/products/{id}/stock"),
            case(
                format!("/api/v1/products/{product}/stock"),
                Some(json!({"adjust": 1})),
                [401, 403, 403, 200],
            ),
        );
        cases.insert(
            ("POST", "/api/v1/orders"),
            case(
                "/api/v1/orders".into(),
                Some(json!({"items": [{"product_id": product, "quantity": 1}], "shipping_address": "2 Any St"})),
                [401, 201, 201, 201],
            ),
        );
        cases.insert(
            ("GET", "/api/v1/orders/{id}"),
            case(
                format!("/api/v1/orders/{order}"),
                None,
                [401, 404, 200, 200],
            ),
        );
        let cancellable = self.fresh_orders().await;
        cases.insert(
            ("PUT", "/api/v1/orders/{id}/status"),
            Case {
                paths: cancellable.map(|o| format!("/api/v1/orders/{o}/status")),
                bodies: std::array::from_fn(|_| Some(json!({"status": "cancelled"}))),
                expect: [401, 404, 200, 200],
            },
        );
        cases.insert(
            ("GET", "/api/v1/orders/user/{user_id}"),
            case(
                format!("/api/v1/orders/user/{owner}"),
                None,
                [401, 404, 200, 200],
            ),
        );
        let payable = self.fresh_orders().await;
        cases.insert(
            ("POST", "/api/v1/payments"),
            Case {
                paths: same("/api/v1/payments".into()),
                bodies: payable.map(|o| Some(json!({"order_id": o}))),
                // Someone else's order is as unknown as a missing one.
                expect: [401, 422, 201, 201],
            },
        );
        cases.insert(
            ("GET", "/api/v1/payments/{id}"),
            case(
                format!("/api/v1/payments/{payment}"),
                None,
                [401, 404, 200, 200],
            ),
        );
        cases.insert(
            ("POST", "/api/v1/payments/{id}/refund"),
            case(
                format!("/api/v1/payments/{payment}/refund"),
                Some(json!({"amount": 1.00, "reason": "access test"})),
                [401, 403, 403, 201],
            ),
        );
        // Stripe's, signed not authenticated: a token changes nothing, an unsigned call is a 400.
        cases.insert(
            ("POST", "/api/v1/payments/webhooks/stripe"),
            case(
                "/api/v1/payments/webhooks/stripe".into(),
                Some(json!({"type": "payment_intent.succeeded"})),
                [400, 400, 400, 400],
            ),
        );
        cases.insert(
            ("GET", "/api/v1/payments/order/{order_id}"),
            case(
                format!("/api/v1/payments/order/{order}"),
                None,
                [401, 404, 200, 200],
            ),
        );
        cases.insert(
            ("GET", "/api/v1/notifications"),
            case("/api/v1/notifications".into(), None, [401, 200, 200, 200]),
        );
        // Fault injection (a harmless one: a millisecond on analytics' routes, cleared by the
        // DELETE that follows in the table's order).
        cases.insert(
            ("GET", "/api/v1/admin/faults"),
            case("/api/v1/admin/faults".into(), None, [401, 403, 403, 200]),
        );
        cases.insert(
            ("DELETE", "/api/v1/admin/faults"),
            case("/api/v1/admin/faults".into(), None, [401, 403, 403, 204]),
        );
        cases.insert(
            ("PUT", "/api/v1/admin/faults/{name}"),
            case(
                "/api/v1/admin/faults/route-latency".into(),
                Some(json!({"service": "analytics", "ms": 1})),
                [401, 403, 403, 200],
            ),
        );
        cases.insert(
            ("DELETE", "/api/v1/admin/faults/{name}"),
            case(
                "/api/v1/admin/faults/route-latency".into(),
                None,
                [401, 403, 403, 204],
            ),
        );
        for template in [
            "/api/v1/analytics/windows",
            "/api/v1/analytics/summary",
            "/api/v1/analytics/top-products",
            "/api/v1/analytics/stream",
        ] {
            cases.insert(
                ("GET", template),
                case(template.into(), None, [401, 403, 403, 200]),
            );
        }
        cases
    }
}

/// Sends one request and reads the answer; an event stream is answered by its status alone.
async fn call(
    app: &TestApp,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Answer {
    let mut req = app.client.request(
        Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{}{path}", app.gateway),
    );
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let response = req.send().await.unwrap();
    if path.ends_with("/stream") {
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        return Answer {
            status: response.status(),
            content_type,
            body: Value::Null,
            next: None,
        };
    }
    answer(response).await
}

#[tokio::test]
async fn every_public_route_answers_each_caller_as_its_owner_rules_say() {
    let world = world().await;
    let mut cases = world.cases().await;
    let mut wrong = Vec::new();
    for route in PUBLIC_ROUTES
        .iter()
        .chain([&OPENAPI_ROUTE])
        .chain(FAULT_ROUTES)
    {
        let case = cases
            .remove(&(route.method, route.template))
            .unwrap_or_else(|| {
                panic!(
                    "{} {} has no entry in the access matrix: add one",
                    route.method, route.template
                )
            });
        for caller in [ANON, OTHER, OWNER, ADMIN] {
            let a = call(
                &world.app,
                world.tokens[caller].as_deref(),
                route.method,
                &case.paths[caller],
                case.bodies[caller].as_ref(),
            )
            .await;
            if a.status.as_u16() != case.expect[caller] {
                wrong.push(format!(
                    "{} {} as {}: {} (expected {}) {}",
                    route.method,
                    case.paths[caller],
                    CALLERS[caller],
                    a.status,
                    case.expect[caller],
                    a.body
                ));
            }
            // The gateway's table and the answers agree on who is refused outright.
            let refused_early = match route.access {
                Access::Anyone => false,
                Access::SignedIn => caller == ANON,
                Access::Admin => caller != ADMIN,
            };
            if refused_early {
                assert!(
                    matches!(a.status.as_u16(), 401 | 403),
                    "{} {} as {}: {}",
                    route.method,
                    route.template,
                    CALLERS[caller],
                    a.status
                );
                assert_eq!(a.content_type, "application/problem+json");
            }
        }
    }
    assert!(
        cases.is_empty(),
        "matrix entries for routes that do not exist: {:?}",
        cases.keys()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Ownership beyond the matrix: a customer cannot order, or read notifications, for
    // someone else, and may close their own account.
    let other = world.app.as_caller(world.tokens[OTHER].as_deref());
    let for_owner = other
        .post(
            "/api/v1/orders",
            json!({"user_id": world.owner, "items": [{"product_id": world.product, "quantity": 1}], "shipping_address": "x"}),
        )
        .await;
    assert_eq!(
        for_owner.status,
        StatusCode::FORBIDDEN,
        "{}",
        for_owner.body
    );
    let notes = other
        .get(&format!("/api/v1/notifications?user_id={}", world.owner))
        .await;
    assert_eq!(notes.status, StatusCode::NOT_FOUND);
    let owner = world.app.as_caller(world.tokens[OWNER].as_deref());
    let paid_order = owner
        .send(
            Method::PUT,
            &format!("/api/v1/orders/{}/status", world.order),
            Some(json!({"status": "shipped"})),
        )
        .await;
    assert_eq!(
        paid_order.status,
        StatusCode::FORBIDDEN,
        "only operators ship"
    );
    let gone = owner
        .send(
            Method::DELETE,
            &format!("/api/v1/users/{}", world.owner),
            None,
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    world.app.stop().await;
}

/// Every `/internal/*` route of every service: a 401 without a service credential (a user's
/// token, even an administrator's, is not one), and a 404 through the gateway.
#[tokio::test]
async fn internal_routes_are_for_services_only() {
    let app = spawn_app().await;
    let platform = app.platform.as_ref().unwrap();
    let id = uuid::Uuid::new_v4();
    let routes = [
        (
            ServiceName::Users,
            "GET",
            format!("/internal/v1/users/{id}"),
        ),
        (
            ServiceName::Products,
            "POST",
            "/internal/v1/reservations".to_owned(),
        ),
        (
            ServiceName::Products,
            "DELETE",
            format!("/internal/v1/reservations/{id}"),
        ),
        (
            ServiceName::Products,
            "POST",
            format!("/internal/v1/reservations/{id}/commit"),
        ),
        (
            ServiceName::Orders,
            "GET",
            format!("/internal/v1/orders/{id}"),
        ),
        (
            ServiceName::Orders,
            "POST",
            format!("/internal/v1/orders/{id}/status"),
        ),
        (
            ServiceName::Payments,
            "POST",
            format!("/internal/v1/payments/{id}/compensate"),
        ),
    ];
    let body = json!({"order_id": id, "items": [], "hold_secs": 1, "status": "paid", "reason": "order_cancelled"});
    for (service, method, path) in &routes {
        let base = platform.url(*service).unwrap();
        for token in [None, app.token.as_deref()] {
            let mut req = app
                .client
                .request(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    format!("{base}{path}"),
                )
                .json(&body);
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            let a = answer(req.send().await.unwrap()).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {base}{path}: {}",
                a.body
            );
        }
        let through_gateway = call(&app, app.token.as_deref(), method, path, Some(&body)).await;
        assert_eq!(
            through_gateway.status,
            StatusCode::NOT_FOUND,
            "{method} {path} via the gateway"
        );
    }
    // Operations endpoints are not public either.
    for path in ["/ready", "/metrics"] {
        assert_eq!(app.get(path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
    app.stop().await;
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The platform's own signing key, read from its data directory as an insider would.
fn signing_key(app: &TestApp) -> SigningKey {
    let dir = app.dir.path().join("auth");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("signing-")
        })
        .expect("a signing key in the data dir");
    SigningKey::from_file(&file).unwrap()
}

fn claims(sub: &str, overrides: Value) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = json!({
        "iss": "mercato", "aud": "mercato-api", "sub": sub, "iat": now, "nbf": now,
        "exp": now + 600, "roles": ["admin"]
    });
    for (k, v) in overrides.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

#[tokio::test]
async fn forged_expired_and_replayed_tokens_are_refused_without_detail() {
    let app = spawn_app().await;
    let (customer, customer_token) = app.register("target@example.com").await;
    let key = signing_key(&app);
    let kid = key.kid().to_owned();
    let admin_route = "/api/v1/users";
    // A genuine admin token made with the real key passes: the forgeries below differ from
    // it in one respect each.
    let genuine = key.sign("at+jwt", &claims(&customer, json!({}))).unwrap();
    assert_eq!(
        app.as_caller(Some(&genuine)).get(admin_route).await.status,
        StatusCode::OK
    );

    let header = |alg: &str, kid: &str| {
        b64(json!({"alg": alg, "typ": "JWT", "kid": kid})
            .to_string()
            .as_bytes())
    };
    let payload = b64(claims(&customer, json!({})).to_string().as_bytes());
    let alg_none = format!("{}.{payload}.", header("none", &kid));
    let public_pem = key.public_pem().unwrap();
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some(kid.clone()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        },
        &claims(&customer, json!({})),
        &jsonwebtoken::EncodingKey::from_secret(public_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let stranger = SigningKey::generate().unwrap();
    let unknown_kid = stranger
        .sign("at+jwt", &claims(&customer, json!({})))
        .unwrap();
    // Signed by another key under the real kid.
    let borrowed_kid = {
        let real = stranger
            .sign("at+jwt", &claims(&customer, json!({})))
            .unwrap();
        let mut parts: Vec<String> = real.split('.').map(str::to_owned).collect();
        parts[0] = b64(json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid})
            .to_string()
            .as_bytes());
        parts.join(".")
    };
    let now = jsonwebtoken::get_current_timestamp();
    let expired = key
        .sign(
            "at+jwt",
            &claims(
                &customer,
                json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
            ),
        )
        .unwrap();
    let wrong_aud = key
        .sign("at+jwt", &claims(&customer, json!({"aud": "another-api"})))
        .unwrap();
    let wrong_iss = key
        .sign(
            "at+jwt",
            &claims(&customer, json!({"iss": "https://evil.example"})),
        )
        .unwrap();
    // The customer's own token with its roles raised to admin, signature kept.
    let tampered = {
        let mut parts: Vec<String> = customer_token.split('.').map(str::to_owned).collect();
        use base64::Engine as _;
        let mut body: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&parts[1])
                .unwrap(),
        )
        .unwrap();
        body["roles"] = json!(["admin"]);
        parts[1] = b64(body.to_string().as_bytes());
        parts.join(".")
    };
    for (name, token) in [
        ("alg none", alg_none),
        ("HS256 with the public key", hs256),
        ("unknown kid", unknown_kid),
        ("another key under the real kid", borrowed_kid),
        ("expired", expired),
        ("wrong aud", wrong_aud),
        ("wrong iss", wrong_iss),
        ("tampered payload", tampered),
        ("not a JWT", "garbage".to_owned()),
    ] {
        for path in [admin_route, "/api/v1/users/me"] {
            let response = app
                .client
                .get(format!("{}{path}", app.gateway))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            let a = answer(response).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{name} at {path}: {}",
                a.body
            );
            assert_eq!(
                a.body["detail"], "the bearer token is not valid; sign in again",
                "{name}"
            );
            assert_eq!(
                challenge.as_deref(),
                Some(r#"Bearer realm="mercato", error="invalid_token""#),
                "{name}"
            );
        }
        // Each service checks too: the orders service reached directly refuses it.
        let orders = app
            .platform
            .as_ref()
            .unwrap()
            .url(ServiceName::Orders)
            .unwrap();
        let direct = app
            .client
            .get(format!("{orders}/api/v1/orders/user/{customer}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            direct.status(),
            StatusCode::UNAUTHORIZED,
            "{name} at orders directly"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_replayed_one_revokes_its_family() {
    let app = spawn_app().await;
    let (_, _) = app.register("rotating@example.com").await;
    let anon = app.as_caller(None);
    let login = anon
        .post(
            "/api/v1/auth/token",
            json!({"email": "rotating@example.com", "password": common::CUSTOMER_PASSWORD}),
        )
        .await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.body);
    assert_eq!(login.body["token_type"], "Bearer");
    assert_eq!(login.body["user"]["role"], "customer");
    assert!(login.body["user"].get("password_hash").is_none());
    let first = login.body["refresh_token"].as_str().unwrap().to_owned();
    let refresh = |token: &str| json!({"grant_type": "refresh_token", "refresh_token": token});

    let renewed = anon.post("/api/v1/auth/token", refresh(&first)).await;
    assert_eq!(renewed.status, StatusCode::OK, "{}", renewed.body);
    let second = renewed.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second, "rotated");
    let me = app
        .as_caller(renewed.body["access_token"].as_str())
        .get("/api/v1/users/me")
        .await;
    assert_eq!(me.body["email"], "rotating@example.com");

    // The first token again: someone replayed it, so the whole family goes.
    let replayed = anon.post("/api/v1/auth/token", refresh(&first)).await;
    assert_eq!(replayed.status, StatusCode::UNAUTHORIZED);
    let after = anon.post("/api/v1/auth/token", refresh(&second)).await;
    assert_eq!(
        after.status,
        StatusCode::UNAUTHORIZED,
        "the family is revoked"
    );

    // Signing out revokes too.
    let login = anon
        .post(
            "/api/v1/auth/token",
            json!({"email": "rotating@example.com", "password": common::CUSTOMER_PASSWORD}),
        )
        .await;
    let token = login.body["refresh_token"].as_str().unwrap().to_owned();
    let out = anon
        .post("/api/v1/auth/logout", json!({"refresh_token": token}))
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    let revoked = anon.post("/api/v1/auth/token", refresh(&token)).await;
    assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);
    let unknown = anon.post("/api/v1/auth/token", refresh("made-up")).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn failed_sign_ins_look_alike_and_are_slowed_down() {
    let app = spawn_app().await;
    app.register("guessed@example.com").await;
    let anon = app.as_caller(None);
    let wrong = anon
        .post(
            "/api/v1/auth/token",
            json!({"email": "guessed@example.com", "password": "not the password"}),
        )
        .await;
    let nobody = anon
        .post(
            "/api/v1/auth/token",
            json!({"email": "nobody@example.com", "password": "not the password"}),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        wrong.body, nobody.body,
        "an unknown e-mail answers like a wrong password"
    );
    // Four more failures reach the account's limit (5); then even the right password waits.
    for _ in 0..4 {
        let a = anon
            .post(
                "/api/v1/auth/token",
                json!({"email": "guessed@example.com", "password": "still wrong!"}),
            )
            .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let response = app
        .client
        .post(format!("{}/api/v1/auth/token", app.gateway))
        .json(&json!({"email": "guessed@example.com", "password": common::CUSTOMER_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 900, "{retry}");
    // Registration rules: a short or common password is refused.
    for password in ["short", "password123"] {
        let a = anon
            .post(
                "/api/v1/users",
                json!({"name": "X", "email": "weak@example.com", "password": password}),
            )
            .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{password}");
        assert_eq!(a.body["field"], "password");
    }
    app.stop().await;
}

/// An OpenID Connect provider of the test's own: its JWKS served on a free port.
async fn serve_jwks(key: &SigningKey) -> (String, tokio::task::JoinHandle<()>) {
    let jwks = json!({"keys": [key.public().jwk()]});
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (url, task)
}

#[tokio::test]
async fn an_external_issuers_tokens_are_trusted_with_roles_from_cognito_groups() {
    const ISSUER: &str = "https://cognito-idp.ap-south-1.amazonaws.com/ap-south-1_test";
    let provider = SigningKey::generate().unwrap();
    let (jwks_url, jwks) = serve_jwks(&provider).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.auth.issuers = vec![kit::config::ExternalIssuer {
        issuer: ISSUER.into(),
        jwks_url,
        audience: "web-client".into(),
        audience_claim: "client_id".into(),
        roles_claim: "cognito:groups".into(),
        admin_roles: vec!["admin".into()],
    }];
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let now = jsonwebtoken::get_current_timestamp();
    let cognito = |groups: Value, client: &str| {
        provider
            .sign(
                "JWT",
                &json!({
                    "iss": ISSUER, "sub": "4c1e0a4e-cognito-sub", "client_id": client,
                    "token_use": "access", "cognito:groups": groups, "iat": now, "exp": now + 600
                }),
            )
            .unwrap()
    };
    let operator = cognito(json!(["admin"]), "web-client");
    let shopper = cognito(json!(["shoppers"]), "web-client");
    let other_client = cognito(json!(["admin"]), "another-client");
    let a = app.as_caller(Some(&operator)).get("/api/v1/users").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = app.as_caller(Some(&shopper)).get("/api/v1/users").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    let a = app
        .as_caller(Some(&shopper))
        .get("/api/v1/notifications")
        .await;
    assert_eq!(a.status, StatusCode::OK, "a customer: {}", a.body);
    let a = app
        .as_caller(Some(&other_client))
        .get("/api/v1/users")
        .await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "another app client's token"
    );
    // A provider's customer, never registered here, shops with the provider's token.
    let product = app.create_product("COGNITO-1", "7.00", 5).await;
    let order = app
        .as_caller(Some(&shopper))
        .post(
            "/api/v1/orders",
            json!({"items": [{"product_id": product, "quantity": 1}], "shipping_address": "1 Cloud St"}),
        )
        .await;
    assert_eq!(order.status, StatusCode::CREATED, "{}", order.body);
    let order = order.body["id"].as_str().unwrap().to_owned();
    let seen = app
        .as_caller(Some(&shopper))
        .get(&format!("/api/v1/orders/{order}"))
        .await;
    assert_eq!(seen.status, StatusCode::OK);
    // Mercato's own tokens keep working beside the provider's.
    assert_eq!(app.get("/api/v1/users").await.status, StatusCode::OK);
    app.stop().await;
    jwks.abort();
}

/// An Idempotency-Key is the caller's own: another customer sending the same key and body gets
/// an order of their own, never the first customer's stored answer.
#[tokio::test]
async fn idempotency_keys_are_per_caller() {
    let app = spawn_app().await;
    let product = app.create_product("IDEM-SCOPE", "5.00", 10).await;
    let (_, ada) = app.register("ada-idem@example.com").await;
    let (_, bob) = app.register("bob-idem@example.com").await;
    let body =
        json!({"items": [{"product_id": product, "quantity": 1}], "shipping_address": "1 Same St"});
    let mut answers = Vec::new();
    for token in [&ada, &bob, &ada] {
        let response = app
            .client
            .post(format!("{}/api/v1/orders", app.gateway))
            .bearer_auth(token)
            .header("idempotency-key", "shared-key-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let a = answer(response).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        answers.push((
            a.body["id"].as_str().unwrap().to_owned(),
            a.body["user_id"].clone(),
            replayed,
        ));
    }
    assert_ne!(answers[0].0, answers[1].0, "Bob got an order of his own");
    assert_ne!(answers[0].1, answers[1].1);
    assert_eq!(answers[2].0, answers[0].0, "Ada's retry replays her order");
    assert_eq!(
        (answers[0].2, answers[1].2, answers[2].2),
        (false, false, true)
    );
    app.stop().await;
}
