//! [`Queue`] on Amazon SQS (feature `sqs`), or any SQS-compatible server (moto, LocalStack),
//! through the AWS SDK.
//!
//! - Queue names (`order-events`) map to queue URLs: the ones given at construction (the
//!   seed's `SQS_QUEUE_URL` is the URL of `order-events`), else `GetQueueUrl` by name, cached.
//!   A dead-letter queue (`{name}-dlq`, see [`dead_letter_queue`]) is found through its source
//!   queue's `RedrivePolicy` (`deadLetterTargetArn`), so a deployed DLQ may have any name.
//! - CloudEvents attributes and `traceparent` travel as String message attributes; the
//!   message id rides in one more attribute ([`ID_ATTRIBUTE`]) so that
//!   [`ReceivedMessage::id`] is the event id, not SQS's own `MessageId`.
//! - Dead-lettering is SQS's redrive policy (`maxReceiveCount`); [`SqsQueue::ensure_queues`]
//!   sets it up on local servers and in tests, Terraform does in AWS.
//!
//! Entries are answered one by one ([`Queue::send_each`]): the outbox relay retries the failed
//! ones only, with its own backoff (no second retry policy here).
//!
//! Order: a standard queue delivers in no particular order, so consumers of one must not rely
//! on it (they deduplicate by event id; the order consumers check versions). A FIFO queue (its
//! URL ends in `.fifo`) gets the event's subject as `MessageGroupId`: one order's messages
//! are then delivered in the order the relay sent them, which is commit order.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::Region;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use tokio::time::Instant;

use crate::{
    BusError, Headers, OutgoingMessage, Queue, ReceivedMessage, Unsent, dead_letter_queue,
};

/// The message attribute that carries [`OutgoingMessage::id`].
pub const ID_ATTRIBUTE: &str = "mercato-id";

/// SQS limits: entries per batch call, message attributes per message, bytes per batch.
const MAX_BATCH: usize = 10;
const MAX_ATTRIBUTES: usize = 10;
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// The longest long poll SQS allows.
const MAX_WAIT_SECS: u64 = 20;
/// The longest visibility timeout SQS allows (12 hours).
const MAX_VISIBILITY_SECS: u64 = 12 * 60 * 60;

fn sqs_error<E: std::error::Error>(what: &str, e: E) -> BusError {
    BusError::Sqs(format!("{what}: {}", DisplayErrorContext(e)))
}

/// SQS (or an SQS-compatible server) as a [`Queue`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: Client,
    /// Queue name -> queue URL: the configured ones, then those resolved on first use.
    urls: Arc<RwLock<BTreeMap<String, String>>>,
}

impl SqsQueue {
    /// A client for `region` (else the AWS chain's: `AWS_REGION`, profile; else the region in
    /// an `sqs.<region>.amazonaws.com` URL; else `us-east-1`) at `endpoint` (else
    /// `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL`, else AWS's), with `urls` naming queues.
    /// Credentials come from the AWS chain. Nothing is contacted yet.
    pub async fn connect(
        region: Option<String>,
        endpoint: Option<String>,
        urls: BTreeMap<String, String>,
    ) -> SqsQueue {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = region.clone() {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_sqs::config::Builder::from(&shared);
        if shared.region().is_none() {
            let region = urls
                .values()
                .find_map(|u| region_of(u))
                .unwrap_or_else(|| "us-east-1".to_owned());
            config = config.region(Region::new(region));
        }
        SqsQueue {
            client: Client::from_conf(config.build()),
            urls: Arc::new(RwLock::new(urls)),
        }
    }

    fn cached(&self, queue: &str) -> Option<String> {
        self.urls
            .read()
            .ok()
            .and_then(|urls| urls.get(queue).cloned())
    }

    fn remember(&self, queue: &str, url: &str) {
        if let Ok(mut urls) = self.urls.write() {
            urls.insert(queue.to_owned(), url.to_owned());
        }
    }

    /// The URL of `queue`: configured or cached, else the redrive target of its source queue
    /// (for `{name}-dlq`), else `GetQueueUrl` by name.
    async fn url(&self, queue: &str) -> Result<String, BusError> {
        if let Some(url) = self.cached(queue) {
            return Ok(url);
        }
        let mut sqs_name = queue.to_owned();
        let mut owner = None;
        if let Some(source) = queue.strip_suffix("-dlq").filter(|s| !s.is_empty())
            && let Some(arn) = self.redrive_target(source).await?
        {
            // arn:aws:sqs:<region>:<account>:<name>
            let mut parts = arn.rsplitn(3, ':');
            if let (Some(name), Some(account)) = (parts.next(), parts.next()) {
                sqs_name = name.to_owned();
                owner = Some(account.to_owned());
            }
        }
        let url = self.lookup(queue, &sqs_name, owner).await?;
        self.remember(queue, &url);
        Ok(url)
    }

    async fn lookup(
        &self,
        queue: &str,
        sqs_name: &str,
        owner: Option<String>,
    ) -> Result<String, BusError> {
        self.client
            .get_queue_url()
            .queue_name(sqs_name)
            .set_queue_owner_aws_account_id(owner)
            .send()
            .await
            .map_err(|e| sqs_error(&format!("resolving queue {queue}"), e))?
            .queue_url
            .ok_or_else(|| BusError::Sqs(format!("no URL for queue {queue}")))
    }

    /// The `deadLetterTargetArn` of `queue`'s redrive policy, if it has one (and `queue`
    /// exists: a DLQ may be looked up by name alone).
    async fn redrive_target(&self, queue: &str) -> Result<Option<String>, BusError> {
        let url = match self.cached(queue) {
            Some(url) => url,
            None => match self.lookup(queue, queue, None).await {
                Ok(url) => {
                    self.remember(queue, &url);
                    url
                }
                Err(_) => return Ok(None),
            },
        };
        let policy = self
            .attribute(&url, QueueAttributeName::RedrivePolicy)
            .await?;
        let Some(policy) = policy else {
            return Ok(None);
        };
        let policy: serde_json::Value = serde_json::from_str(&policy)
            .map_err(|e| BusError::Sqs(format!("RedrivePolicy of {queue}: {e}")))?;
        Ok(policy["deadLetterTargetArn"].as_str().map(str::to_owned))
    }

    async fn attributes(
        &self,
        url: &str,
        names: &[QueueAttributeName],
    ) -> Result<HashMap<QueueAttributeName, String>, BusError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| sqs_error(&format!("reading the attributes of {url}"), e))?;
        Ok(out.attributes.unwrap_or_default())
    }

    async fn attribute(
        &self,
        url: &str,
        name: QueueAttributeName,
    ) -> Result<Option<String>, BusError> {
        Ok(self
            .attributes(url, std::slice::from_ref(&name))
            .await?
            .remove(&name))
    }

    /// The SQS name of `queue`: the last segment of its configured URL, else `queue` itself.
    fn sqs_name(&self, queue: &str) -> String {
        self.cached(queue)
            .and_then(|url| url.rsplit('/').next().map(str::to_owned))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| queue.to_owned())
    }

    /// Creates `queue` and its dead-letter queue where missing, with a redrive policy that
    /// moves a message there once it was received `max_receives` times, and sets the
    /// visibility timeout (whole seconds). For local servers and tests; AWS gets its queues
    /// from Terraform.
    pub async fn ensure_queues(
        &self,
        queue: &str,
        max_receives: i64,
        visibility_timeout: Duration,
    ) -> Result<(), BusError> {
        let name = self.sqs_name(queue);
        let dlq_name = format!("{name}-dlq");
        let dlq_url = self.create(&dlq_name).await?;
        self.remember(&dead_letter_queue(queue), &dlq_url);
        let dlq_arn = self
            .attribute(&dlq_url, QueueAttributeName::QueueArn)
            .await?
            .ok_or_else(|| BusError::Sqs(format!("no ARN for queue {dlq_name}")))?;
        let url = self.create(&name).await?;
        self.remember(queue, &url);
        let policy = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": max_receives.max(1),
        });
        // Set rather than passed to CreateQueue: CreateQueue refuses an existing queue whose
        // attributes differ, and settings may have changed since it was made.
        self.client
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                seconds_up(visibility_timeout, MAX_VISIBILITY_SECS).to_string(),
            )
            .send()
            .await
            .map_err(|e| sqs_error(&format!("configuring queue {name}"), e))?;
        Ok(())
    }

    async fn create(&self, name: &str) -> Result<String, BusError> {
        self.client
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| sqs_error(&format!("creating queue {name}"), e))?
            .queue_url
            .ok_or_else(|| BusError::Sqs(format!("no URL for created queue {name}")))
    }

    /// Readiness: every configured queue answers (or, with none configured, the service does).
    pub async fn ping(&self) -> Result<(), BusError> {
        let configured: Vec<String> = self
            .urls
            .read()
            .map(|urls| urls.values().cloned().collect())
            .unwrap_or_default();
        if configured.is_empty() {
            self.client
                .list_queues()
                .max_results(1)
                .send()
                .await
                .map_err(|e| sqs_error("listing queues", e))?;
        }
        for url in configured {
            self.attribute(&url, QueueAttributeName::QueueArn).await?;
        }
        Ok(())
    }
}

/// `sqs.<region>.amazonaws.com` -> `<region>`.
fn region_of(url: &str) -> Option<String> {
    let host = url.split("://").nth(1)?.split(['/', ':']).next()?;
    let rest = host.strip_prefix("sqs.")?;
    let (region, domain) = rest.split_once('.')?;
    domain.starts_with("amazonaws.").then(|| region.to_owned())
}

/// `d` in whole seconds, rounded up (a wait or delay is never cut short), at most `max`.
fn seconds_up(d: Duration, max: u64) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs.min(max)).unwrap_or(i32::MAX)
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue, BusError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| BusError::Sqs(format!("message attribute: {e}")))
}

/// Checks `m` against SQS's attribute limit; its size as SQS counts it (body, attribute
/// names, types and values).
fn checked_size(m: &OutgoingMessage) -> Result<usize, BusError> {
    if m.attributes.len() + 1 > MAX_ATTRIBUTES {
        return Err(BusError::Malformed(format!(
            "message {} has {} attributes; SQS carries at most {} besides the id",
            m.id,
            m.attributes.len(),
            MAX_ATTRIBUTES - 1
        )));
    }
    let attribute = |name: &str, value: &str| name.len() + "String".len() + value.len();
    Ok(m.body.len()
        + attribute(ID_ATTRIBUTE, &m.id)
        + m.attributes
            .iter()
            .map(|(k, v)| attribute(k, v))
            .sum::<usize>())
}

/// One batch entry. The entry id only has to be unique in its batch (and alphanumeric): the
/// position in it.
/// One batch entry. On a FIFO queue the message group is the event's subject (its
/// partitioning key: an order id), so one order's messages are delivered in order and
/// different orders' in parallel; the event id deduplicates a resent message.
fn entry(
    index: usize,
    m: &OutgoingMessage,
    fifo: bool,
) -> Result<SendMessageBatchRequestEntry, BusError> {
    let mut builder = SendMessageBatchRequestEntry::builder()
        .id(index.to_string())
        .message_body(&m.body)
        .message_attributes(ID_ATTRIBUTE, string_attribute(&m.id)?);
    if fifo {
        let group = m
            .attributes
            .get(crate::event::attr::SUBJECT)
            .unwrap_or(&m.id);
        builder = builder
            .message_group_id(group)
            .message_deduplication_id(&m.id);
    }
    for (name, value) in &m.attributes {
        builder = builder.message_attributes(name, string_attribute(value)?);
    }
    builder
        .build()
        .map_err(|e| BusError::Sqs(format!("batch entry: {e}")))
}

/// Splits messages into batches of at most 10 entries and 256 KiB (a message larger than that
/// goes alone, and SQS refuses it).
fn batches(messages: &[OutgoingMessage]) -> Result<Vec<&[OutgoingMessage]>, BusError> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in messages.iter().enumerate() {
        let size = checked_size(m)?;
        if i > start && (i - start == MAX_BATCH || bytes + size > MAX_BATCH_BYTES) {
            out.push(&messages[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < messages.len() {
        out.push(&messages[start..]);
    }
    Ok(out)
}

fn to_received(m: Message) -> Result<ReceivedMessage, BusError> {
    let system = m.attributes.unwrap_or_default();
    let number = |name: MessageSystemAttributeName| -> i64 {
        system
            .get(&name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    let receive_count = number(MessageSystemAttributeName::ApproximateReceiveCount);
    let sent_at_ms = number(MessageSystemAttributeName::SentTimestamp);
    let mut attributes = Headers::new();
    let mut id = None;
    for (name, value) in m.message_attributes.unwrap_or_default() {
        let Some(text) = value.string_value else {
            continue; // binary attributes come from other producers; ours are all strings
        };
        if name == ID_ATTRIBUTE {
            id = Some(text);
        } else {
            attributes.insert(name, text);
        }
    }
    let receipt = m
        .receipt_handle
        .ok_or_else(|| BusError::Sqs("received a message without a receipt handle".into()))?;
    Ok(ReceivedMessage {
        // A message another producer sent has no id of ours: SQS's own then.
        id: id.or(m.message_id).unwrap_or_default(),
        receipt,
        body: m.body.unwrap_or_default(),
        attributes,
        receive_count,
        sent_at_ms,
    })
}

#[async_trait]
impl Queue for SqsQueue {
    fn system(&self) -> &'static str {
        "aws_sqs"
    }

    async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError> {
        self.send_each(queue, messages).await.map_err(|u| u.error)
    }

    /// SQS answers per entry: the entries that failed, and those of batches that failed as a
    /// whole, are the unsent ones.
    async fn send_each(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), Unsent> {
        if messages.is_empty() {
            return Ok(());
        }
        let url = self
            .url(queue)
            .await
            .map_err(|e| Unsent::all(messages.len(), e))?;
        let fifo = url.ends_with(".fifo");
        let mut unsent: Option<Unsent> = None;
        let mut fail = |indexes: &mut dyn Iterator<Item = usize>, error: BusError| {
            let u = unsent.get_or_insert_with(|| Unsent {
                indexes: Vec::new(),
                error,
            });
            u.indexes.extend(indexes);
        };
        let mut offset = 0;
        for batch in batches(messages).map_err(|e| Unsent::all(messages.len(), e))? {
            let range = offset..offset + batch.len();
            offset += batch.len();
            let entries = match batch
                .iter()
                .enumerate()
                .map(|(i, m)| entry(i, m, fifo))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(entries) => entries,
                Err(e) => {
                    fail(&mut range.clone(), e);
                    continue;
                }
            };
            let out = match self
                .client
                .send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    fail(
                        &mut range.clone(),
                        sqs_error(&format!("sending to {queue}"), e),
                    );
                    continue;
                }
            };
            if let Some(first) = out.failed.first() {
                let error = BusError::Sqs(format!(
                    "sending to {queue}: {} of the batch failed, e.g. {}: {}",
                    out.failed.len(),
                    first.code,
                    first.message.as_deref().unwrap_or("no message")
                ));
                // Entry ids are their indexes in the batch; one SQS cannot place fails all.
                let failed: Vec<usize> = out
                    .failed
                    .iter()
                    .map(|f| f.id.parse::<usize>().ok().map(|i| range.start + i))
                    .collect::<Option<_>>()
                    .unwrap_or_else(|| range.clone().collect());
                fail(&mut failed.into_iter(), error);
            }
        }
        unsent.map_or(Ok(()), Err)
    }

    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, BusError> {
        let url = self.url(queue).await?;
        let max = i32::try_from(max.clamp(1, MAX_BATCH)).unwrap_or(1);
        let deadline = Instant::now() + wait;
        // One long poll covers 20 s at most; a longer wait takes several.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let out = self
                .client
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(max)
                .wait_time_seconds(seconds_up(left, MAX_WAIT_SECS))
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await
                .map_err(|e| sqs_error(&format!("receiving from {queue}"), e))?;
            let messages = out.messages.unwrap_or_default();
            if !messages.is_empty() || Instant::now() >= deadline {
                return messages.into_iter().map(to_received).collect();
            }
        }
    }

    async fn delete(&self, queue: &str, receipt: &str) -> Result<(), BusError> {
        let url = self.url(queue).await?;
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| sqs_error(&format!("deleting from {queue}"), e))?;
        Ok(())
    }

    async fn delete_batch(&self, queue: &str, receipts: &[String]) -> Result<(), BusError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let url = self.url(queue).await?;
        for chunk in receipts.chunks(MAX_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .build()
                        .map_err(|e| BusError::Sqs(format!("delete entry: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| sqs_error(&format!("deleting from {queue}"), e))?;
            if let Some(failed) = out.failed.first() {
                // Not lost: the message comes back after its visibility timeout and is
                // recognised as a duplicate.
                return Err(BusError::Sqs(format!(
                    "deleting from {queue}: {} of the batch failed, e.g. {}: {}",
                    out.failed.len(),
                    failed.code,
                    failed.message.as_deref().unwrap_or("no message")
                )));
            }
        }
        Ok(())
    }

    async fn release(&self, queue: &str, receipt: &str, delay: Duration) -> Result<(), BusError> {
        let url = self.url(queue).await?;
        self.client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds_up(delay, MAX_VISIBILITY_SECS))
            .send()
            .await
            .map_err(|e| sqs_error(&format!("releasing a message of {queue}"), e))?;
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<i64, BusError> {
        let url = self.url(queue).await?;
        let names = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ];
        let attributes = self.attributes(&url, &names).await?;
        Ok(names
            .iter()
            .filter_map(|n| attributes.get(n).and_then(|v| v.parse::<i64>().ok()))
            .sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, body_bytes: usize, attributes: usize) -> OutgoingMessage {
        OutgoingMessage {
            id: id.into(),
            body: "x".repeat(body_bytes),
            attributes: (0..attributes)
                .map(|i| (format!("a{i}"), "v".to_owned()))
                .collect(),
        }
    }

    #[test]
    fn batches_hold_at_most_ten_entries_and_256_kib() {
        let small: Vec<_> = (0..23).map(|i| message(&i.to_string(), 10, 2)).collect();
        let sizes: Vec<usize> = batches(&small).unwrap().iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![10, 10, 3]);
        let big: Vec<_> = (0..5)
            .map(|i| message(&i.to_string(), 100 * 1024, 0))
            .collect();
        let sizes: Vec<usize> = batches(&big).unwrap().iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
    }

    #[test]
    fn an_event_fits_the_attribute_limit_and_more_is_refused() {
        let mut event = crate::Event::new(
            uuid::Uuid::new_v4(),
            crate::event::types::ORDER_CREATED,
            "mercato/orders",
            "o-1".into(),
            &serde_json::json!({}),
        )
        .unwrap();
        event.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        assert!(checked_size(&event.to_message()).is_ok());
        assert_eq!(
            entry(0, &event.to_message(), false)
                .unwrap()
                .message_attributes()
                .unwrap()
                .len(),
            9
        );
        let standard = entry(0, &event.to_message(), false).unwrap();
        assert_eq!(standard.message_group_id(), None);
        let fifo = entry(0, &event.to_message(), true).unwrap();
        assert_eq!(fifo.message_group_id(), Some("o-1"), "one order, one group");
        assert_eq!(
            fifo.message_deduplication_id(),
            Some(event.id.to_string().as_str())
        );
        assert!(checked_size(&message("m", 1, 9)).is_ok());
        assert!(matches!(
            batches(&[message("m", 1, 10)]),
            Err(BusError::Malformed(_))
        ));
    }

    #[test]
    fn waits_round_up_to_whole_seconds_within_limits() {
        assert_eq!(seconds_up(Duration::ZERO, 20), 0);
        assert_eq!(seconds_up(Duration::from_millis(300), 20), 1);
        assert_eq!(seconds_up(Duration::from_secs(2), 20), 2);
        assert_eq!(seconds_up(Duration::from_secs(90), 20), 20);
    }

    #[test]
    fn the_region_is_read_from_an_aws_queue_url() {
        assert_eq!(
            region_of("https://sqs.ap-south-1.amazonaws.com/123456789012/order-events").as_deref(),
            Some("ap-south-1")
        );
        assert_eq!(
            region_of("http://127.0.0.1:4566/000000000000/order-events"),
            None
        );
    }
}
