//! The [`Queue`] contract, run unchanged against every backend: the embedded SQLite queue
//! always, SQS (an SQS-compatible server at `TEST_SQS_ENDPOINT`: moto) with feature `sqs`.
//! `scripts/check-aws` starts moto; without it the SQS tests fail, they never skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::event::types;
use bus::{Event, OutgoingMessage, Queue, ReceivedMessage, dead_letter_queue};

/// How long a message may take to show up (moto answers in milliseconds; this is a ceiling).
const PATIENCE: Duration = Duration::from_secs(30);
/// Deliveries before a message is dead-lettered, as the queue under test is set up.
const MAX_RECEIVES: i64 = 2;
/// The queue's visibility timeout: long enough that nothing reappears by itself mid-test.
const VISIBILITY: Duration = Duration::from_secs(60);
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A real event's message: every CloudEvents attribute plus `traceparent`.
fn message(n: usize) -> OutgoingMessage {
    let mut event = Event::new(
        uuid::Uuid::new_v4(),
        types::ORDER_CREATED,
        "mercato/contract",
        format!("order-{n}"),
        &serde_json::json!({ "n": n }),
    )
    .unwrap();
    event.traceparent = Some(TRACEPARENT.to_owned());
    event.to_message()
}

/// Receives until `want` messages arrived (or patience runs out), 10 at a time.
async fn receive_all(queue: &dyn Queue, name: &str, want: usize) -> Vec<ReceivedMessage> {
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < want && started.elapsed() < PATIENCE {
        got.extend(
            queue
                .receive(name, 10, Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    got
}

/// Waits until `queue` holds exactly `want` messages (SQS counts are approximate, briefly).
async fn depth_becomes(queue: &dyn Queue, name: &str, want: i64) {
    let started = Instant::now();
    loop {
        let depth = queue.depth(name).await.unwrap();
        if depth == want {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "depth of {name} stays {depth}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn nothing_visible(queue: &dyn Queue, name: &str) {
    let got = queue
        .receive(name, 10, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(
        got.is_empty(),
        "{name} handed out {:?}",
        got.iter().map(|m| &m.id).collect::<Vec<_>>()
    );
}

/// What every Queue must do. `name` is empty, and was set up with [`MAX_RECEIVES`] and
/// [`VISIBILITY`]; its dead-letter queue is `dead_letter_queue(name)`, also empty.
async fn keeps_the_contract(queue: Arc<dyn Queue>, name: &str) {
    let queue = queue.as_ref();
    assert_eq!(queue.depth(name).await.unwrap(), 0);

    // A batch larger than SQS's 10 per call arrives complete, attributes and ids intact.
    let sent: Vec<OutgoingMessage> = (0..25).map(message).collect();
    let before_ms = chrono::Utc::now().timestamp_millis();
    queue.send_batch(name, &sent).await.unwrap();
    let after_ms = chrono::Utc::now().timestamp_millis();
    depth_becomes(queue, name, 25).await;
    let got = receive_all(queue, name, 25).await;
    assert_eq!(got.len(), 25, "every message delivered once");
    let by_id: BTreeMap<&str, &OutgoingMessage> = sent.iter().map(|m| (m.id.as_str(), m)).collect();
    let ids: BTreeSet<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, by_id.keys().copied().collect(), "ids are the sent ids");
    for m in &got {
        let original = by_id[m.id.as_str()];
        assert_eq!(m.body, original.body);
        assert_eq!(m.attributes, original.attributes, "attributes round-trip");
        assert_eq!(m.attributes["traceparent"], TRACEPARENT);
        assert_eq!(m.attributes["ce_id"], m.id);
        assert_eq!(m.receive_count, 1);
        // Clocks of a server may be a little off ours.
        assert!(
            (before_ms - 5_000..=after_ms + 5_000).contains(&m.sent_at_ms),
            "sent at {} not within [{before_ms}, {after_ms}]",
            m.sent_at_ms
        );
        // The envelope is rebuilt from what the queue delivered.
        let event = Event::from_parts(&m.attributes, m.body.as_bytes()).unwrap();
        assert_eq!(event.id.to_string(), m.id);
        assert_eq!(event.traceparent.as_deref(), Some(TRACEPARENT));
    }

    // In flight: invisible to another receive, still counted.
    nothing_visible(queue, name).await;
    assert_eq!(queue.depth(name).await.unwrap(), 25);

    // Deleting removes: one alone, the rest in a batch larger than 10.
    queue.delete(name, &got[0].receipt).await.unwrap();
    depth_becomes(queue, name, 24).await;
    let rest: Vec<String> = got[1..].iter().map(|m| m.receipt.clone()).collect();
    queue.delete_batch(name, &rest).await.unwrap();
    depth_becomes(queue, name, 0).await;
    nothing_visible(queue, name).await;

    // A long poll returns as soon as a message arrives, well before its wait is over.
    let late = message(100);
    let waiting = {
        let started = Instant::now();
        let receiving = queue.receive(name, 10, Duration::from_secs(15));
        let sending = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            queue
                .send_batch(name, std::slice::from_ref(&late))
                .await
                .unwrap();
        };
        let (got, ()) = tokio::join!(receiving, sending);
        (got.unwrap(), started.elapsed())
    };
    let (got, took) = waiting;
    assert_eq!(
        got.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec![late.id.as_str()]
    );
    assert!(
        took < Duration::from_secs(5),
        "the long poll returned after {took:?}, not when the message arrived"
    );

    // Released with a delay: invisible until the delay passes, then back, counted twice.
    let released_at = Instant::now();
    queue
        .release(name, &got[0].receipt, Duration::from_secs(1))
        .await
        .unwrap();
    let early = queue.receive(name, 10, Duration::ZERO).await.unwrap();
    assert!(early.is_empty(), "visible again before its delay");
    let again = receive_all(queue, name, 1).await;
    assert_eq!(again.len(), 1);
    assert!(
        released_at.elapsed() >= Duration::from_millis(900),
        "back after {:?}, before the 1 s delay",
        released_at.elapsed()
    );
    assert_eq!(again[0].id, late.id);
    assert_eq!(again[0].receive_count, 2);
    assert_eq!(again[0].attributes, late.attributes);
    queue.delete(name, &again[0].receipt).await.unwrap();
    depth_becomes(queue, name, 0).await;

    // Received MAX_RECEIVES times without being deleted: moved to the dead-letter queue.
    let dlq = dead_letter_queue(name);
    assert_eq!(queue.depth(&dlq).await.unwrap(), 0);
    let poison = message(666);
    queue
        .send_batch(name, std::slice::from_ref(&poison))
        .await
        .unwrap();
    for n in 1..=MAX_RECEIVES {
        let got = receive_all(queue, name, 1).await;
        assert_eq!(got.len(), 1, "delivery {n} of the poison message");
        assert_eq!(got[0].id, poison.id);
        assert_eq!(got[0].receive_count, n);
        queue
            .release(name, &got[0].receipt, Duration::ZERO)
            .await
            .unwrap();
    }
    nothing_visible(queue, name).await;
    let dead = receive_all(queue, &dlq, 1).await;
    assert_eq!(dead.len(), 1, "the poison message is in {dlq}");
    assert_eq!(dead[0].id, poison.id);
    assert_eq!(dead[0].body, poison.body);
    assert_eq!(dead[0].attributes, poison.attributes);
    depth_becomes(queue, name, 0).await;
    assert_eq!(queue.depth(&dlq).await.unwrap(), 1);
    queue.delete(&dlq, &dead[0].receipt).await.unwrap();
    depth_becomes(queue, &dlq, 0).await;
}

#[tokio::test]
async fn embedded_queue_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus::embedded::EmbeddedBus::open(
        &format!("sqlite://{}/bus.db", dir.path().display()),
        &Default::default(),
        bus::embedded::EmbeddedOptions {
            max_receives: MAX_RECEIVES,
            visibility_timeout: VISIBILITY,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    keeps_the_contract(Arc::new(bus), "contract").await;
}

#[cfg(feature = "sqs")]
mod sqs {
    use super::*;
    use aws_sdk_sqs::types::QueueAttributeName;
    use bus::sqs::SqsQueue;

    pub async fn server() -> SqsQueue {
        let endpoint = std::env::var("TEST_SQS_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "TEST_SQS_ENDPOINT (URL of an SQS-compatible server) is not set: run \
                 scripts/check-aws, which installs and starts moto \
                 (pip install \"moto[server]==5.2.1\"; moto_server -p PORT)"
            )
        });
        SqsQueue::connect(Some("us-east-1".into()), Some(endpoint), BTreeMap::new()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqs_queue_keeps_the_contract() {
        let queue = server().await;
        // A queue no earlier run used.
        let name = format!("contract-{}", uuid::Uuid::new_v4().simple());
        queue
            .ensure_queues(&name, MAX_RECEIVES, VISIBILITY)
            .await
            .unwrap();
        queue.ping().await.unwrap();
        keeps_the_contract(Arc::new(queue), &name).await;
    }

    /// The dead-letter queue is found through the redrive policy, whatever its name, and a
    /// configured URL names the queue (as `SQS_QUEUE_URL` does `order-events`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn configured_urls_and_redrive_targets_name_the_queues() {
        let admin = server().await;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let (real, other_dlq) = (format!("real-{suffix}"), format!("elsewhere-{suffix}"));
        admin
            .ensure_queues(&real, MAX_RECEIVES, VISIBILITY)
            .await
            .unwrap();
        // Point `real`'s redrive policy at a plain queue of another name.
        let endpoint = std::env::var("TEST_SQS_ENDPOINT").unwrap();
        let raw = raw_client(&endpoint).await;
        let dlq_url = raw
            .create_queue()
            .queue_name(&other_dlq)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let dlq_arn = raw
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()
            .remove(&QueueAttributeName::QueueArn)
            .unwrap();
        let real_url = format!("{endpoint}/123456789012/{real}");
        raw.set_queue_attributes()
            .queue_url(&real_url)
            .attributes(
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVES})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();

        let queue = SqsQueue::connect(
            Some("us-east-1".into()),
            Some(endpoint.clone()),
            BTreeMap::from([("order-events".to_owned(), real_url)]),
        )
        .await;
        queue.ping().await.unwrap();
        let poison = message(1);
        queue
            .send_batch("order-events", std::slice::from_ref(&poison))
            .await
            .unwrap();
        for _ in 0..MAX_RECEIVES {
            let got = receive_all(&queue, "order-events", 1).await;
            assert_eq!(got.len(), 1);
            queue
                .release("order-events", &got[0].receipt, Duration::ZERO)
                .await
                .unwrap();
        }
        nothing_visible(&queue, "order-events").await;
        let dead = receive_all(&queue, "order-events-dlq", 1).await;
        assert_eq!(
            dead.len(),
            1,
            "found in {other_dlq} through the redrive policy"
        );
        assert_eq!(dead[0].id, poison.id);
        assert_eq!(admin.depth(&other_dlq).await.unwrap(), 1);
    }

    async fn raw_client(endpoint: &str) -> aws_sdk_sqs::Client {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .load()
            .await;
        aws_sdk_sqs::Client::new(&config)
    }
}
