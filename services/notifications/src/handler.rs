//! The notifier's handler: one SQS batch in, the failed items out (ReportBatchItemFailures).
//! Lambda's runtime and `mercato up`'s poller both call [`handle_sqs_event`].

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use bus::event::OrderEvent;
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
    let mut batch = Vec::new();
    for record in &event.records {
        let message_id = record.message_id.clone().unwrap_or_default();
        match parse_record(record) {
            Ok(Some(notification)) => {
                ids.push(message_id);
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
            for (notification, fresh) in batch.iter().zip(stored) {
                if !fresh {
                    count(Outcome::Duplicate);
                    continue;
                }
                count(Outcome::Stored);
                if let Err(e) = sender.send(notification).await {
                    // The record is kept; delivery failures are visible in logs and metrics.
                    tracing::error!(event_id = %notification.event_id, error = %e, "notification stored but not delivered");
                }
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
    let event: OrderEvent =
        serde_json::from_str(body).map_err(|e| RecordError::Malformed(e.to_string()))?;
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

    fn message(id: &str, body: &str) -> SqsMessage {
        SqsMessage {
            message_id: Some(id.into()),
            body: Some(body.into()),
            ..Default::default()
        }
    }

    fn order_event(event_id: &str, event_type: &str) -> String {
        format!(
            r#"{{"event_id":"{event_id}","event_type":"{event_type}","order_id":"0190b8a4-7e6f-7c3e-9a51-1f2d3c4b5a60",
               "user_id":"0190b8a4-7e6f-7c3e-9a51-1f2d3c4b5a61","total_amount":3999.98,"currency":"USD",
               "status":"pending","items_count":2,"created_at":"2026-11-24T10:00:00Z","items":[]}}"#
        )
    }

    #[tokio::test]
    async fn a_poison_record_is_reported_alone_and_duplicates_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteNotificationStore::open(
            &format!("sqlite://{}/n.db", dir.path().display()),
            &Default::default(),
        )
        .await
        .unwrap();
        let e1 = "0190b8a4-0000-7000-8000-000000000001";
        let event = SqsEvent {
            records: vec![
                message("m1", &order_event(e1, "order.created")),
                message("m2", "{not json"),
                message(
                    "m3",
                    &order_event("0190b8a4-0000-7000-8000-000000000003", "order.audited"),
                ),
                message("m4", &order_event(e1, "order.created")),
            ],
        };
        let response = handle_sqs_event(&store, &LogSender, event).await;
        let failed: Vec<&str> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        assert_eq!(failed, vec!["m2"]);
        let all = store
            .find(&Filter {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            all.len(),
            1,
            "duplicate event stored once, unknown type ignored"
        );
        assert_eq!(all[0].amount.to_string(), "3999.98");
    }
}
