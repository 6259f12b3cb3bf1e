//! Opening the stream and the queue a platform process uses: Kafka and SQS where configured
//! (features `kafka`, `sqs`), else the embedded bus, which is opened whenever a service that
//! uses a bus runs (its ping is reported with their readiness, and it holds the embedded topics).

use std::sync::Arc;
use std::time::Duration;

use kit::config::Settings;
use kit::server::{ReadyCheck, ready_check};
use kit::wiring::{Context as _, WiringError};

use crate::embedded::{EmbeddedBus, EmbeddedOptions};
use crate::{Queue, Stream};

/// The stream and the queue the services of this process use, with their readiness checks.
#[derive(Clone)]
pub struct Transports {
    /// The embedded bus (closed by the platform at stop; pruned by its housekeeping).
    pub embedded: EmbeddedBus,
    /// Kafka when configured, else the embedded stream.
    pub stream: Arc<dyn Stream>,
    /// SQS when configured, else the embedded queue.
    pub queue: Arc<dyn Queue>,
    /// The external queue's ping, when there is one.
    queue_ping: Option<ReadyCheck>,
}

impl Transports {
    /// Opens the external stream and queue where configured (refusing them when this build
    /// lacks their feature), then, when `needs_bus`, the embedded bus. Kafka topics are
    /// created where missing when `bus.kafka.create_topics` is on: the platform's own and
    /// `extra_topics`.
    pub async fn open(
        settings: &Settings,
        needs_bus: bool,
        extra_topics: &[&str],
    ) -> Result<Option<Transports>, WiringError> {
        let external_stream = external_stream(settings, extra_topics).await?;
        let external_queue = external_queue(settings).await?;
        if !needs_bus {
            return Ok(None);
        }
        let options = EmbeddedOptions {
            partitions: settings.bus.stream_partitions,
            visibility_timeout: Duration::from_millis(settings.bus.visibility_timeout_ms),
            max_receives: settings.bus.max_receives,
            // As the Kafka consumer's `session.timeout.ms`.
            ..EmbeddedOptions::default()
        };
        let embedded = EmbeddedBus::open(&settings.bus_url(), &settings.sqlite, options)
            .await
            .context("opening the embedded bus")?;
        let stream: Arc<dyn Stream> = match external_stream {
            Some(stream) => stream,
            None => Arc::new(embedded.clone()),
        };
        let (queue, queue_ping): (Arc<dyn Queue>, _) = match external_queue {
            Some((queue, ping)) => (queue, Some(ping)),
            None => (Arc::new(embedded.clone()), None),
        };
        // Where faults may be injected, consumers acknowledge through the `consumer-crash`
        // hook; elsewhere they never pass it.
        let (stream, queue): (Arc<dyn Stream>, Arc<dyn Queue>) = if kit::faults::allowed(settings) {
            (
                Arc::new(crate::faults::FaultyStream(stream)),
                Arc::new(crate::faults::FaultyQueue(queue)),
            )
        } else {
            (stream, queue)
        };
        Ok(Some(Transports {
            embedded,
            stream,
            queue,
            queue_ping,
        }))
    }

    /// The bus checks a service reports under `/ready`'s `dependencies` (never making it not
    /// ready): the embedded bus and, for the queue's consumer, the external queue. While the
    /// queue is down producers' outboxes hold events and the notifier waits.
    pub fn dependencies(&self, consumes_queue: bool) -> Vec<(&'static str, ReadyCheck)> {
        let bus = self.embedded.clone();
        let mut checks = vec![(
            "bus",
            ready_check(move || {
                let bus = bus.clone();
                async move { bus.ping().await.map_err(|e| e.to_string()) }
            }),
        )];
        if let (Some(ping), true) = (&self.queue_ping, consumes_queue) {
            checks.push(("queue", ping.clone()));
        }
        checks
    }
}

/// Kafka when `bus.kafka.bootstrap_servers` (`KAFKA_BOOTSTRAP_SERVERS`) is set.
#[cfg(feature = "kafka")]
async fn external_stream(
    settings: &Settings,
    extra_topics: &[&str],
) -> Result<Option<Arc<dyn Stream>>, WiringError> {
    if settings.bus.kafka.bootstrap_servers.is_none() {
        return Ok(None);
    }
    let kafka = crate::kafka::KafkaStream::new(&settings.bus.kafka).context("configuring Kafka")?;
    if settings.bus.kafka.create_topics {
        let partitions = i32::try_from(settings.bus.stream_partitions.max(1)).unwrap_or(1);
        let mut topics = vec![crate::names::ORDERS_TOPIC, crate::names::PAYMENTS_TOPIC];
        topics.extend_from_slice(extra_topics);
        kafka
            .ensure_topics(&topics, partitions)
            .await
            .context("creating the Kafka topics")?;
    }
    Ok(Some(Arc::new(kafka)))
}

#[cfg(not(feature = "kafka"))]
async fn external_stream(
    settings: &Settings,
    _extra_topics: &[&str],
) -> Result<Option<Arc<dyn Stream>>, WiringError> {
    if settings.bus.kafka.bootstrap_servers.is_some() {
        return Err(WiringError::config(
            "KAFKA_BOOTSTRAP_SERVERS is set but this binary was built without Kafka: \
             build with `cargo build --release --features kafka`, or unset it to use the embedded stream",
        ));
    }
    Ok(None)
}

/// Where the SQS API is: `bus.sqs.endpoint_url`; else none of ours when `AWS_ENDPOINT_URL_SQS`
/// or `AWS_ENDPOINT_URL` is set (the AWS SDK reads those); else the origin of a queue URL
/// that is not AWS's (an SQS-compatible server: its queue URLs are on itself); else AWS's.
#[cfg(feature = "sqs")]
fn sqs_endpoint(settings: &Settings, queue_url: &str) -> Option<String> {
    if let Some(endpoint) = &settings.bus.sqs.endpoint_url {
        return Some(endpoint.clone());
    }
    let from_env = ["AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    if from_env {
        return None;
    }
    let (scheme, rest) = queue_url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = authority.split(':').next()?;
    (!host.ends_with(".amazonaws.com") && !host.ends_with(".amazonaws.com.cn"))
        .then(|| format!("{scheme}://{authority}"))
}

/// SQS when `bus.queue_url` (`SQS_QUEUE_URL`) is set: that URL is the `order-events` queue.
/// The queue and its dead-letter queue are created where missing when `bus.sqs.create_queues`
/// is on (local servers).
#[cfg(feature = "sqs")]
async fn external_queue(
    settings: &Settings,
) -> Result<Option<(Arc<dyn Queue>, ReadyCheck)>, WiringError> {
    let Some(url) = settings.bus.queue_url.clone() else {
        return Ok(None);
    };
    let sqs = crate::sqs::SqsQueue::connect(
        settings.aws_region.clone(),
        sqs_endpoint(settings, &url),
        [(crate::names::ORDER_EVENTS_QUEUE.to_owned(), url)].into(),
    )
    .await;
    if settings.bus.sqs.create_queues {
        sqs.ensure_queues(
            crate::names::ORDER_EVENTS_QUEUE,
            settings.bus.max_receives,
            Duration::from_millis(settings.bus.visibility_timeout_ms),
        )
        .await
        .context("creating the SQS queues")?;
    }
    let pinged = sqs.clone();
    let ping = ready_check(move || {
        let sqs = pinged.clone();
        async move { sqs.ping().await.map_err(|e| e.to_string()) }
    });
    Ok(Some((Arc::new(sqs), ping)))
}

#[cfg(not(feature = "sqs"))]
async fn external_queue(
    settings: &Settings,
) -> Result<Option<(Arc<dyn Queue>, ReadyCheck)>, WiringError> {
    if settings.bus.queue_url.is_some() {
        return Err(WiringError::config(
            "SQS_QUEUE_URL is set but this binary was built without SQS: \
             build with `cargo build --release --features sqs`, or unset it to use the embedded queue",
        ));
    }
    Ok(None)
}
