//! The platform on a Kafka-protocol broker (feature `kafka`; `TEST_KAFKA_BROKER` names the
//! broker, which `./scripts/test` starts: tansu, fresh for each run). Without a broker these
//! tests fail loudly rather than skip.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics::engine::{Lateness, Windows};
use analytics::feed::Feed;
use analytics::results::{Emitter, ObjectSink, merge_objects};
use analytics::{AnalyticsStore, consumer};
use bus::Stream;
use bus::event::{OrderEvent, OrderEventItem, types};
use bus::kafka::KafkaStream;
use chrono::{DateTime, Utc};
use common::{eventually, spawn_with, test_settings};
use kit::Money;
use kit::config::KafkaSettings;
use mercato::startup::ServiceName;
use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(120);

fn kafka_settings() -> KafkaSettings {
    let servers = std::env::var("TEST_KAFKA_BROKER").unwrap_or_else(|_| {
        panic!(
            "TEST_KAFKA_BROKER (host:port of a Kafka-protocol broker) is not set: run \
             ./scripts/test, which installs and starts tansu \
             (cargo install tansu --locked --version 0.6.0 --features dynostore,libsql)"
        )
    });
    KafkaSettings {
        bootstrap_servers: Some(servers),
        create_topics: true,
        // tansu 0.6 cannot resume inside a produced batch (see `batch_messages`).
        batch_messages: Some(1),
        ..Default::default()
    }
}

/// Order events over ~6 minutes, then a closing burst 10 minutes later on many keys, so that
/// every partition's watermark passes every earlier window.
fn events() -> Vec<OrderEvent> {
    let start: DateTime<Utc> = "2026-11-24T10:00:00Z".parse().unwrap();
    let event = |i: u64, at: DateTime<Utc>| {
        let cents = 100 + (i * 7919 % 50_000) as i64;
        OrderEvent {
            event_id: Uuid::new_v4(),
            event_type: types::ORDER_CREATED.into(),
            order_id: Uuid::new_v4(),
            user_id: Uuid::from_u128(u128::from(i % 41)),
            total_amount: Money::from_cents(cents * 2).unwrap(),
            currency: Some("USD".into()),
            status: "pending".into(),
            items_count: 2,
            created_at: at,
            occurred_at: None,
            items: vec![OrderEventItem {
                product_id: Uuid::from_u128(u128::from(i % 11)),
                quantity: 2,
                unit_price: Money::from_cents(cents).unwrap(),
            }],
        }
    };
    let mut out: Vec<OrderEvent> = (0..360)
        .map(|i| event(i, start + chrono::Duration::seconds(i as i64)))
        .collect();
    out.extend((0..30).map(|i| event(1_000 + i, start + chrono::Duration::minutes(16))));
    out
}

async fn instance(
    dir: &std::path::Path,
    name: &str,
    sink: &ObjectSink,
    stream: Arc<dyn Stream>,
    subscription: consumer::Subscription,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let store = AnalyticsStore::open(
        &format!("sqlite://{}/{name}.db", dir.display()),
        &Default::default(),
        Windows::of_secs(60).unwrap(),
        Lateness::of_secs(30).unwrap(),
    )
    .await
    .unwrap();
    let emitter = Emitter {
        store: store.clone(),
        objects: Some(sink.clone()),
        stream: None,
        instance: name.to_owned(),
    };
    tokio::spawn(consumer::run(
        store,
        Feed::new(shutdown.clone()),
        emitter,
        stream,
        subscription,
        shutdown.clone(),
    ))
}

/// Two analytics instances in one consumer group on a 3-partition `orders` topic produce
/// partial windows that merge into exactly the windows one instance computes alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_analytics_instances_on_three_partitions_equal_one() {
    let kafka = KafkaStream::new(&kafka_settings()).unwrap();
    // A topic of its own: other tests' orders carry today's event times.
    let topic = format!("orders-{}", Uuid::new_v4().simple());
    kafka.ensure_topics(&[&topic], 3).await.unwrap();
    let stream: Arc<dyn Stream> = Arc::new(kafka);
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let solo_sink = ObjectSink::local_dir(&dir.path().join("solo")).unwrap();
    let pair_sink = ObjectSink::local_dir(&dir.path().join("pair")).unwrap();
    let group = format!("analytics-{}", Uuid::new_v4().simple());
    let subscription = |group: String| consumer::Subscription {
        topic: topic.clone(),
        group,
    };
    let tasks = vec![
        instance(
            dir.path(),
            "solo",
            &solo_sink,
            stream.clone(),
            subscription(format!("{group}-solo")),
            &shutdown,
        )
        .await,
        instance(
            dir.path(),
            "one",
            &pair_sink,
            stream.clone(),
            subscription(group.clone()),
            &shutdown,
        )
        .await,
        instance(
            dir.path(),
            "two",
            &pair_sink,
            stream.clone(),
            subscription(group.clone()),
            &shutdown,
        )
        .await,
    ];
    // Let both members join before the events arrive, so both get partitions.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let records: Vec<bus::Record> = events()
        .iter()
        .map(|e| {
            bus::Event::new(e.event_id, &e.event_type, "test", e.order_id.to_string(), e)
                .unwrap()
                .to_record()
        })
        .collect();
    stream.publish(&topic, &records).await.unwrap();

    // Six one-minute windows [10:00, 10:06) are final everywhere once the burst is read.
    let started = Instant::now();
    let (solo, pair) = loop {
        let solo = merge_objects(&solo_sink).await.unwrap();
        let pair = merge_objects(&pair_sink).await.unwrap();
        if solo.len() >= 6 && pair.len() >= 6 {
            break (solo, pair);
        }
        assert!(
            started.elapsed() < PATIENCE,
            "windows never became final: {} / {}",
            solo.len(),
            pair.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let report = |ws: &[analytics::engine::PartialWindow]| -> Vec<_> {
        ws.iter().take(6).map(|w| w.report(true)).collect()
    };
    assert_eq!(report(&pair), report(&solo));
    assert_eq!(solo.iter().take(6).map(|w| w.order_count).sum::<i64>(), 360);
    let instances: BTreeSet<String> = pair_sink
        .read_all()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.instance)
        .collect();
    assert_eq!(
        instances.len(),
        2,
        "both instances did part of the work: {instances:?}"
    );
}

/// `mercato up` with the stream on Kafka: an order goes through the outbox to the broker and
/// reaches analytics (and the notifier through the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_through_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.bus.kafka = kafka_settings();
    settings.bus.stream_partitions = 3;
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let user = app.create_user("kafka@example.com").await;
    let product = app.create_product("KAFKA-1", "1999.99", 5).await;
    let order = app
        .post(
            "/api/v1/orders",
            json!({"user_id": user, "items": [{"product_id": product, "quantity": 2}],
                   "shipping_address": "1 Broker Way"}),
        )
        .await;
    assert_eq!(order.status, StatusCode::CREATED, "{}", order.body);
    let before = Instant::now();
    let seen = eventually(PATIENCE.as_secs(), || async {
        let s = app.get("/api/v1/analytics/summary").await;
        (s.body["order_count"] == 1 && s.body["total_revenue"] == json!(3999.98)).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "the order never reached analytics through Kafka"
    );
    eprintln!(
        "order visible in analytics through Kafka after {:?}",
        before.elapsed()
    );
    app.stop().await;
}

/// A tansu broker this test starts (and stops on drop) on a port of its choosing.
struct Broker(std::process::Child);

impl Broker {
    fn start(port: u16) -> Broker {
        let tansu = std::env::var("TEST_TANSU_BIN").unwrap_or_else(|_| {
            panic!(
                "TEST_TANSU_BIN (path of the tansu binary) is not set: run ./scripts/test \
                 or scripts/check-kafka, which install it"
            )
        });
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu starts");
        Broker(child)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The broker is down: orders are still accepted (the outbox holds their events), and once
/// the broker is up they all reach analytics, each counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_accepted_while_the_broker_is_down_arrive_once_it_is_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.bus.kafka = KafkaSettings {
        bootstrap_servers: Some(format!("127.0.0.1:{port}")),
        batch_messages: Some(1),
        ..Default::default()
    };
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let user = app.create_user("down@example.com").await;
    let product = app.create_product("DOWN-1", "10.00", 50).await;
    for _ in 0..5 {
        let order = app
            .post(
                "/api/v1/orders",
                json!({"user_id": user, "items": [{"product_id": product, "quantity": 1}],
                       "shipping_address": "1 Outage Road"}),
            )
            .await;
        assert_eq!(order.status, StatusCode::CREATED, "{}", order.body);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.get("/api/v1/analytics/summary").await.body["order_count"],
        0,
        "nothing can have arrived yet"
    );

    let _broker = Broker::start(port);
    let kafka = KafkaStream::new(&KafkaSettings {
        bootstrap_servers: Some(format!("127.0.0.1:{port}")),
        ..Default::default()
    })
    .unwrap();
    let started = Instant::now();
    while kafka
        .ensure_topics(&[bus::names::ORDERS_TOPIC, bus::names::PAYMENTS_TOPIC], 3)
        .await
        .is_err()
    {
        assert!(started.elapsed() < PATIENCE, "tansu never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = eventually(PATIENCE.as_secs(), || async {
        let s = app.get("/api/v1/analytics/summary").await;
        (s.body["order_count"] == 5).then_some(s.body)
    })
    .await;
    let summary = seen.expect("the held orders reached analytics once the broker was back");
    assert_eq!(summary["total_revenue"], json!(50.0));
    eprintln!("delivered {:?} after the broker started", started.elapsed());
    // Nothing more arrives later: each order counted once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        app.get("/api/v1/analytics/summary").await.body["order_count"],
        5
    );
    app.stop().await;
}
