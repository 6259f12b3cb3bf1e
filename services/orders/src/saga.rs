//! The order saga's background half: payment outcomes from the `payments` stream move orders
//! (idempotently, by event id), and unpaid orders are cancelled when their time runs out.

use std::sync::Arc;
use std::time::Duration;

use bus::event::{PaymentEvent, types};
use bus::names::PAYMENTS_TOPIC;
use bus::{Event, Stream};
use tokio_util::sync::CancellationToken;

use crate::api::{ApiContext, apply_status};
use crate::domain::OrderStatus;

pub const CONSUMER_GROUP: &str = "orders-status";

/// Applies `payment.*` events to orders until `shutdown`. A transient failure (a dependency
/// down) leaves the event uncommitted and retries it; an event that can never apply is logged
/// and skipped.
pub async fn run_payment_listener(
    ctx: ApiContext,
    stream: Arc<dyn Stream>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let mut consumer = match stream.subscribe(PAYMENTS_TOPIC, CONSUMER_GROUP).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to payments");
                sleep_or_stop(&shutdown, delay).await;
                continue;
            }
        };
        'consume: loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                batch = consumer.poll(64, Duration::from_millis(500)) => batch,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "polling payments failed");
                    break 'consume;
                }
            };
            for (i, delivered) in batch.iter().enumerate() {
                if let Err(retry) =
                    handle_payment_event(&ctx, &delivered.record.headers, &delivered.record.payload)
                        .await
                {
                    tracing::warn!(reason = %retry, "payment event will be retried");
                    let _ = consumer.commit(&batch[..i]).await;
                    break 'consume;
                }
            }
            if let Err(e) = consumer.commit(&batch).await {
                tracing::warn!(error = %e, "committing payments offsets failed");
                break 'consume;
            }
            delay = Duration::from_millis(200);
        }
        // Re-subscribing rewinds to the last committed offset.
        sleep_or_stop(&shutdown, delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// `Err` means "try again later"; everything else, including events that cannot apply, is done.
async fn handle_payment_event(
    ctx: &ApiContext,
    headers: &bus::Headers,
    payload: &[u8],
) -> Result<(), String> {
    let event = match Event::from_parts(headers, payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "skipping a malformed payment event");
            return Ok(());
        }
    };
    let payment: PaymentEvent = match serde_json::from_str(&event.data) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(event_id = %event.id, error = %e, "skipping an unreadable payment event");
            return Ok(());
        }
    };
    let steps: &[OrderStatus] = match event.event_type.as_str() {
        types::PAYMENT_SUCCEEDED => &[OrderStatus::Paid],
        types::PAYMENT_FAILED => &[OrderStatus::PaymentFailed, OrderStatus::Cancelled],
        types::PAYMENT_REFUNDED if payment.status == "refunded" => &[OrderStatus::Refunded],
        _ => &[],
    };
    for (i, to) in steps.iter().enumerate() {
        // Only the first step carries the event id: it marks the event as applied.
        let dedup = if i == 0 { Some(event.id) } else { None };
        match apply_status(ctx, payment.order_id, *to, dedup).await {
            Ok(_) => {}
            Err(problem) if problem.status == 503 || problem.status >= 500 => {
                return Err(problem.to_string());
            }
            Err(problem) => {
                tracing::warn!(event_id = %event.id, order_id = %payment.order_id, %problem, "payment event does not apply");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Cancels pending orders past their payment window, releasing their stock.
pub async fn run_expiry_sweeper(ctx: ApiContext, every: Duration, shutdown: CancellationToken) {
    loop {
        match ctx.store.expired_pending(100).await {
            Ok(ids) => {
                for id in ids {
                    match apply_status(&ctx, id, OrderStatus::Cancelled, None).await {
                        Ok(t) if t.changed => {
                            metrics::counter!("orders_expired_total").increment(1);
                            tracing::info!(order_id = %id, "unpaid order expired and was cancelled");
                        }
                        Ok(_) => {}
                        Err(problem) => {
                            tracing::warn!(order_id = %id, %problem, "could not expire order")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        if sleep_or_stop(&shutdown, every).await {
            return;
        }
    }
}

/// Sleeps for `d`; `true` if shutdown came first.
async fn sleep_or_stop(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests;
