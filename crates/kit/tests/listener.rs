//! Every service's listener under abuse: slow clients that never finish their headers, random
//! methods that would each be a new metric series, oversized request ids, slow handlers; and
//! what well-behaved clients still get (HTTP/1.1, h2c, a drain on shutdown).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use kit::config::HttpSettings;
use kit::server::{ListenerLimits, app, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Served {
    addr: SocketAddr,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves a small router (`/ok`, `/slow` sleeping 3 s, `/id` echoing nothing) on port 0.
async fn spawn(service: &'static str, http: HttpSettings) -> Served {
    let api = Router::new().route("/ok", get(|| async { "ok" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "late"
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let done = tokio::spawn(serve(
        listener,
        app(service, api, &http),
        shutdown.clone(),
        ListenerLimits::from_settings(&http),
    ));
    Served {
        addr,
        shutdown,
        done,
    }
}

fn settings() -> HttpSettings {
    HttpSettings {
        header_read_timeout_ms: 1_000,
        request_timeout_ms: 500,
        ..HttpSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_half_open_connections_neither_stop_others_nor_stay_open() {
    let served = spawn("slowloris", settings()).await;
    // 500 clients that start a request and never finish its headers.
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut tcp = TcpStream::connect(served.addr).await.unwrap();
        tcp.write_all(b"GET /ok HTTP/1.1\r\nHost: shop\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(tcp);
    }

    // A normal client is served at once meanwhile (best of five, so a scheduler hiccup on a
    // loaded test machine is not mistaken for the server).
    let client = reqwest::Client::new();
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let answer = client
            .get(format!("http://{}/ok", served.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        fastest = fastest.min(started.elapsed());
    }
    assert!(
        fastest < Duration::from_millis(100),
        "a normal request took {fastest:?} beside 500 slow connections"
    );

    // The server drops every slow one after the header-read timeout (1 s here).
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        for tcp in &mut slow {
            let mut buf = [0u8; 256];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "slow connections were still open after 10 s"
    );
    served.shutdown.cancel();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let served = spawn("idle", settings()).await;
    let mut tcp = TcpStream::connect(served.addr).await.unwrap();
    tcp.write_all(b"GET /ok HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "a kept-alive connection that sends nothing more is closed"
    );
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    served.shutdown.cancel();
}

/// The `http_requests_total` series of `service`.
fn series(service: &str) -> usize {
    kit::telemetry::metrics()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("http_requests_total{") && l.contains(&format!("service=\"{service}\""))
        })
        .count()
}

#[tokio::test]
async fn random_methods_and_paths_add_no_metric_series() {
    let _ = kit::telemetry::metrics();
    let served = spawn("labels", settings()).await;
    let client = reqwest::Client::new();
    let send = |i: u32| {
        let client = client.clone();
        let addr = served.addr;
        async move {
            let method = reqwest::Method::from_bytes(format!("M{i:X}ETHOD").as_bytes()).unwrap();
            let status = client
                .request(method, format!("http://{addr}/x/{i}/{}", i * 7919))
                .send()
                .await
                .unwrap()
                .status();
            assert!(status.is_client_error(), "{status}");
        }
    };
    for i in 0..10 {
        send(i).await;
    }
    let before = series("labels");
    assert!(before > 0, "requests are counted");
    for i in 10..1_010 {
        send(i).await;
    }
    assert_eq!(series("labels"), before, "1,000 more methods and paths");
    served.shutdown.cancel();
}

#[tokio::test]
async fn an_unusable_request_id_is_replaced() {
    let served = spawn("request-ids", settings()).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/ok", served.addr);
    let id_of = |answer: reqwest::Response| {
        answer
            .headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    let kept = client
        .get(&url)
        .header("x-request-id", "checkout-42.a_b:c")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(kept), "checkout-42.a_b:c");
    for bad in ["x".repeat(65), "a b".to_owned(), "{\"json\":1}".to_owned()] {
        let answer = client
            .get(&url)
            .header("x-request-id", &bad)
            .send()
            .await
            .unwrap();
        let id = id_of(answer);
        assert_ne!(id, bad);
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().to_string(), id);
    }
    served.shutdown.cancel();
}

#[tokio::test]
async fn a_handler_that_does_not_answer_in_time_gets_503_problem() {
    let served = spawn("timeouts", settings()).await;
    let answer = reqwest::get(format!("http://{}/slow", served.addr))
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        body["type"].as_str().unwrap().rsplit('/').next(),
        Some("request-timeout")
    );
    served.shutdown.cancel();
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served() {
    let served = spawn("h2c", settings()).await;
    let tcp = TcpStream::connect(served.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(format!("http://{}/ok", served.addr))
        .body(axum::body::Body::empty())
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.version(), http::Version::HTTP_2);
    served.shutdown.cancel();
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let served = spawn(
        "drain",
        HttpSettings {
            request_timeout_ms: 10_000,
            drain_timeout_ms: 10_000,
            ..settings()
        },
    )
    .await;
    let url = format!("http://{}/slow", served.addr);
    let in_flight = tokio::spawn(async move { reqwest::get(url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    served.shutdown.cancel();
    let answer = in_flight.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "late");
    tokio::time::timeout(Duration::from_secs(5), served.done)
        .await
        .expect("serve returns once drained")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(served.addr).await.is_err(),
        "no new connections after shutdown"
    );
}
