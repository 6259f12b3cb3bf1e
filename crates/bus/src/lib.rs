//! Mercato's event plumbing.
//!
//! - [`event`]: the CloudEvents-style envelope and the payload schemas services agree on.
//! - [`Stream`] (a partitioned, replayable log with consumer groups: Kafka's model) and
//!   [`Queue`] (messages with visibility timeouts and dead-lettering: SQS's model).
//! - [`outbox`]: events are written in the same transaction as the state they describe,
//!   then relayed at least once and, per key, in commit order; consumers deduplicate by event
//!   id.
//! - [`embedded`]: both traits on one SQLite file, so `mercato up` needs nothing installed.
//! - `kafka` (feature `kafka`): [`Stream`] on a Kafka cluster (Confluent Cloud, or any
//!   Kafka-protocol broker) through rdkafka.
//! - `sqs` (feature `sqs`): [`Queue`] on Amazon SQS (or an SQS-compatible server) through the
//!   AWS SDK, dead-lettering by SQS's redrive policy.
//! - [`transports`]: opening the stream and queue a process uses (external where configured,
//!   else embedded), with their readiness checks, for the services' wiring.
//! - [`faults`]: the stream and queue as consumers see them while faults may be injected
//!   (`consumer-crash`, see `kit::faults`).

#[cfg(feature = "dynamodb")]
pub mod dynamo;
pub mod embedded;
pub mod event;
pub mod faults;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod outbox;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod trace;
pub mod transports;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

pub use event::Event;

/// Topic and queue names used across services.
pub mod names {
    pub const ORDERS_TOPIC: &str = "orders";
    pub const PAYMENTS_TOPIC: &str = "payments";
    pub const ORDER_EVENTS_QUEUE: &str = "order-events";
    /// The analytics consumer's group on the `orders` topic.
    pub const ANALYTICS_GROUP: &str = "analytics";
    /// The orders service's group on the `payments` topic (its order status listener).
    pub const ORDERS_STATUS_GROUP: &str = "orders-status";
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus storage failed: {0}")]
    Storage(#[from] rusqlite::Error),
    #[error("bus storage failed: {0}")]
    Db(#[from] kit::db::DbError),
    #[error("unsupported bus url `{0}`")]
    UnsupportedUrl(String),
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("sqs: {0}")]
    Sqs(String),
    #[error("dynamodb: {0}")]
    Dynamo(String),
    /// A failure injected on purpose (`kit::faults`), named by its fault.
    #[error("fault injected: {0}")]
    Injected(&'static str),
}

pub type Headers = BTreeMap<String, String>;

/// A record to append to a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Partitioning key: records with one key keep their order (docs/architecture.md, "Event
    /// ordering", says how far each backend guarantees it).
    pub key: String,
    pub headers: Headers,
    pub payload: Vec<u8>,
}

/// A record read back from a stream, with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub record: Record,
}

/// The entries of a batch that did not go out (their indexes in the batch) and why.
#[derive(Debug)]
pub struct Unsent {
    pub indexes: Vec<usize>,
    pub error: BusError,
}

impl Unsent {
    /// Every one of `count` entries failed for `error`.
    pub fn all(count: usize, error: BusError) -> Unsent {
        Unsent {
            indexes: (0..count).collect(),
            error,
        }
    }
}

/// A partitioned, replayable log (Kafka's model).
#[async_trait]
pub trait Stream: Send + Sync {
    /// The `messaging.system` its spans name (OpenTelemetry's value where it has one).
    fn system(&self) -> &'static str {
        "mercato"
    }

    async fn publish(&self, topic: &str, records: &[Record]) -> Result<(), BusError>;

    /// Like [`Stream::publish`], but where the backend acknowledges records one by one (Kafka
    /// does, per partition) a failed record does not fail the others: `Err` names the ones
    /// that did not go out. By default all or nothing, through `publish`.
    async fn publish_each(&self, topic: &str, records: &[Record]) -> Result<(), Unsent> {
        self.publish(topic, records)
            .await
            .map_err(|error| Unsent::all(records.len(), error))
    }

    /// Joins `group` on `topic`; the consumer resumes after the group's committed offsets.
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Box<dyn StreamConsumer>, BusError>;
}

/// What committing `delivered` means for each (topic, partition): the next offset to read,
/// one past the highest delivered. Both backends commit these.
pub fn commit_points(delivered: &[Delivered]) -> BTreeMap<(&str, u32), i64> {
    let mut next = BTreeMap::new();
    for d in delivered {
        let at = next.entry((d.topic.as_str(), d.partition)).or_insert(0);
        *at = (*at).max(d.offset + 1);
    }
    next
}

#[async_trait]
pub trait StreamConsumer: Send {
    /// Up to `max` records after the last polled position, waiting up to `wait` for the first.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivered>, BusError>;

    /// Marks everything up to and including `delivered` as processed for the group.
    async fn commit(&mut self, delivered: &[Delivered]) -> Result<(), BusError>;

    /// Records not yet committed by the group, per partition (of those this consumer holds,
    /// where the backend assigns partitions): the stream's head minus the committed offset.
    async fn lag(&mut self) -> Result<Vec<(u32, i64)>, BusError> {
        Ok(Vec::new())
    }
}

/// How often a consumer reports its lag (after a commit, at most this often).
pub const LAG_REPORT: Duration = Duration::from_secs(5);

/// Sets `stream_consumer_lag{topic, group, partition}` from [`StreamConsumer::lag`]: a lag that
/// grows is a consumer that cannot keep up, or has stopped (the `MercatoConsumerLagging` alert).
pub async fn report_lag(consumer: &mut dyn StreamConsumer, topic: &str, group: &str) {
    match consumer.lag().await {
        Ok(partitions) => {
            for (partition, lag) in partitions {
                metrics::gauge!(
                    "stream_consumer_lag",
                    "topic" => topic.to_owned(),
                    "group" => group.to_owned(),
                    "partition" => partition.to_string()
                )
                .set(lag as f64);
            }
        }
        Err(e) => tracing::warn!(topic, group, error = %e, "measuring the consumer's lag failed"),
    }
}

/// A message to send to a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub id: String,
    pub body: String,
    pub attributes: Headers,
}

/// A message received from a queue; invisible to others until deleted or released.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMessage {
    pub id: String,
    pub receipt: String,
    pub body: String,
    pub attributes: Headers,
    pub receive_count: i64,
    pub sent_at_ms: i64,
}

/// Messages with visibility timeouts, receive counts and dead-lettering (SQS's model).
#[async_trait]
pub trait Queue: Send + Sync {
    /// The `messaging.system` its spans name (OpenTelemetry's value where it has one).
    fn system(&self) -> &'static str {
        "mercato"
    }

    async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError>;

    /// Like [`Queue::send_batch`], but where the backend answers per message (SQS does) a
    /// failed message does not fail the others: `Err` names the ones that did not go out. By
    /// default all or nothing, through `send_batch`.
    async fn send_each(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), Unsent> {
        self.send_batch(queue, messages)
            .await
            .map_err(|error| Unsent::all(messages.len(), error))
    }

    /// Up to `max` visible messages, waiting up to `wait` for the first (long polling).
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, BusError>;

    /// Acknowledges a processed message.
    async fn delete(&self, queue: &str, receipt: &str) -> Result<(), BusError>;

    /// Acknowledges several processed messages at once.
    async fn delete_batch(&self, queue: &str, receipts: &[String]) -> Result<(), BusError>;

    /// Makes a failed message visible again after `delay`.
    async fn release(&self, queue: &str, receipt: &str, delay: Duration) -> Result<(), BusError>;

    /// Messages waiting (visible or in flight), for readiness and tests.
    async fn depth(&self, queue: &str) -> Result<i64, BusError>;
}

/// The dead-letter queue paired with `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}-dlq")
}
