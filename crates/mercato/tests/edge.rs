//! The edge under abuse, through the real gateway: rate limits per client address, per user and
//! per route class (429 problem+json with `Retry-After`, while others are served), and the
//! client address the services are told.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{spawn_with, test_settings};
use kit::config::RateLimitSettings;
use mercato::startup::ServiceName;
use reqwest::StatusCode;

/// A client whose connections come from `127.0.0.<n>` (every loopback address reaches the
/// gateway on 127.0.0.1), so one test can be several clients.
fn client_from(n: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_flood_from_one_address_gets_429_while_another_client_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.rate_limit = RateLimitSettings {
        per_address_per_sec: 5,
        ..RateLimitSettings::off()
    };
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let products = format!("{}/api/v1/products", app.gateway);

    let flooder = client_from(2);
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..40 {
        let answer = flooder.get(&products).send().await.unwrap();
        statuses.push(answer.status());
        if answer.status() == StatusCode::TOO_MANY_REQUESTS && refusal.is_none() {
            refusal = Some(answer);
        }
    }
    let served = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(
        (10..40).contains(&served),
        "a burst of 10 is served, then the flood is refused: {statuses:?}"
    );
    let refusal = refusal.expect("the flood is refused");
    let retry_after: u64 = refusal.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(
        refusal.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = refusal.json().await.unwrap();
    assert_eq!(body["status"], 429, "{body}");
    assert!(body["type"].as_str().unwrap().ends_with("rate-limited"));

    // Another address is served meanwhile.
    let neighbour = client_from(3);
    assert_eq!(
        neighbour.get(&products).send().await.unwrap().status(),
        StatusCode::OK
    );
    app.stop().await;
}

#[tokio::test]
async fn a_signed_in_user_is_limited_apart_from_others_and_sign_in_for_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.rate_limit = RateLimitSettings {
        per_user_per_sec: 3,
        sign_in_per_sec: 4,
        ..RateLimitSettings::off()
    };
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let (_, customer) = app.register("limited@example.com").await;
    let me = format!("{}/api/v1/users/me", app.gateway);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let answer = app
            .client
            .get(&me)
            .bearer_auth(&customer)
            .send()
            .await
            .unwrap();
        statuses.push(answer.status());
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // The administrator, from the same address, is another user.
    let admin = app.token.clone().unwrap();
    assert_eq!(
        app.client
            .get(&me)
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // Password guessing: sign-in attempts of all clients together are capped.
    let token = format!("{}/api/v1/auth/token", app.gateway);
    let mut guesses = Vec::new();
    for n in 0..30u8 {
        let answer = client_from(10 + n)
            .post(&token)
            .json(&serde_json::json!({"grant_type": "password", "email": "limited@example.com", "password": format!("guess {n}")}))
            .send()
            .await
            .unwrap();
        guesses.push(answer.status());
    }
    assert!(
        guesses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{guesses:?}"
    );
    assert!(
        guesses
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED || *s == StatusCode::TOO_MANY_REQUESTS),
        "{guesses:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn services_are_told_the_client_the_gateway_saw_not_what_it_claims() {
    // Over TCP as between pods, and in memory as in `mercato up`.
    for in_memory in [false, true] {
        told_the_client(in_memory).await;
    }
}

async fn told_the_client(in_memory: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.auth.login_client_max_failures = 3;
    settings.http.in_process_upstreams = in_memory;
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    app.register("throttled@example.com").await;
    let token = format!("{}/api/v1/auth/token", app.gateway);
    let guess = |client: reqwest::Client, claimed: &'static str| {
        let token = token.clone();
        async move {
            client
                .post(&token)
                .header("x-forwarded-for", claimed)
                .header("forwarded", format!("for={claimed}"))
                .json(&serde_json::json!({"grant_type": "password", "email": "nobody@example.com", "password": "wrong"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // One address claiming a new origin each time is still one client to the users service:
    // its login throttle (3 failures per client) stops it.
    let attacker = client_from(20);
    let claims = [
        "1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4", "5.5.5.5", "6.6.6.6",
    ];
    let mut statuses = Vec::new();
    for claimed in claims {
        statuses.push(guess(attacker.clone(), claimed).await);
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "forged origins dodged the throttle (in memory: {in_memory}): {statuses:?}"
    );
    // A different address is not throttled by the attacker's failures.
    assert_eq!(
        guess(client_from(21), "1.1.1.1").await,
        StatusCode::UNAUTHORIZED
    );
    app.stop().await;
}

#[tokio::test]
async fn a_hung_service_costs_only_its_own_routes_and_its_breaker_answers_at_once() {
    // Analytics is a black hole: it accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.analytics.url = Some(hole_url);
    settings.http.upstream_timeout_ms = 300;
    let app = spawn_with(settings, &common::all_but(ServiceName::Analytics), dir).await;

    // The first calls wait out the upstream timeout and open the breaker...
    for _ in 0..5 {
        assert_eq!(
            app.get("/api/v1/analytics/summary").await.status,
            StatusCode::GATEWAY_TIMEOUT
        );
    }
    // ...then its routes answer 503 at once (100 calls would take 30 s if each waited).
    let started = std::time::Instant::now();
    for _ in 0..100 {
        let a = app.get("/api/v1/analytics/summary").await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
        assert_eq!(
            a.body["type"].as_str().unwrap().rsplit('/').next(),
            Some("upstream-unavailable")
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "an open breaker still waited: {:?} for 100 calls",
        started.elapsed()
    );
    // The rest of the shop is served, and the platform stays ready.
    assert_eq!(app.get("/api/v1/products").await.status, StatusCode::OK);
    let ready = reqwest::get(format!(
        "{}/ready",
        app.platform.as_ref().unwrap().ops_url()
    ))
    .await
    .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    drop(hole);
    app.stop().await;
}

#[tokio::test]
async fn services_in_the_gateways_process_answer_in_memory_as_over_tcp() {
    for in_memory in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = test_settings(&dir);
        settings.http.in_process_upstreams = in_memory;
        let app = spawn_with(settings, &ServiceName::ALL, dir).await;
        let product = app.create_product("MEM-1", "10.00", 5).await;
        app.create_product("MEM-2", "10.00", 5).await;
        let url = |path: &str| format!("{}{path}", app.gateway);

        let found = app
            .client
            .get(url(&format!("/api/v1/products/{product}")))
            .header("x-request-id", "edge-in-memory-1")
            .send()
            .await
            .unwrap();
        assert_eq!(found.status(), StatusCode::OK, "in memory: {in_memory}");
        assert_eq!(found.headers()["x-request-id"], "edge-in-memory-1");
        let body: serde_json::Value = found.json().await.unwrap();
        assert_eq!(body["name"], "Product MEM-1");

        let missing = app
            .get(&format!("/api/v1/products/{}", uuid::Uuid::nil()))
            .await;
        assert_eq!(
            missing.status,
            StatusCode::NOT_FOUND,
            "in memory: {in_memory}"
        );
        assert_eq!(missing.content_type, "application/problem+json");
        let malformed = app.get("/api/v1/products/not-a-uuid").await;
        assert_eq!(
            malformed.status,
            StatusCode::BAD_REQUEST,
            "in memory: {in_memory}"
        );
        let paged = app.get("/api/v1/products?limit=1").await;
        assert!(paged.next.is_some(), "the Link header passes: {in_memory}");

        // A body over the limit, declared or streamed: 413 either way.
        let big = vec![b'x'; 2 * 1024 * 1024];
        let declared = app
            .send_raw(
                reqwest::Method::POST,
                "/api/v1/orders",
                "application/json",
                big,
            )
            .await;
        assert_eq!(
            declared.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "in memory: {in_memory}"
        );
        // Just over the limit, so the whole body is written before the answer comes.
        let over = vec![b'x'; 1024 * 1024 + 64 * 1024];
        let streamed = chunked_post(
            &app.gateway,
            "/api/v1/orders",
            app.token.as_deref().unwrap(),
            &over,
        )
        .await;
        assert!(
            streamed.starts_with("HTTP/1.1 413"),
            "in memory: {in_memory}: {streamed}"
        );

        // An order works end to end (who the service is told the client is: above).
        let (user, _) = app.register(&format!("mem-{in_memory}@example.com")).await;
        let order = app.place_order(&user, &[(&product, 1)]).await;
        assert!(
            app.notified(&order, "order.created").await,
            "in memory: {in_memory}"
        );
        app.stop().await;
    }
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no length declared, as a streaming client
/// sends it) and returns the status line; the server may answer before the body is sent.
async fn chunked_post(base: &str, path: &str, token: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(64 * 1024) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if stream.write_all(&framed).await.is_err() {
            break; // answered and closed early
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = vec![0u8; 1024];
    let n = stream.read(&mut answer).await.unwrap_or(0);
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn clients_abandoning_uploads_do_not_open_the_breaker_of_a_healthy_service() {
    // The soak's finding: six clients that reset their connection mid-body looked like six
    // upstream failures, so the breaker cut the users service off for everyone.
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.http.in_process_upstreams = false; // between pods
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let addr = app.gateway.trim_start_matches("http://").to_owned();
    for chunked in [true, false] {
        let uploads = (0..8).map(|_| {
            let addr = addr.clone();
            async move {
                let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
                let framing = if chunked {
                    "transfer-encoding: chunked"
                } else {
                    "content-length: 500000"
                };
                let head = format!(
                    "POST /api/v1/users HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).await.unwrap();
                let part = [b"{\"name\":\"".as_slice(), &[b'a'; 2000]].concat();
                let framed = if chunked {
                    [format!("{:x}\r\n", part.len()).as_bytes(), &part, b"\r\n"].concat()
                } else {
                    part
                };
                stream.write_all(&framed).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                // Linger 0 resets at once; the blocking-on-drop that deprecated it needs a
                // positive linger.
                #[allow(deprecated)]
                stream.set_linger(Some(std::time::Duration::ZERO)).unwrap();
                drop(stream); // a reset, as from a killed client
            }
        });
        futures_util::future::join_all(uploads).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let answer = app.get("/.well-known/jwks.json").await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "chunked: {chunked}: the users service was cut off: {}",
            answer.body
        );
    }
    app.stop().await;
}

/// Every service but the gateway, in one platform, with the settings it was started with.
async fn every_service_but_the_gateway(
    dir: &tempfile::TempDir,
) -> (kit::config::Settings, common::TestApp) {
    let settings = test_settings(dir);
    let backend = spawn_with(
        settings.clone(),
        &common::all_but(ServiceName::Gateway),
        tempfile::tempdir().unwrap(),
    )
    .await;
    (settings, backend)
}

/// Settings for a gateway of its own in front of `platform`'s services (all but products,
/// whose replicas each test names).
fn gateway_in_front_of(
    settings: &kit::config::Settings,
    platform: &mercato::startup::Platform,
) -> kit::config::Settings {
    let mut front = settings.clone();
    for (service, url) in [
        (ServiceName::Users, &mut front.users.url),
        (ServiceName::Orders, &mut front.orders.url),
        (ServiceName::Payments, &mut front.payments.service.url),
        (ServiceName::Notifications, &mut front.notifications.url),
        (ServiceName::Analytics, &mut front.analytics.url),
    ] {
        *url = platform.url(service);
    }
    front
}

#[tokio::test]
async fn a_replica_that_is_down_is_skipped_and_its_requests_go_to_the_next() {
    // Every service but the gateway in one platform; a gateway of its own in front, told of
    // two products replicas: one refusing connections, one real.
    let dir = tempfile::tempdir().unwrap();
    let (settings, backend) = every_service_but_the_gateway(&dir).await;
    let platform = backend.platform.as_ref().unwrap();
    let mut front = gateway_in_front_of(&settings, platform);
    let down = common::unreachable_url();
    front.products.url = Some(format!(
        "{down},{}",
        platform.url(ServiceName::Products).unwrap()
    ));
    let gateway = spawn_with(front, &[ServiceName::Gateway], dir).await;

    // Reads, and writes with a body: the refused connection sent nothing, so the same request
    // (body included) goes to the other replica and no client sees the dead one.
    for i in 0..20 {
        assert_eq!(gateway.get("/api/v1/products").await.status, StatusCode::OK);
        let created = gateway
            .post(
                "/api/v1/products",
                serde_json::json!({"name": format!("Replica {i}"), "price": 10.5, "stock": 3, "sku": format!("REPLICA-{i}")}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        assert_eq!(created.body["name"], format!("Replica {i}"));
    }
    gateway.stop().await;
    backend.stop().await;
}

#[tokio::test]
async fn a_replica_that_hangs_is_taken_out_of_turn_by_its_health_checks_and_back_when_it_answers() {
    // A gateway of its own over two products replicas: a real one, and one that accepts
    // connections and never answers (what a wedged process looks like: nothing is refused, so
    // only the health checks can tell).
    let dir = tempfile::tempdir().unwrap();
    let (settings, backend) = every_service_but_the_gateway(&dir).await;
    let platform = backend.platform.as_ref().unwrap();
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_address = hung.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            sockets.push(socket);
        }
    });
    let mut front = gateway_in_front_of(&settings, platform);
    front.products.url = Some(format!(
        "http://{hung_address},{}",
        platform.url(ServiceName::Products).unwrap()
    ));
    // A request sent to the hung replica would fail with 504 after this long.
    front.http.upstream_timeout_ms = 1_500;
    let gateway = spawn_with(front, &[ServiceName::Gateway], dir).await;
    let ops = gateway.platform.as_ref().unwrap().ops_url();
    let health_gauge = |healthy: u8| {
        let (client, ops) = (gateway.client.clone(), ops.clone());
        move || {
            let (client, ops) = (client.clone(), ops.clone());
            async move {
                let text = common::scrape_metrics(&client, &ops).await;
                text.lines()
                    .any(|l| {
                        l.starts_with("gateway_upstream_healthy{")
                            && l.contains(&format!("upstream=\"{hung_address}\""))
                            && l.ends_with(&format!(" {healthy}"))
                    })
                    .then_some(())
            }
        }
    };
    assert!(
        common::eventually(20, health_gauge(0)).await.is_some(),
        "the hung replica was never taken out of turn"
    );
    // Every request now goes to the replica that answers: no 504 from the hung one.
    let created = gateway
        .post(
            "/api/v1/products",
            serde_json::json!({"name": "Kept", "price": 10.5, "stock": 3, "sku": "HEALTH-1"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    for _ in 0..20 {
        let listed = gateway.get("/api/v1/products").await;
        assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
        assert_eq!(
            listed.body.as_array().map(Vec::len),
            Some(1),
            "{}",
            listed.body
        );
    }

    // The replica recovers (a real products service on its address): back in turn.
    held.abort();
    let _ = held.await;
    let revived_dir = tempfile::tempdir().unwrap();
    let mut revived_settings = test_settings(&revived_dir);
    revived_settings.products.port = hung_address.port();
    let revived = spawn_with(revived_settings, &[ServiceName::Products], revived_dir).await;
    assert!(
        common::eventually(20, health_gauge(1)).await.is_some(),
        "the replica answering again was never taken back"
    );
    let served_by_revived = common::eventually(20, || async {
        // The revived replica has an empty catalog of its own (the other one holds a product):
        // an empty page is its answer.
        let listed = gateway.get("/api/v1/products").await;
        (listed.status == StatusCode::OK
            && listed.body.as_array().is_some_and(|items| items.is_empty()))
        .then_some(())
    })
    .await;
    assert!(
        served_by_revived.is_some(),
        "no request reached the revived replica"
    );
    revived.stop().await;
    gateway.stop().await;
    backend.stop().await;
}
