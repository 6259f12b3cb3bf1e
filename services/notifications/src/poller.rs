//! The local stand-in for Lambda's SQS event source mapping: receive a batch from the queue,
//! hand it to the handler as an `SqsEvent`, delete what succeeded, make the failures visible
//! again after a backoff (the queue dead-letters them after too many receives).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage, SqsMessageAttribute};
use bus::names::ORDER_EVENTS_QUEUE;
use bus::{Queue, ReceivedMessage};
use tokio_util::sync::CancellationToken;

use crate::handler::handle_sqs_event;
use crate::sender::Sender;
use crate::store::NotificationStore;

/// Shapes a queue message as Lambda would deliver it from SQS.
pub fn to_sqs_message(queue: &str, m: &ReceivedMessage) -> SqsMessage {
    SqsMessage {
        message_id: Some(m.id.clone()),
        receipt_handle: Some(m.receipt.clone()),
        body: Some(m.body.clone()),
        attributes: [
            (
                "ApproximateReceiveCount".to_owned(),
                m.receive_count.to_string(),
            ),
            ("SentTimestamp".to_owned(), m.sent_at_ms.to_string()),
        ]
        .into_iter()
        .collect(),
        message_attributes: m
            .attributes
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    SqsMessageAttribute {
                        string_value: Some(v.clone()),
                        data_type: Some("String".into()),
                        ..Default::default()
                    },
                )
            })
            .collect(),
        event_source: Some("aws:sqs".into()),
        event_source_arn: Some(format!("arn:aws:sqs:local:000000000000:{queue}")),
        aws_region: Some("local".into()),
        ..Default::default()
    }
}

pub struct Poller {
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn NotificationStore>,
    pub sender: Arc<dyn Sender>,
    pub batch_size: usize,
}

/// How often the poller reports the queue's depth (`queue_depth`).
const DEPTH_REPORT: Duration = Duration::from_secs(5);

impl Poller {
    /// The messages waiting (visible or in flight), as the `queue_depth{queue}` gauge: a queue
    /// that grows is a notifier that cannot keep up (on Lambda, SQS's own
    /// `ApproximateNumberOfMessagesVisible` metric says the same).
    pub async fn report_depth(&self) {
        match self.queue.depth(ORDER_EVENTS_QUEUE).await {
            Ok(depth) => {
                metrics::gauge!("queue_depth", "queue" => ORDER_EVENTS_QUEUE).set(depth as f64);
            }
            Err(e) => tracing::warn!(error = %e, "measuring the queue's depth failed"),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut measured = tokio::time::Instant::now() - DEPTH_REPORT;
        loop {
            if measured.elapsed() >= DEPTH_REPORT {
                measured = tokio::time::Instant::now();
                self.report_depth().await;
            }
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.queue.receive(ORDER_EVENTS_QUEUE, self.batch_size, Duration::from_secs(1)) => r,
            };
            let messages = match received {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "receiving from the queue failed");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if messages.is_empty() {
                continue;
            }
            let event = SqsEvent {
                records: messages
                    .iter()
                    .map(|m| to_sqs_message(ORDER_EVENTS_QUEUE, m))
                    .collect(),
            };
            let response = handle_sqs_event(self.store.as_ref(), self.sender.as_ref(), event).await;
            let failed: HashSet<String> = response
                .batch_item_failures
                .into_iter()
                .map(|f| f.item_identifier)
                .collect();
            let mut done = Vec::with_capacity(messages.len());
            for m in &messages {
                if failed.contains(&m.id) {
                    let delay = Duration::from_secs(1u64 << m.receive_count.clamp(0, 6));
                    if let Err(e) = self
                        .queue
                        .release(ORDER_EVENTS_QUEUE, &m.receipt, delay)
                        .await
                    {
                        tracing::warn!(message_id = m.id, error = %e, "releasing a failed message failed");
                    }
                } else {
                    done.push(m.receipt.clone());
                }
            }
            if let Err(e) = self.queue.delete_batch(ORDER_EVENTS_QUEUE, &done).await {
                // Not fatal: the messages come back after the visibility timeout, and the
                // handler recognises them as duplicates.
                tracing::warn!(error = %e, "acknowledging messages failed");
            }
        }
    }
}
