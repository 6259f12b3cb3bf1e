//! [`Stream`] on Kafka through rdkafka (feature `kafka`): an idempotent producer (acks=all,
//! the record key picks the partition, so one order's events keep their order, retries
//! included; records are acknowledged one by one, [`Stream::publish_each`]), CloudEvents
//! attributes and `traceparent` as record headers, and consumer groups that commit offsets
//! only when the caller says a batch is processed. Security settings take the seed's names
//! (`KAFKA_SECURITY_PROTOCOL=SASL_SSL`, `KAFKA_SASL_MECHANISM=PLAIN`, `KAFKA_API_KEY`,
//! `KAFKA_API_SECRET`), so Confluent Cloud works unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use kit::config::KafkaSettings;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer as KafkaConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::{BusError, Delivered, Headers, Record, Stream, StreamConsumer, Unsent};

/// How long a record may wait in the producer's queue (retries included) before publish fails.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl From<KafkaError> for BusError {
    fn from(e: KafkaError) -> Self {
        BusError::Kafka(e.to_string())
    }
}

/// A Kafka cluster as a [`Stream`].
#[derive(Clone)]
pub struct KafkaStream {
    base: ClientConfig,
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaStream")
            .field(
                "bootstrap.servers",
                &self.base.get("bootstrap.servers").unwrap_or_default(),
            )
            .finish_non_exhaustive()
    }
}

/// The client settings shared by producers, consumers and the admin client.
fn base_config(settings: &KafkaSettings) -> Result<ClientConfig, BusError> {
    let servers = settings
        .bootstrap_servers
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| BusError::Kafka("bootstrap_servers is empty".into()))?;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", servers)
        .set("client.id", "mercato")
        // Fail fast in tests and at start-up rather than hang on a wrong address.
        .set("socket.connection.setup.timeout.ms", "10000");
    if let Some(protocol) = &settings.security_protocol {
        config.set("security.protocol", protocol);
    }
    if let Some(mechanism) = &settings.sasl_mechanism {
        config.set("sasl.mechanism", mechanism);
    }
    match (&settings.api_key, &settings.api_secret) {
        (Some(key), Some(secret)) => {
            config
                .set("sasl.username", key)
                .set("sasl.password", secret);
        }
        (None, None) => {}
        _ => {
            return Err(BusError::Kafka(
                "KAFKA_API_KEY and KAFKA_API_SECRET go together".into(),
            ));
        }
    }
    Ok(config)
}

impl KafkaStream {
    pub fn new(settings: &KafkaSettings) -> Result<KafkaStream, BusError> {
        let base = base_config(settings)?;
        let mut producer_config = base.clone();
        if let Some(n) = settings.batch_messages {
            producer_config.set("batch.num.messages", n.max(1).to_string());
        }
        // Idempotence keeps one partition's records in send order through retries (with at
        // most 5 requests in flight, librdkafka's own bound for it, stated here so no tuning
        // raises it). The default partitioner maps one key to one partition.
        let producer = producer_config
            .set("enable.idempotence", "true")
            .set("max.in.flight.requests.per.connection", "5")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "delivery.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create()?;
        Ok(KafkaStream { base, producer })
    }

    /// Creates `topics` with `partitions` each where missing (local brokers, tests); managed
    /// clusters get theirs from Terraform (`deploy/terraform/confluent`).
    pub async fn ensure_topics(&self, topics: &[&str], partitions: i32) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = self.base.create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&new, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(BusError::Kafka(format!("creating topic {topic}: {code}")));
                }
            }
        }
        Ok(())
    }

    /// Answers when the cluster's metadata can be fetched.
    pub async fn ping(&self) -> Result<(), BusError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(3))
                .map(|_| ())
        })
        .await
        .map_err(|e| BusError::Kafka(e.to_string()))?
        .map_err(BusError::from)
    }
}

#[async_trait]
impl Stream for KafkaStream {
    fn system(&self) -> &'static str {
        "kafka"
    }

    /// Returns once every record is acknowledged by all in-sync replicas.
    async fn publish(&self, topic: &str, records: &[Record]) -> Result<(), BusError> {
        self.publish_each(topic, records).await.map_err(|u| u.error)
    }

    /// Each record's own acknowledgement: a partition that is down fails its records only.
    async fn publish_each(&self, topic: &str, records: &[Record]) -> Result<(), Unsent> {
        // Sent in order (join_all polls, and so enqueues, them in order): one key's records
        // go to one partition in that order, and the idempotent producer keeps it through
        // retries.
        let sends = records.iter().map(|r| {
            let headers = r.headers.iter().fold(
                OwnedHeaders::new_with_capacity(r.headers.len()),
                |h, (k, v)| {
                    h.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    })
                },
            );
            let record = FutureRecord::to(topic)
                .key(&r.key)
                .payload(&r.payload)
                .headers(headers);
            self.producer.send(record, DELIVERY_TIMEOUT)
        });
        let mut unsent: Option<Unsent> = None;
        for (i, outcome) in join_all(sends).await.into_iter().enumerate() {
            if let Err((e, _)) = outcome {
                unsent
                    .get_or_insert_with(|| Unsent {
                        indexes: Vec::new(),
                        error: BusError::from(e),
                    })
                    .indexes
                    .push(i);
            }
        }
        unsent.map_or(Ok(()), Err)
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Box<dyn StreamConsumer>, BusError> {
        let consumer: KafkaConsumer = self
            .base
            .clone()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // Eager rebalancing: every member re-reads its assignment from the committed
            // offsets, the protocol every Kafka-compatible broker implements.
            .set("partition.assignment.strategy", "roundrobin")
            .set("session.timeout.ms", "10000")
            .create()?;
        consumer.subscribe(&[topic])?;
        Ok(Box::new(KafkaStreamConsumer {
            consumer: Arc::new(consumer),
            delivered: metrics::counter!(
                "stream_records_delivered_total",
                "topic" => topic.to_owned(),
                "group" => group.to_owned()
            ),
        }))
    }
}

struct KafkaStreamConsumer {
    consumer: Arc<KafkaConsumer>,
    delivered: metrics::Counter,
}

fn headers_of(message: &impl rdkafka::message::Message) -> Headers {
    let mut out = BTreeMap::new();
    if let Some(headers) = message.headers() {
        for h in headers.iter() {
            if let Some(Ok(value)) = h.value.map(std::str::from_utf8) {
                out.insert(h.key.to_owned(), value.to_owned());
            }
        }
    }
    out
}

#[async_trait]
impl StreamConsumer for KafkaStreamConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivered>, BusError> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < max {
            // After the first record, take only what has already arrived.
            let until = if out.is_empty() {
                deadline
            } else {
                tokio::time::Instant::now() + Duration::from_millis(1)
            };
            let message = match tokio::time::timeout_at(until, self.consumer.recv()).await {
                Err(_elapsed) => break,
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(m)) => m,
            };
            let partition = u32::try_from(message.partition())
                .map_err(|_| BusError::Malformed("negative partition".into()))?;
            out.push(Delivered {
                topic: message.topic().to_owned(),
                partition,
                offset: message.offset(),
                record: Record {
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default(),
                    headers: headers_of(&message),
                    payload: message.payload().unwrap_or_default().to_vec(),
                },
            });
        }
        self.delivered.increment(out.len() as u64);
        Ok(out)
    }

    async fn lag(&mut self) -> Result<Vec<(u32, i64)>, BusError> {
        let consumer = self.consumer.clone();
        // Broker round trips (the committed offsets, each partition's high watermark): off the
        // async threads.
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(5);
            let assigned = consumer.assignment()?;
            let committed = consumer.committed_offsets(assigned, timeout)?;
            let mut lags = Vec::new();
            for element in committed.elements() {
                let (low, high) =
                    consumer.fetch_watermarks(element.topic(), element.partition(), timeout)?;
                let done = match element.offset() {
                    Offset::Offset(next) => next,
                    _ => low,
                };
                let partition = u32::try_from(element.partition())
                    .map_err(|_| BusError::Malformed("negative partition".into()))?;
                lags.push((partition, (high - done).max(0)));
            }
            Ok::<_, BusError>(lags)
        })
        .await
        .map_err(|e| BusError::Kafka(e.to_string()))?
    }

    async fn commit(&mut self, delivered: &[Delivered]) -> Result<(), BusError> {
        let upto = crate::commit_points(delivered);
        if upto.is_empty() {
            return Ok(());
        }
        let mut lists = Vec::new();
        for ((topic, partition), next) in upto {
            let partition = i32::try_from(partition)
                .map_err(|_| BusError::Malformed("partition out of range".into()))?;
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(topic, partition, Offset::Offset(next))?;
            lists.push(list);
        }
        let consumer = self.consumer.clone();
        // Synchronous commits (off the async threads): the caller's next step assumes the
        // offsets are stored.
        tokio::task::spawn_blocking(move || {
            lists
                .iter()
                .try_for_each(|list| consumer.commit(list, CommitMode::Sync))
        })
        .await
        .map_err(|e| BusError::Kafka(e.to_string()))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_security_settings_map_to_librdkafka_names() {
        let settings = KafkaSettings {
            bootstrap_servers: Some("pkc-1.ap-south-1.aws.confluent.cloud:9092".into()),
            security_protocol: Some("SASL_SSL".into()),
            sasl_mechanism: Some("PLAIN".into()),
            api_key: Some("KEY".into()),
            api_secret: Some("SECRET".into()),
            create_topics: false,
            batch_messages: None,
        };
        let c = base_config(&settings).unwrap();
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(c.get("sasl.username"), Some("KEY"));
        assert_eq!(c.get("sasl.password"), Some("SECRET"));
        let half = KafkaSettings {
            api_secret: None,
            ..settings
        };
        assert!(base_config(&half).is_err());
        assert!(base_config(&KafkaSettings::default()).is_err());
    }
}
