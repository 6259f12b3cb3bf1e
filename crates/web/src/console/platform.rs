//! The platform page: each service's readiness and its dependencies, and the pipeline between
//! them (outbox backlog and oldest row, stream consumer lag, queue depth and dead letters,
//! reservations held, the analytics watermark's delay), so an operator sees where an order is
//! stuck. Read from this process's operations listener (`/ready`, `/metrics`): under
//! `mercato up` that is every service; a gateway run alone sees only itself, and the page says
//! where to look instead (the Grafana pipeline dashboard).

use axum::extract::State;
use axum::response::Response;
use maud::html;

use crate::Web;
use crate::layout::{self, Face};
use crate::session::Operator;

/// The pipeline's series the page shows, with what each means.
const PIPELINE: &[(&str, &str)] = &[
    ("outbox_backlog", "Events written but not yet published"),
    (
        "outbox_oldest_age_seconds",
        "Age of the oldest unpublished event (s)",
    ),
    ("stream_consumer_lag", "Stream records not yet consumed"),
    ("queue_depth", "Messages waiting in a queue"),
    (
        "queue_dead_lettered_total",
        "Messages given up on (dead letters)",
    ),
    (
        "payment_events_dead_lettered_total",
        "Payment events given up on",
    ),
    ("reservations_held", "Reservations holding stock"),
    ("units_held", "Units held by reservations"),
    (
        "analytics_watermark_delay_seconds",
        "Analytics watermark behind now (s)",
    ),
];

/// One sample of the Prometheus text format: name, labels as text, value.
fn samples(text: &str) -> Vec<(&str, &str, &str)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name, labels, value))
        })
        .collect()
}

/// `/ready`'s map under `key` (service or dependency → its state), in its order.
fn states(ready: Option<&serde_json::Value>, key: &str) -> Vec<(String, String)> {
    ready
        .and_then(|r| r.get(key))
        .and_then(|s| s.as_object())
        .map(|s| {
            s.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("?").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

pub async fn show(State(web): State<Web>, Operator(session): Operator) -> Response {
    let ops = web.0.ops_url.clone();
    let (ready, metrics) = match &ops {
        Some(base) => {
            let client = &web.0.ops_client;
            let ready = async {
                client
                    .get(format!("{base}/ready"))
                    .send()
                    .await
                    .ok()?
                    .json::<serde_json::Value>()
                    .await
                    .ok()
            };
            let metrics = async {
                client
                    .get(format!("{base}/metrics"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()
            };
            tokio::join!(ready, metrics)
        }
        None => (None, None),
    };
    let services = states(ready.as_ref(), "services");
    let dependencies = states(ready.as_ref(), "dependencies");
    let text = metrics.unwrap_or_default();
    let pipeline: Vec<(&str, &str, &str, &str)> = samples(&text)
        .into_iter()
        .filter_map(|(name, labels, value)| {
            PIPELINE
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(n, meaning)| (*n, *meaning, labels, value))
        })
        .collect();
    layout::page(
        &session,
        Face::Console,
        "Platform",
        html! {
            h1 { "Platform" }
            @if ops.is_none() || ready.is_none() {
                p class="flash error" role="alert" { "This gateway cannot read the operations listener, so it shows nothing here. Each service's /ready and /metrics, and the Grafana pipeline dashboard, have the figures." }
            }
            h2 { "Services" }
            table {
                caption class="visually-hidden" { "Readiness of each service" }
                thead { tr { th scope="col" { "Service" } th scope="col" { "Readiness" } } }
                tbody {
                    @for (name, state) in &services {
                        tr { td { (name) } td class=(if state == "ready" { "health-up" } else { "health-down" }) { (state) } }
                    }
                }
            }
            @if !dependencies.is_empty() {
                h2 { "Dependencies" }
                table {
                    caption class="visually-hidden" { "What the services depend on" }
                    thead { tr { th scope="col" { "Dependency" } th scope="col" { "State" } } }
                    tbody {
                        @for (name, state) in &dependencies {
                            tr { td { (name) } td class=(if state == "up" { "health-up" } else { "health-down" }) { (state) } }
                        }
                    }
                }
            }
            h2 { "Pipeline" }
            p class="hint" { "Where an order's events are: written to an outbox, published to the stream and queue, consumed by analytics and the notifier. A number that keeps growing is where things are stuck." }
            div class="table-wrap" {
                table {
                    caption class="visually-hidden" { "Pipeline figures" }
                    thead { tr { th scope="col" { "Figure" } th scope="col" { "Where" } th scope="col" class="num" { "Value" } } }
                    tbody {
                        @for (name, meaning, labels, value) in &pipeline {
                            tr { td { (meaning) br; span class="muted" { code { (name) } } } td { (labels.replace('"', "")) } td class="num" { (value) } }
                        }
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_split_name_labels_and_value() {
        let text = "# HELP x y\noutbox_backlog{service=\"orders\"} 3\nqueue_depth 0\n\n";
        assert_eq!(
            samples(text),
            vec![
                ("outbox_backlog", "service=\"orders\"", "3"),
                ("queue_depth", "", "0")
            ]
        );
    }
}
