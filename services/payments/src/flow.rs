//! What follows a provider's answer, wherever it comes from (the paying request, a Stripe
//! webhook, the reconciler): the payment is finished once, then the order is moved at once
//! over HTTP (its `payment.*` event moves it anyway should that fail); a payment that succeeded
//! for an order no longer payable is refunded. Refunds go to the provider first, then are
//! recorded. And the reconciler, which finishes payments left pending by a crash.

use std::time::Duration;

use axum::http::StatusCode;
use chrono::DateTime;
use http::Method;
use kit::Money;
use kit::Problem;
use kit::client::CallError;
use kit::db::now_ms;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::{ApiContext, store_problem};
use crate::provider::{ChargeOutcome, ProviderError, RefundOutcome, RefundRequest};
use crate::store::{Finished, NewRefund, Payment, Refund, Settlement, StoreError, apply_refund};

/// Pending payments looked at per reconciler pass.
const RECONCILE_BATCH: usize = 100;

#[derive(Debug, Serialize)]
struct StatusChange<'a> {
    status: &'a str,
}

/// What the order did after its payment finished.
#[derive(Debug)]
pub enum Followed {
    /// Nothing to do (already followed when it was finished), or the order moved (or will,
    /// from the event).
    Done,
    /// It succeeded for an order that was no longer payable; the money went back.
    RefundedUnpayable(Box<Refund>),
    /// As above, but the refund failed: logged and counted, for an operator.
    UnpayableNotRefunded,
}

/// A provider's charge outcome as the store records it; `None` while it is still processing.
pub fn settlement(outcome: ChargeOutcome) -> Option<Settlement> {
    match outcome {
        ChargeOutcome::Succeeded { reference, card } => {
            Some(Settlement::Succeeded { reference, card })
        }
        ChargeOutcome::Declined { reference, reason } => {
            Some(Settlement::Failed { reference, reason })
        }
        ChargeOutcome::Processing { .. } => None,
    }
}

/// Finishes `payment_id` with `settlement` and makes the order follow.
pub async fn finish(
    ctx: &ApiContext,
    payment_id: Uuid,
    settlement: &Settlement,
) -> Result<(Finished, Followed), StoreError> {
    let finished = ctx.store.finish(payment_id, settlement).await?;
    if !finished.changed {
        return Ok((finished, Followed::Done));
    }
    let outcome = if finished.payment.status == "succeeded" {
        "succeeded"
    } else {
        "declined"
    };
    metrics::counter!("payments_total", "outcome" => outcome).increment(1);
    let followed = follow(ctx, &finished.payment).await;
    Ok((finished, followed))
}

async fn follow(ctx: &ApiContext, payment: &Payment) -> Followed {
    if payment.status != "succeeded" {
        move_order(ctx, payment.order_id, &["payment_failed", "cancelled"]).await;
        return Followed::Done;
    }
    match try_move_order(ctx, payment.order_id, &["paid"]).await {
        Err(CallError::Rejected {
            status: StatusCode::CONFLICT,
            ..
        }) => {
            // The order stopped being payable while the card was charged (it expired or was
            // cancelled): give the money back rather than keep it for nothing.
            match refund(ctx, payment.clone(), None, Some("order_not_payable")).await {
                Ok(refund) => {
                    metrics::counter!("payments_total", "outcome" => "refunded_unpayable")
                        .increment(1);
                    Followed::RefundedUnpayable(Box::new(refund))
                }
                Err(problem) => {
                    tracing::error!(payment_id = %payment.id, order_id = %payment.order_id, ?problem,
                        "a payment for an order no longer payable could not be refunded; refund it by hand (POST /api/v1/payments/{{id}}/refund)");
                    metrics::counter!("payments_refund_failures_total", "why" => "order_not_payable")
                        .increment(1);
                    Followed::UnpayableNotRefunded
                }
            }
        }
        Err(e) => {
            deferred(payment.order_id, "paid", &e);
            Followed::Done
        }
        Ok(()) => Followed::Done,
    }
}

/// Moves the order through `statuses` now; a failure is logged and counted, and left to the
/// `payment.*` event, which the orders service applies whatever happens here.
pub async fn move_order(ctx: &ApiContext, order_id: Uuid, statuses: &[&str]) {
    if let Err((status, e)) = try_move(ctx, order_id, statuses).await {
        deferred(order_id, status, &e);
    }
}

fn deferred(order_id: Uuid, status: &str, e: &CallError) {
    tracing::warn!(%order_id, status, error = %e, "order not moved now; the payment event will move it");
    metrics::counter!("payments_order_moves_deferred_total", "to" => status.to_owned())
        .increment(1);
}

async fn try_move_order(
    ctx: &ApiContext,
    order_id: Uuid,
    statuses: &[&str],
) -> Result<(), CallError> {
    try_move(ctx, order_id, statuses).await.map_err(|(_, e)| e)
}

async fn try_move<'s>(
    ctx: &ApiContext,
    order_id: Uuid,
    statuses: &[&'s str],
) -> Result<(), (&'s str, CallError)> {
    for status in statuses {
        ctx.orders
            .send(
                Method::POST,
                &format!("/internal/v1/orders/{order_id}/status"),
                Some(&StatusChange { status }),
            )
            .await
            .map_err(|e| (*status, e))?;
    }
    Ok(())
}

/// The id of the refund that takes `payment` from its current version to the next: the same
/// for every attempt at that refund (so its provider key is too), different for the next.
pub fn refund_id(payment: &Payment) -> Uuid {
    Uuid::new_v5(
        &payment.id,
        format!("refund-{}", payment.version + 1).as_bytes(),
    )
}

/// Refunds `amount` of `payment` (everything left when `None`) at the provider, then records
/// it. Another refund recorded meanwhile makes this one a 409 (retry); the provider, keyed by
/// the refund's id, never pays the same refund twice.
pub async fn refund(
    ctx: &ApiContext,
    payment: Payment,
    amount: Option<Money>,
    reason: Option<&str>,
) -> Result<Refund, Problem> {
    let (_, amount) = apply_refund(payment.clone(), amount, now_ms()).map_err(store_problem)?;
    let Some(charge) = payment.provider_reference.as_deref() else {
        tracing::error!(payment_id = %payment.id, "a successful payment without a provider reference");
        return Err(Problem::internal());
    };
    let id = refund_id(&payment);
    let request = RefundRequest {
        refund_id: id,
        payment_id: payment.id,
        charge_reference: charge,
        amount,
        currency: &payment.currency,
    };
    let reference = match ctx.provider.refund(&request).await {
        Ok(RefundOutcome::Refunded { reference }) => reference,
        Ok(RefundOutcome::Failed { reason }) => {
            metrics::counter!("payments_refund_failures_total", "why" => "refused").increment(1);
            return Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "refund-refused",
                "The payment provider refused the refund",
            )
            .with_detail(format!("the provider refused the refund: {reason}"))
            .with("reason", reason));
        }
        Err(ProviderError::Refused { code, message, .. }) => {
            tracing::error!(payment_id = %payment.id, code, message, "the provider refused a refund request");
            return Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "refund-refused",
                "The payment provider refused the refund",
            )
            .with("reason", code));
        }
        Err(e) => {
            tracing::warn!(payment_id = %payment.id, error = %e, "refund not made; a retry sends the same refund");
            return Err(Problem::unavailable("payment provider"));
        }
    };
    ctx.store
        .refund(&NewRefund {
            id,
            payment_id: payment.id,
            expected_version: payment.version,
            amount,
            provider_reference: Some(reference),
            reason: reason.map(str::to_owned),
        })
        .await
        .map_err(store_problem)
}

/// One reconciler pass: pending payments older than `after` are looked up at the provider by
/// their key and finished; those it never saw are withdrawn. Returns how many were settled.
pub async fn reconcile_once(ctx: &ApiContext, after: Duration) -> usize {
    let cutoff_ms = now_ms() - i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
    let before = DateTime::from_timestamp_millis(cutoff_ms).unwrap_or_default();
    let pending = match ctx.store.pending_before(before, RECONCILE_BATCH).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "pending payments could not be listed");
            return 0;
        }
    };
    let mut settled = 0;
    for payment in pending {
        match ctx.provider.lookup(payment.id).await {
            Ok(Some(outcome)) => {
                let Some(settlement) = settlement(outcome) else {
                    continue;
                };
                match finish(ctx, payment.id, &settlement).await {
                    Ok((finished, _)) => {
                        tracing::info!(payment_id = %payment.id, status = finished.payment.status, "a pending payment was finished from the provider's record");
                        metrics::counter!("payments_reconciled_total", "outcome" => finished.payment.status.clone())
                            .increment(1);
                        settled += 1;
                    }
                    Err(e) => {
                        tracing::warn!(payment_id = %payment.id, error = %e, "a pending payment could not be finished")
                    }
                }
            }
            Ok(None) => match ctx.store.abandon(payment.id).await {
                Ok(true) => {
                    tracing::info!(payment_id = %payment.id, "a pending payment the provider never charged was withdrawn");
                    metrics::counter!("payments_reconciled_total", "outcome" => "abandoned")
                        .increment(1);
                    settled += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(payment_id = %payment.id, error = %e, "a pending payment could not be withdrawn")
                }
            },
            Err(e) => {
                tracing::warn!(payment_id = %payment.id, error = %e, "a pending payment could not be looked up")
            }
        }
    }
    settled
}

/// Runs [`reconcile_once`] at start and every `every` until `shutdown`.
pub async fn run_reconciler(
    ctx: ApiContext,
    after: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        reconcile_once(&ctx, after).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
