//! The notifier: order events from the `order-events` queue become notification records.
//!
//! [`handler::handle_sqs_event`] is the one piece of logic: it takes an SQS batch
//! (`aws_lambda_events::SqsEvent`) and answers with the failed items
//! (`SqsBatchResponse`, ReportBatchItemFailures), exactly as the Lambda runtime expects.
//! In `mercato up` the [`poller`] feeds it from the embedded queue the way Lambda's event
//! source mapping feeds it from SQS. Records are stored once per event id, so redelivery is
//! harmless.

pub mod api;
pub mod content;
#[cfg(feature = "dynamodb")]
pub mod dynamo;
pub mod handler;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod poller;
pub mod sender;
pub mod store;
pub mod wiring;

pub use api::router;
pub use store::{NotificationStore, SqliteNotificationStore};
