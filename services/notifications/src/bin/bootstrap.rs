//! The notifier as an AWS Lambda (`provided.al2023`): an SQS batch in, the failed items out
//! (ReportBatchItemFailures), records in the DynamoDB table named by `NOTIFICATIONS_TABLE`.
//! Build with `cargo lambda build --release -p notifications --features lambda --bin bootstrap`.

use std::sync::Arc;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use kit::config::LogSettings;
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use notifications::dynamo::DynamoNotificationStore;
use notifications::handler::handle_sqs_event;
use notifications::sender::LogSender;
use tracing::Instrument;

#[tokio::main]
async fn main() -> Result<(), Error> {
    kit::telemetry::init_logging(&LogSettings {
        format: "json".into(),
        level: std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into()),
    });
    let table = std::env::var("NOTIFICATIONS_TABLE").unwrap_or_else(|_| "notifications".into());
    let store = Arc::new(DynamoNotificationStore::from_env(table).await);
    run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let store = store.clone();
        async move {
            let request_id = event.context.request_id.clone();
            let span = tracing::info_span!(
                "invocation",
                request_id,
                records = event.payload.records.len()
            );
            let response = handle_sqs_event(store.as_ref(), &LogSender, event.payload)
                .instrument(span)
                .await;
            Ok::<SqsBatchResponse, Error>(response)
        }
    }))
    .await
}
