//! The notifier's handler: one SQS batch in, the failed items out (ReportBatchItemFailures).
//! Lambda's runtime and `mercato up`'s poller both call [`handle_sqs_event`].

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use bus::event::{OrderEvent, attr};
use chrono::Utc;

use crate::content::{Notification, compose};
use crate::sender::Sender;
use crate::store::NotificationStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// A redelivery: the record already exists.
    Duplicate,
    /// An event type nobody is notified about; acknowledged.
    Ignored,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the message body is not an order event: {0}")]
    Malformed(String),
}

/// Handles every record; a record that fails is reported alone, so SQS redelivers only it.
/// Records are parsed one by one and stored in one batch write.
pub async fn handle_sqs_event(
    store: &dyn NotificationStore,
    sender: &dyn Sender,
    event: SqsEvent,
) -> SqsBatchResponse {
    let mut failures = Vec::new();
    let mut ids = Vec::new();
    let mut traces = Vec::new();
    let mut spans = Vec::new();
    let mut batch = Vec::new();
    for record in &event.records {
        let message_id = record.message_id.clone().unwrap_or_default();
        let span = process_span(record);
        match span.in_scope(|| parse_record(record)) {
            Ok(Some(notification)) => {
                ids.push(message_id);
                traces.push(trace_id(record));
                spans.push(span);
                batch.push(notification);
            }
            Ok(None) => count(Outcome::Ignored),
            Err(e) => {
                tracing::warn!(message_id, error = %e, "notification record failed");
                metrics::counter!("notifications_processed_total", "outcome" => "failed")
                    .increment(1);
                failures.push(BatchItemFailure {
                    item_identifier: message_id,
                });
            }
        }
    }
    match store.insert_batch(&batch).await {
        Ok(stored) => {
            for (((notification, fresh), trace_id), span) in
                batch.iter().zip(stored).zip(&traces).zip(&spans)
            {
                if !fresh {
                    count(Outcome::Duplicate);
                    continue;
                }
                count(Outcome::Stored);
                let deliver = async {
                    tracing::info!(
                        event_id = %notification.event_id,
                        event_type = notification.event_type,
                        order_id = %notification.order_id,
                        trace_id = trace_id.as_deref().unwrap_or(""),
                        "notification stored"
                    );
                    if let Err(e) = sender.send(notification).await {
                        // The record is kept; delivery failures are visible in logs and metrics.
                        tracing::error!(event_id = %notification.event_id, error = %e, "notification stored but not delivered");
                    }
                };
                tracing::Instrument::instrument(deliver, span.clone()).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, records = ids.len(), "storing notifications failed");
            metrics::counter!("notifications_processed_total", "outcome" => "failed")
                .increment(ids.len() as u64);
            failures.extend(
                ids.into_iter()
                    .map(|item_identifier| BatchItemFailure { item_identifier }),
            );
        }
    }
    SqsBatchResponse {
        batch_item_failures: failures,
    }
}

/// The consumer span of one record: a child of the relay's send (the `traceparent`
/// attribute), so the notification is part of the order's trace.
fn process_span(record: &SqsMessage) -> tracing::Span {
    let headers: bus::Headers = [attr::TRACEPARENT, attr::ID, attr::TYPE]
        .into_iter()
        .filter_map(|name| {
            let value = record.message_attributes.get(name)?.string_value.clone()?;
            Some((name.to_owned(), value))
        })
        .collect();
    let queue = record
        .event_source_arn
        .as_deref()
        .and_then(|arn| arn.rsplit(':').next())
        .unwrap_or(bus::names::ORDER_EVENTS_QUEUE);
    let system = match record.event_source.as_deref() {
        Some("aws:sqs") => "aws_sqs",
        _ => "mercato",
    };
    bus::trace::process_span("notifications", system, queue, &headers)
}

/// The W3C trace id the event travelled with (`traceparent` attribute), or X-Ray's header.
fn trace_id(record: &SqsMessage) -> Option<String> {
    if let Some(tp) = record
        .message_attributes
        .get("traceparent")
        .and_then(|a| a.string_value.as_deref())
    {
        return tp.split('-').nth(1).map(str::to_owned);
    }
    record.attributes.get("AWSTraceHeader").cloned()
}

fn count(outcome: Outcome) {
    let label = match outcome {
        Outcome::Stored => "stored",
        Outcome::Duplicate => "duplicate",
        Outcome::Ignored => "ignored",
    };
    metrics::counter!("notifications_processed_total", "outcome" => label).increment(1);
}

/// The notification a record asks for, `None` for event types nobody is told about.
pub fn parse_record(record: &SqsMessage) -> Result<Option<Notification>, RecordError> {
    let body = record
        .body
        .as_deref()
        .ok_or_else(|| RecordError::Malformed("empty body".into()))?;
    // The seed's producer sent bodies without event ids: the CloudEvents id attribute, when
    // there is one, is the next best identity for deduplication.
    let ce_id = record
        .message_attributes
        .get(attr::ID)
        .and_then(|a| a.string_value.as_deref());
    let event = OrderEvent::from_delivery(body, ce_id)
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    let notification = compose(&event, Utc::now());
    if notification.is_none() {
        tracing::info!(event_id = %event.event_id, event_type = event.event_type, "no notification for this event type");
    }
    Ok(notification)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sender::LogSender;
    use crate::store::{Filter, SqliteNotificationStore};

    /// Recorded SQS events (the shape Lambda delivers), in `tests/fixtures/`.
    fn fixture(name: &str) -> SqsEvent {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    async fn run(name: &str) -> (Vec<String>, Vec<crate::content::Notification>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteNotificationStore::open(
            &format!("sqlite://{}/n.db", dir.path().display()),
            &Default::default(),
        )
        .await
        .unwrap();
        let response = handle_sqs_event(&store, &LogSender, fixture(name)).await;
        let failed = response
            .batch_item_failures
            .into_iter()
            .map(|f| f.item_identifier)
            .collect();
        let stored = store.find(&Filter::default()).await.unwrap().items;
        (failed, stored)
    }

    #[tokio::test]
    async fn a_valid_batch_stores_one_record_per_event() {
        let (failed, stored) = run("valid_batch.json").await;
        assert!(failed.is_empty());
        let kinds: Vec<&str> = stored.iter().map(|n| n.event_type.as_str()).collect();
        assert_eq!(kinds, vec!["order.created", "order.paid"]);
        assert_eq!(stored[0].amount.to_string(), "3999.98", "exact, as sent");
        assert_eq!(stored[0].subject, "Order 01a20f00 received");
    }

    #[tokio::test]
    async fn a_malformed_body_is_reported_alone() {
        let (failed, stored) = run("malformed_body.json").await;
        assert_eq!(failed, vec!["m-poison"]);
        assert_eq!(
            stored.len(),
            1,
            "the good record in the same batch is stored"
        );
    }

    #[tokio::test]
    async fn an_unknown_event_type_is_acknowledged_without_a_record() {
        let (failed, stored) = run("unknown_event_type.json").await;
        assert!(failed.is_empty(), "not a poison message: nothing to retry");
        assert!(stored.is_empty());
    }

    #[tokio::test]
    async fn a_duplicate_message_stores_once() {
        let (failed, stored) = run("duplicate_message_id.json").await;
        assert!(failed.is_empty());
        assert_eq!(stored.len(), 1);
    }

    #[tokio::test]
    async fn the_mixed_batch_used_by_the_lambda_test() {
        let (failed, stored) = run("mixed_batch.json").await;
        assert_eq!(failed, vec!["m-poison"]);
        assert_eq!(stored.len(), 2);
    }

    /// What the seed's order service sent: `id` instead of `event_id`, no currency, naive
    /// times, `items[].price`, mostly without message attributes.
    #[tokio::test]
    async fn seed_shaped_messages_are_notified_once_each() {
        let (failed, stored) = run("seed_batch.json").await;
        assert!(failed.is_empty(), "{failed:?}");
        let mut kinds: Vec<(&str, String)> = stored
            .iter()
            .map(|n| (n.event_type.as_str(), n.order_id.to_string()))
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                (
                    "order.cancelled",
                    "5eed0000-0000-4000-8000-000000000001".into()
                ),
                (
                    "order.created",
                    "5eed0000-0000-4000-8000-000000000001".into()
                ),
                (
                    "order.created",
                    "5eed0000-0000-4000-8000-000000000002".into()
                ),
                ("order.paid", "5eed0000-0000-4000-8000-000000000001".into()),
            ],
            "a resent body (by its `id`) and a resent ce_id count once; the paid and cancelled \
             events whose `id` is the order's are told apart by their bodies"
        );
        let created = stored
            .iter()
            .find(|n| n.event_id.to_string() == "5eed0000-0000-4000-8000-00000000e001")
            .unwrap();
        assert_eq!(created.amount.to_string(), "1999.99");
        assert_eq!(
            created.currency, "INR",
            "the platform's, as the seed named none"
        );
        assert!(
            created.body.contains("totalling 1999.99 INR"),
            "{}",
            created.body
        );
        let by_ce_id = stored
            .iter()
            .find(|n| n.order_id.to_string() == "5eed0000-0000-4000-8000-000000000002")
            .unwrap();
        assert_eq!(by_ce_id.amount.to_string(), "250.50", "a string amount");
    }

    #[test]
    fn trace_ids_come_from_traceparent() {
        let event = fixture("valid_batch.json");
        assert_eq!(
            trace_id(&event.records[0]).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}
