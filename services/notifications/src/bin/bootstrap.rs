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
    // Spans go out over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (an OpenTelemetry
    // collector extension or layer); each invocation flushes them before Lambda freezes.
    let telemetry = Arc::new(kit::telemetry::init(
        &LogSettings {
            format: "json".into(),
            level: std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        },
        "notifications",
    ));
    let table = std::env::var("NOTIFICATIONS_TABLE").unwrap_or_else(|_| "notifications".into());
    let store = Arc::new(DynamoNotificationStore::from_env(table).await);
    run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let store = store.clone();
        let telemetry = telemetry.clone();
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
            if telemetry.traces_on() {
                // The flush blocks on the export, which runs on this runtime: off its workers.
                let telemetry = telemetry.clone();
                let _ = tokio::task::spawn_blocking(move || telemetry.flush()).await;
            }
            Ok::<SqsBatchResponse, Error>(response)
        }
    }))
    .await
}
