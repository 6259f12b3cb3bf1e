//! The order saga's background half: payment outcomes from the `payments` stream move orders
//! (idempotently, by event id), and unpaid orders are cancelled when their time runs out.
//!
//! Payment events of one order normally arrive in the order they were written, but a relay
//! that could not publish for a while, a redelivery or a replica's stale lease can still mix
//! them up. So the listener never trusts arrival order:
//! - each event carries its payment's version (`sequence`); one older than a version already
//!   seen for that payment is stale and ignored (every later event states the payment's whole
//!   status, so the stale one says nothing new);
//! - a refund implies the success before it: a refund for a pending order pays it first, and a
//!   full refund then refunds it, so no arrival order leaves a refunded order `paid`;
//! - money taken for an order that can no longer be paid (cancelled, or failed) is given back
//!   through payments' compensation, whichever event brings the news.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bus::event::{PaymentEvent, types};
use bus::names::PAYMENTS_TOPIC;
use bus::{Delivered, Event, Stream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::{ApiContext, apply_status};
use crate::compensation::{PaymentsClient, worth_retrying};
use crate::domain::OrderStatus;
use crate::store::DeadLetter;

pub const CONSUMER_GROUP: &str = bus::names::ORDERS_STATUS_GROUP;

/// Namespace of the ids of `order.payment_refunded` notices: one per payment, so a compensation
/// asked again (a redelivered event) tells the customer once.
const REFUND_NOTICE_IDS: Uuid = Uuid::from_u128(0x6d65_7263_6174_6f00_0000_0000_0000_0005);

/// What the payment listener works with: the orders API's context and the payments service.
#[derive(Debug, Clone)]
pub struct Saga {
    pub ctx: ApiContext,
    pub payments: PaymentsClient,
    pub retry: Retry,
}

/// How the listener retries an event whose handling failed for a reason that may pass (a
/// dependency down): after a pause doubling from `first_pause` to 10 s, `attempts` times in
/// all, then the event is dead-lettered and the partition moves on.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first_pause: Duration,
}

impl Default for Retry {
    /// Eight attempts over about 20 s: longer than a dependency's restart, short enough that
    /// one poison event does not hold every later payment of its partition for long.
    fn default() -> Retry {
        Retry {
            attempts: 8,
            first_pause: Duration::from_millis(200),
        }
    }
}

/// Applies `payment.*` events to orders until `shutdown`. A transient failure (a dependency
/// down) leaves the event uncommitted and retries it; an event that can never apply is logged
/// and skipped.
pub async fn run_payment_listener(
    saga: Saga,
    stream: Arc<dyn Stream>,
    shutdown: CancellationToken,
) {
    let mut delay = saga.retry.first_pause;
    // Failed attempts per record (partition, offset): records of committed batches are
    // forgotten, so this holds at most the records of one batch.
    let mut failures: HashMap<(u32, i64), u32> = HashMap::new();
    let mut lag_measured = tokio::time::Instant::now() - bus::LAG_REPORT;
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
                let span = bus::trace::process_span(
                    "orders",
                    stream.system(),
                    PAYMENTS_TOPIC,
                    &delivered.record.headers,
                );
                if let Err(reason) = tracing::Instrument::instrument(
                    handle_payment_event(
                        &saga,
                        &delivered.record.headers,
                        &delivered.record.payload,
                    ),
                    span,
                )
                .await
                {
                    let attempts = failures
                        .entry((delivered.partition, delivered.offset))
                        .or_insert(0);
                    *attempts += 1;
                    if *attempts < saga.retry.attempts
                        || !dead_letter(&saga, delivered, &reason, *attempts).await
                    {
                        tracing::warn!(%reason, attempt = *attempts, "payment event will be retried");
                        let _ = consumer.commit(&batch[..i]).await;
                        break 'consume;
                    }
                }
            }
            if let Err(e) = consumer.commit(&batch).await {
                tracing::warn!(error = %e, "committing payments offsets failed");
                break 'consume;
            }
            if lag_measured.elapsed() >= bus::LAG_REPORT {
                lag_measured = tokio::time::Instant::now();
                bus::report_lag(consumer.as_mut(), PAYMENTS_TOPIC, CONSUMER_GROUP).await;
            }
            failures.clear();
            delay = saga.retry.first_pause;
        }
        // Re-subscribing rewinds to the last committed offset.
        sleep_or_stop(&shutdown, delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Gives up on a record that kept failing: keeps it in the dead-letter table (for an operator
/// and a replay), counts it, and lets the partition move on. `false` when it could not be
/// kept (the record is then retried, never dropped).
async fn dead_letter(saga: &Saga, delivered: &Delivered, reason: &str, attempts: u32) -> bool {
    let letter = DeadLetter {
        topic: delivered.topic.clone(),
        partition: delivered.partition,
        offset: delivered.offset,
        key: delivered.record.key.clone(),
        payload: String::from_utf8_lossy(&delivered.record.payload).into_owned(),
        reason: reason.chars().take(1_000).collect(),
        attempts,
    };
    match saga.ctx.store.dead_letter(&letter).await {
        Ok(()) => {
            metrics::counter!("payment_events_dead_lettered_total").increment(1);
            tracing::error!(topic = letter.topic, partition = letter.partition, offset = letter.offset, key = letter.key, %reason, attempts, "a payment event kept failing and was dead-lettered; the order may need an operator");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not dead-letter a payment event");
            false
        }
    }
}

/// The order moves a payment event calls for, in order.
fn steps_for(event_type: &str, payment_status: &str) -> &'static [OrderStatus] {
    match (event_type, payment_status) {
        (types::PAYMENT_SUCCEEDED, _) => &[OrderStatus::Paid],
        (types::PAYMENT_FAILED, _) => &[OrderStatus::PaymentFailed, OrderStatus::Cancelled],
        (types::PAYMENT_REFUNDED, "refunded") => &[OrderStatus::Paid, OrderStatus::Refunded],
        (types::PAYMENT_REFUNDED, "partially_refunded") => &[OrderStatus::Paid],
        _ => &[],
    }
}

/// Whether, after this event, the payment still holds some of the customer's money.
fn holds_money(event_type: &str, payment_status: &str) -> bool {
    matches!(
        (event_type, payment_status),
        (types::PAYMENT_SUCCEEDED, _) | (types::PAYMENT_REFUNDED, "partially_refunded")
    )
}

/// `Err` means "try again later"; everything else, including events that cannot apply, is done.
pub(crate) async fn handle_payment_event(
    saga: &Saga,
    headers: &bus::Headers,
    payload: &[u8],
) -> Result<(), String> {
    let ctx = &saga.ctx;
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
    // Events written before payments had versions carry 0: only the state machine guards them.
    if payment.sequence > 0 {
        let newest = ctx
            .store
            .observe_payment_version(payment.order_id, payment.payment_id, payment.sequence)
            .await
            .map_err(|e| e.to_string())?;
        if !newest {
            metrics::counter!("payment_events_stale_total").increment(1);
            tracing::info!(event_id = %event.id, payment_id = %payment.payment_id, sequence = payment.sequence, "stale payment event ignored");
            return Ok(());
        }
    }
    for (i, to) in steps_for(&event.event_type, &payment.status)
        .iter()
        .enumerate()
    {
        // Only the first step carries the event id: it marks the event as applied.
        let dedup = if i == 0 { Some(event.id) } else { None };
        match apply_status(ctx, payment.order_id, *to, dedup).await {
            Ok(_) => {}
            Err(problem) if problem.status >= 500 => return Err(problem.to_string()),
            Err(problem) => {
                let money = holds_money(&event.event_type, &payment.status);
                if money && *to == OrderStatus::Paid && stock_not_held(&problem) {
                    // The order's stock was given back while it waited (its hold ran out before
                    // the order expired): it cannot be filled. Cancelled, then refunded below,
                    // rather than left pending with the money kept.
                    match apply_status(ctx, payment.order_id, OrderStatus::Cancelled, None).await {
                        Ok(_) => {
                            tracing::warn!(event_id = %event.id, order_id = %payment.order_id, "paid after its stock was released: cancelled");
                        }
                        Err(problem) if problem.status >= 500 => {
                            return Err(problem.to_string());
                        }
                        Err(_) => {}
                    }
                }
                if money && cannot_be_paid(ctx, payment.order_id).await? {
                    return compensate(saga, &event, &payment).await;
                }
                tracing::warn!(event_id = %event.id, order_id = %payment.order_id, %problem, "payment event does not apply");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Products refused to sell the order's reservation: released, or gone (pruned after its
/// retention); both are `reservation-state` (see `api::apply_status`).
fn stock_not_held(problem: &kit::Problem) -> bool {
    problem.kind.ends_with("/reservation-state")
}

/// Whether the order is gone past paying (cancelled, expired, its payment failed).
async fn cannot_be_paid(ctx: &ApiContext, order_id: Uuid) -> Result<bool, String> {
    let order = ctx.store.get(order_id).await.map_err(|e| e.to_string())?;
    Ok(order.is_some_and(|o| {
        matches!(
            o.status,
            OrderStatus::Cancelled | OrderStatus::PaymentFailed
        )
    }))
}

/// Asks payments to give the money back, then tells the customer (the `order.cancelled` they
/// were sent said they pay nothing); a failure that may pass is retried with the event.
async fn compensate(saga: &Saga, event: &Event, payment: &PaymentEvent) -> Result<(), String> {
    match saga.payments.compensate(payment.payment_id).await {
        Ok(done) => {
            let notice = Uuid::new_v5(&REFUND_NOTICE_IDS, payment.payment_id.as_bytes());
            let told = saga
                .ctx
                .store
                .announce(payment.order_id, types::ORDER_PAYMENT_REFUNDED, notice)
                .await
                .map_err(|e| format!("announcing a compensation: {e}"))?;
            if told {
                metrics::counter!("payments_compensated_total", "outcome" => "compensated")
                    .increment(1);
                tracing::warn!(event_id = %event.id, order_id = %payment.order_id, payment_id = %payment.payment_id, status = done.status, "money taken for an order that can no longer be paid was given back");
            }
            Ok(())
        }
        Err(e) if worth_retrying(&e) => Err(format!("compensating a payment: {e}")),
        Err(e) => {
            metrics::counter!("payments_compensated_total", "outcome" => "refused").increment(1);
            tracing::error!(event_id = %event.id, order_id = %payment.order_id, payment_id = %payment.payment_id, error = %e, "payments refused to compensate a payment for an order that can no longer be paid");
            Ok(())
        }
    }
}

/// Expired orders cancelled per batch while draining.
const EXPIRY_BATCH: u32 = 200;

/// Cancels pending orders past their payment window, releasing their stock: every order due,
/// in batches, until none is left or the interval has passed (then the next sweep goes on).
pub async fn run_expiry_sweeper(ctx: ApiContext, every: Duration, shutdown: CancellationToken) {
    loop {
        let deadline = tokio::time::Instant::now() + every;
        while sweep_expired_batch(&ctx).await && tokio::time::Instant::now() < deadline {}
        if sleep_or_stop(&shutdown, every).await {
            return;
        }
    }
}

/// Cancels one batch of expired orders; `true` when the batch was full (more may be due).
async fn sweep_expired_batch(ctx: &ApiContext) -> bool {
    let ids = match ctx.store.expired_pending(EXPIRY_BATCH).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "expiry sweep failed");
            return false;
        }
    };
    let full = ids.len() == EXPIRY_BATCH as usize;
    let mut failed = false;
    for id in ids {
        match apply_status(ctx, id, OrderStatus::Cancelled, None).await {
            Ok(t) if t.changed => {
                metrics::counter!("orders_expired_total").increment(1);
                tracing::info!(order_id = %id, "unpaid order expired and was cancelled");
            }
            Ok(_) => {}
            Err(problem) => {
                failed = true;
                tracing::warn!(order_id = %id, %problem, "could not expire order")
            }
        }
    }
    // An order that could not be cancelled stays due: asking again at once would only find
    // it again.
    full && !failed
}

/// Sleeps for `d`; `true` if shutdown came first.
async fn sleep_or_stop(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod property;
#[cfg(test)]
mod tests;
