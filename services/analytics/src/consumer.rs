//! Feeds the `orders` stream into the window store. Offsets are committed only after the
//! batch's state is committed; a crash in between replays the batch, which the store's
//! event-id check turns into a no-op. After each batch, windows the watermark has passed are
//! handed to the results sinks.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use bus::event::{DecodeError, OrderEvent, attr};
use bus::names::ORDERS_TOPIC;
use bus::{Delivered, Stream};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::feed::Feed;
use crate::results::Emitter;
use crate::store::AnalyticsStore;

pub const CONSUMER_GROUP: &str = bus::names::ANALYTICS_GROUP;

/// Where the consumer reads: instances sharing a group share the topic's partitions, and
/// their final windows merge (see [`crate::results`]).
#[derive(Debug, Clone)]
pub struct Subscription {
    pub topic: String,
    pub group: String,
}

impl Default for Subscription {
    /// The `orders` topic in the `analytics` group.
    fn default() -> Self {
        Subscription {
            topic: ORDERS_TOPIC.to_owned(),
            group: CONSUMER_GROUP.to_owned(),
        }
    }
}

/// Consumes the subscription's topic until `shutdown`.
pub async fn run(
    store: AnalyticsStore,
    feed: Feed,
    emitter: Emitter,
    stream: Arc<dyn Stream>,
    subscription: Subscription,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    let mut lag_measured = tokio::time::Instant::now() - bus::LAG_REPORT;
    while !shutdown.is_cancelled() {
        let mut consumer = match stream
            .subscribe(&subscription.topic, &subscription.group)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to orders");
                tokio::select! { () = shutdown.cancelled() => return, () = tokio::time::sleep(delay) => {} }
                continue;
            }
        };
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                b = consumer.poll(500, Duration::from_millis(500)) => b,
            };
            let batch = match batch {
                Ok(b) if b.is_empty() => continue,
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "polling orders failed");
                    break;
                }
            };
            let events: Vec<(u32, OrderEvent)> = batch
                .iter()
                .filter_map(|d| match decode(d) {
                    Ok(e) => Some((d.partition, e)),
                    Err(e) => {
                        tracing::error!(offset = d.offset, error = %e, "skipping an unreadable order event");
                        metrics::counter!("analytics_malformed_events_total").increment(1);
                        None
                    }
                })
                .collect();
            let touched = event_time_span(&events);
            // One update for the whole batch: its span links to each order's send.
            let span = bus::trace::process_batch_span(
                "analytics",
                stream.system(),
                &subscription.topic,
                batch.iter().map(|d| &d.record.headers),
            );
            match store.apply_from(events).instrument(span.clone()).await {
                Ok(applied) => {
                    metrics::counter!("analytics_events_total").increment(applied.fresh as u64);
                    if applied.late > 0 {
                        tracing::warn!(
                            late = applied.late,
                            "events arrived after their window was final"
                        );
                        metrics::counter!("late_events_total").increment(applied.late as u64);
                    }
                    if applied.fresh > 0 {
                        publish_updates(&store, &feed, touched)
                            .instrument(span.clone())
                            .await;
                        // A sink that fails keeps its windows unemitted: retried after the next batch.
                        if let Err(e) = emitter.emit_final().instrument(span.clone()).await {
                            tracing::warn!(error = %e, "emitting final windows failed; will retry");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "applying order events failed; will replay");
                    break;
                }
            }
            if let Err(e) = consumer.commit(&batch).await {
                tracing::warn!(error = %e, "committing offsets failed; the batch will be replayed and deduplicated");
                break;
            }
            if lag_measured.elapsed() >= bus::LAG_REPORT {
                lag_measured = tokio::time::Instant::now();
                // How far event time's watermark trails the clock (the allowed lateness plus
                // any lag in the stream), with the lag: every few seconds, not every batch.
                if let Ok(Some(watermark)) = store.watermark().await {
                    let delay = Utc::now().timestamp_millis().saturating_sub(watermark);
                    metrics::gauge!("analytics_watermark_delay_seconds").set(delay as f64 / 1e3);
                }
                bus::report_lag(consumer.as_mut(), &subscription.topic, &subscription.group).await;
            }
            delay = Duration::from_millis(200);
        }
        tokio::select! { () = shutdown.cancelled() => return, () = tokio::time::sleep(delay) => {} }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// An order event in either shape, identified by its body, else by the record's `ce_id`
/// header (the seed's producer sent bodies without event ids).
fn decode(d: &Delivered) -> Result<OrderEvent, DecodeError> {
    let ce_id = d.record.headers.get(attr::ID).map(String::as_str);
    OrderEvent::from_delivery(&d.record.payload, ce_id)
}

/// The earliest and latest event time of a batch.
fn event_time_span(events: &[(u32, OrderEvent)]) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let first = events.iter().map(|(_, e)| e.created_at).min()?;
    let last = events.iter().map(|(_, e)| e.created_at).max()?;
    Some((first, last))
}

/// Sends the windows between `touched` (a batch's event-time span) to the live feed.
async fn publish_updates(
    store: &AnalyticsStore,
    feed: &Feed,
    touched: Option<(DateTime<Utc>, DateTime<Utc>)>,
) {
    let Some((first, last)) = touched else {
        return;
    };
    match store
        .windows_between(first, last + chrono::Duration::milliseconds(1))
        .await
    {
        Ok(windows) => windows.into_iter().for_each(|w| feed.publish(w)),
        Err(e) => tracing::warn!(error = %e, "reading updated windows for the feed failed"),
    }
}
