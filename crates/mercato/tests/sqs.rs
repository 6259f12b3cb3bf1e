//! The platform with its queue on SQS (feature `sqs`), against moto: `TEST_SQS_ENDPOINT` names
//! a running server, and `TEST_MOTO_BIN` lets the outage test start one of its own later;
//! `scripts/check-aws` provides both. Without them these tests fail loudly rather than skip.
#![cfg(feature = "sqs")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bus::Queue as _;
use bus::event::{OrderEvent, types};
use bus::names::ORDER_EVENTS_QUEUE;
use bus::sqs::SqsQueue;
use common::{TestApp, eventually, spawn_with, test_settings};
use kit::Money;
use mercato::startup::ServiceName;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(120);
/// moto's default account, part of every queue URL it hands out.
const ACCOUNT: &str = "123456789012";

fn sqs_endpoint() -> String {
    std::env::var("TEST_SQS_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "TEST_SQS_ENDPOINT (URL of an SQS-compatible server) is not set: run \
             scripts/check-aws, which installs and starts moto (moto[server]==5.2.1)"
        )
    })
}

async fn admin(endpoint: &str) -> SqsQueue {
    SqsQueue::connect(
        Some("us-east-1".into()),
        Some(endpoint.to_owned()),
        BTreeMap::new(),
    )
    .await
}

/// The notifier's records for `order`.
async fn notifications(app: &TestApp, order: &str) -> Vec<Value> {
    app.get(&format!("/api/v1/notifications?order_id={order}"))
        .await
        .body
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `mercato up` with `SQS_QUEUE_URL` set: the notifier reads SQS (a message put there by hand
/// is notified), and an order's event goes through the outbox to SQS and is notified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_notified_through_sqs() {
    let endpoint = sqs_endpoint();
    // A queue of its own, so reruns against one server never see each other's messages.
    let name = format!("order-events-{}", Uuid::new_v4().simple());
    let url = format!("{endpoint}/{ACCOUNT}/{name}");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.bus.queue_url = Some(url.clone());
    settings.bus.sqs.create_queues = true;
    settings.aws_region = Some("us-east-1".into());
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let ready = app
        .client
        .get(format!(
            "{}/ready",
            app.platform.as_ref().unwrap().ops_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "notifications ready with SQS up"
    );

    // Only the notifier reads SQS: a message put there directly is notified.
    let queue = SqsQueue::connect(
        Some("us-east-1".into()),
        Some(endpoint.clone()),
        BTreeMap::from([(ORDER_EVENTS_QUEUE.to_owned(), url)]),
    )
    .await;
    let outside_order = Uuid::new_v4();
    let payload = OrderEvent {
        event_id: Uuid::new_v4(),
        event_type: types::ORDER_CREATED.into(),
        order_id: outside_order,
        user_id: Uuid::new_v4(),
        total_amount: Money::from_cents(1234).unwrap(),
        currency: Some("USD".into()),
        status: "pending".into(),
        items_count: 1,
        created_at: chrono::Utc::now(),
        occurred_at: None,
        items: Vec::new(),
    };
    let event = bus::Event::new(
        payload.event_id,
        types::ORDER_CREATED,
        "test",
        outside_order.to_string(),
        &payload,
    )
    .unwrap();
    queue
        .send_batch(ORDER_EVENTS_QUEUE, &[event.to_message()])
        .await
        .unwrap();
    let outside = outside_order.to_string();
    let seen = eventually(PATIENCE.as_secs(), || async {
        (notifications(&app, &outside).await.len() == 1).then_some(())
    })
    .await;
    assert!(seen.is_some(), "a message sent to SQS was never notified");

    let user = app.create_user("sqs@example.com").await;
    let product = app.create_product("SQS-1", "1999.99", 5).await;
    let before = Instant::now();
    let order = app.place_order(&user, &[(&product, 2)]).await;
    let seen = eventually(PATIENCE.as_secs(), || async {
        let n = notifications(&app, &order).await;
        (n.len() == 1).then_some(n)
    })
    .await
    .expect("the order was never notified through SQS");
    assert_eq!(seen[0]["event_type"], types::ORDER_CREATED);
    eprintln!("order notified through SQS after {:?}", before.elapsed());
    // Every message was acknowledged (deleted) once handled.
    let drained = eventually(PATIENCE.as_secs(), || async {
        (queue.depth(ORDER_EVENTS_QUEUE).await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "handled messages stay on the queue");
    app.stop().await;
}

/// A moto server this test starts (and stops on drop) on a port of its choosing.
struct Moto(std::process::Child);

impl Moto {
    fn start(port: u16) -> Moto {
        let moto = std::env::var("TEST_MOTO_BIN").unwrap_or_else(|_| {
            panic!(
                "TEST_MOTO_BIN (path of moto_server) is not set: run scripts/check-aws, which \
                 installs moto[server]==5.2.1 into ~/.cache/mercato/venv-moto"
            )
        });
        let child = std::process::Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto starts");
        Moto(child)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SQS unreachable when the platform starts and while orders are placed: the orders are
/// accepted (the outbox holds their events), and once SQS is up each is notified exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_accepted_while_sqs_is_down_are_notified_once_it_is_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    // The endpoint is the queue URL's origin: nothing else says where SQS is.
    settings.bus.queue_url = Some(format!("{endpoint}/{ACCOUNT}/{ORDER_EVENTS_QUEUE}"));
    settings.aws_region = Some("us-east-1".into());
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    // SQS down is a dependency down, not a service that cannot work: the process stays in the
    // load balancer and says what is missing.
    let ops = app.platform.as_ref().unwrap().ops_url();
    let ready = app.client.get(format!("{ops}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let ready: Value = ready.json().await.unwrap();
    assert!(
        ready["dependencies"]["notifications/queue"]
            .as_str()
            .unwrap()
            .starts_with("down"),
        "{ready}"
    );
    assert_eq!(ready["dependencies"]["orders/bus"], "up", "{ready}");
    let user = app.create_user("sqs-down@example.com").await;
    let product = app.create_product("SQS-DOWN-1", "10.00", 50).await;
    let mut orders = Vec::new();
    for _ in 0..5 {
        let order = app.order(&user, &[(&product, 1)]).await;
        assert_eq!(order.status, StatusCode::CREATED, "{}", order.body);
        orders.push(order.body["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for order in &orders {
        assert!(
            notifications(&app, order).await.is_empty(),
            "nothing can have arrived yet"
        );
    }

    let _moto = Moto::start(port);
    let sqs = admin(&endpoint).await;
    let started = Instant::now();
    while let Err(e) = sqs
        .ensure_queues(ORDER_EVENTS_QUEUE, 5, Duration::from_secs(30))
        .await
    {
        assert!(started.elapsed() < PATIENCE, "moto never answered: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_notified = eventually(PATIENCE.as_secs(), || async {
        for order in &orders {
            if notifications(&app, order).await.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        all_notified.is_some(),
        "the held orders were never notified once SQS was back"
    );
    eprintln!("notified {:?} after SQS started", started.elapsed());
    // Nothing more arrives later: each order notified once, and the queue is drained.
    let drained = eventually(PATIENCE.as_secs(), || async {
        (sqs.depth(ORDER_EVENTS_QUEUE).await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "handled messages stay on the queue");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for order in &orders {
        let n = notifications(&app, order).await;
        assert_eq!(
            n.len(),
            1,
            "order {order} notified {} times: {n:?}",
            n.len()
        );
        assert_eq!(n[0]["event_type"], types::ORDER_CREATED);
    }
    app.stop().await;
}
