//! The payments store on PostgreSQL (feature `postgres`), with the same semantics as the
//! SQLite one: each change and its outbox row in one transaction, at most one payment per
//! order in flight or successful (a partial unique index, so it holds under any concurrency),
//! a pending payment finished once, refunds never past the charge and only against the
//! version they were computed from.
//!
//! SQLite serialises writes through its single writer; here finishing and refunding lock the
//! payment row (`SELECT ... FOR UPDATE`) before applying the shared rules, so concurrent changes
//! of one payment queue up and each sees what the previous left. The CHECK on
//! `refunded_cents` is the backstop.

use std::sync::Arc;

use async_trait::async_trait;
use bus::event::types;
use chrono::DateTime;
use kit::Money;
use kit::db::now_ms;
use kit::pg::{Pg, PgStep};
use sqlx::Row as _;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::store::{
    DESTINATIONS, Finished, HOLDING_STATUSES, NewRefund, Payment, PaymentStore, Refund, Settlement,
    StoreError, apply_new_refund, apply_settlement, event_for, outcome_event,
};

/// Timestamps are Unix milliseconds in BIGINT as in SQLite (and the shared outbox); money is
/// BIGINT cents.
pub static MIGRATIONS: &[PgStep] = &[
    (
        1,
        "payments",
        "CREATE TABLE payments (
            id UUID PRIMARY KEY,
            order_id UUID NOT NULL,
            amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
            currency TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('succeeded', 'failed', 'partially_refunded', 'refunded')),
            payment_method TEXT NOT NULL,
            card_last4 TEXT,
            provider_reference TEXT,
            failure_reason TEXT,
            refunded_cents BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            CHECK (refunded_cents >= 0 AND refunded_cents <= amount_cents)
        );
        CREATE INDEX payments_order ON payments (order_id, created_at, id);
        CREATE UNIQUE INDEX payments_one_success_per_order ON payments (order_id)
            WHERE status IN ('succeeded', 'partially_refunded', 'refunded');
        CREATE TABLE refunds (
            id UUID PRIMARY KEY,
            payment_id UUID NOT NULL REFERENCES payments (id),
            amount_cents BIGINT NOT NULL CHECK (amount_cents > 0),
            created_at BIGINT NOT NULL
        );
        CREATE INDEX refunds_payment ON refunds (payment_id);",
    ),
    (2, "outbox", bus::outbox::PG_MIGRATION),
    (3, "idempotency keys", kit::idempotency::PG_MIGRATION),
    // Existing payments get the version their events would have had: 1, plus one per refund.
    (
        4,
        "payment state machine",
        "ALTER TABLE payments DROP CONSTRAINT payments_status_check;
        ALTER TABLE payments ADD CONSTRAINT payments_status_check
            CHECK (status IN ('pending', 'succeeded', 'failed', 'partially_refunded', 'refunded'));
        ALTER TABLE payments ADD COLUMN card_brand TEXT, ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
        UPDATE payments SET version = 1 + (SELECT COUNT(*) FROM refunds r WHERE r.payment_id = payments.id);
        DROP INDEX payments_one_success_per_order;
        CREATE UNIQUE INDEX payments_one_attempt_per_order ON payments (order_id)
            WHERE status IN ('pending', 'succeeded', 'partially_refunded');
        CREATE INDEX payments_pending ON payments (created_at) WHERE status = 'pending';
        ALTER TABLE refunds ADD COLUMN provider_reference TEXT, ADD COLUMN reason TEXT;",
    ),
    (
        5,
        "outbox retrying index",
        bus::outbox::PG_MIGRATION_RETRYING_INDEX,
    ),
];

#[derive(Debug, Clone)]
pub struct PgPaymentStore {
    pg: Pg,
    wake_relay: Arc<Notify>,
}

impl PgPaymentStore {
    /// A store over `pg`, opened with [`MIGRATIONS`].
    pub fn new(pg: Pg) -> PgPaymentStore {
        PgPaymentStore {
            pg,
            wake_relay: Arc::new(Notify::new()),
        }
    }

    pub fn pg(&self) -> &Pg {
        &self.pg
    }

    /// Lets the outbox relay know, right after commit, that events are waiting.
    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> PgPaymentStore {
        self.wake_relay = wake;
        self
    }
}

fn to_payment(row: &sqlx::postgres::PgRow) -> Result<Payment, StoreError> {
    let money = |column: &str| -> Result<Money, StoreError> {
        Money::from_cents(row.try_get(column)?).map_err(|_| StoreError::Corrupt)
    };
    let time = |column: &str| -> Result<DateTime<chrono::Utc>, StoreError> {
        DateTime::from_timestamp_millis(row.try_get(column)?).ok_or(StoreError::Corrupt)
    };
    Ok(Payment {
        id: row.try_get("id")?,
        order_id: row.try_get("order_id")?,
        amount: money("amount_cents")?,
        currency: row.try_get("currency")?,
        status: row.try_get("status")?,
        payment_method: row.try_get("payment_method")?,
        card_last4: row.try_get("card_last4")?,
        provider_reference: row.try_get("provider_reference")?,
        failure_reason: row.try_get("failure_reason")?,
        refunded_amount: money("refunded_cents")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        card_brand: row.try_get("card_brand")?,
        version: u64::try_from(row.try_get::<i64, _>("version")?)
            .map_err(|_| StoreError::Corrupt)?,
    })
}

/// A payment's version as PostgreSQL stores it.
fn version(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl PaymentStore for PgPaymentStore {
    async fn begin(&self, p: &Payment) -> Result<(), StoreError> {
        // A second attempt for the order waits on the index entry of the first until that
        // transaction ends, then fails with a unique violation.
        let inserted = sqlx::query(
            "INSERT INTO payments (id, order_id, amount_cents, currency, status, payment_method, card_last4,
                                   provider_reference, failure_reason, refunded_cents, created_at, updated_at,
                                   card_brand, version)
             VALUES ($1, $2, $3, $4, 'pending', $5, $6, NULL, NULL, 0, $7, $8, $9, 0)",
        )
        .bind(p.id)
        .bind(p.order_id)
        .bind(p.amount.cents())
        .bind(&p.currency)
        .bind(&p.payment_method)
        .bind(&p.card_last4)
        .bind(p.created_at.timestamp_millis())
        .bind(p.updated_at.timestamp_millis())
        .bind(&p.card_brand)
        .execute(self.pg.pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if kit::pg::is_unique_violation(&e) => {
                let holder: Option<String> = sqlx::query_scalar(
                    "SELECT status FROM payments WHERE order_id = $1 AND status = ANY($2)",
                )
                .bind(p.order_id)
                .bind(&HOLDING_STATUSES[..])
                .fetch_optional(self.pg.pool())
                .await?;
                // A holder gone since (abandoned) was still in flight a moment ago.
                Err(match holder.as_deref() {
                    Some("succeeded" | "partially_refunded") => StoreError::AlreadyPaid,
                    _ => StoreError::InProgress,
                })
            }
            Err(e) => Err(StoreError::Postgres(e)),
        }
    }

    async fn finish(&self, id: Uuid, settlement: &Settlement) -> Result<Finished, StoreError> {
        kit::pg::traced("UPDATE payments; INSERT outbox", async {
            let mut tx = self.pg.pool().begin().await?;
            let row = sqlx::query("SELECT * FROM payments WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
            let current = to_payment(&row)?;
            let Some(payment) = apply_settlement(current.clone(), settlement, now_ms()) else {
                return Ok(Finished {
                    payment: current,
                    changed: false,
                });
            };
            sqlx::query(
                "UPDATE payments SET status = $2, provider_reference = $3, failure_reason = $4,
                    card_brand = $5, card_last4 = $6, version = $7, updated_at = $8
             WHERE id = $1",
            )
            .bind(id)
            .bind(&payment.status)
            .bind(&payment.provider_reference)
            .bind(&payment.failure_reason)
            .bind(&payment.card_brand)
            .bind(&payment.card_last4)
            .bind(version(payment.version))
            .bind(payment.updated_at.timestamp_millis())
            .execute(&mut *tx)
            .await?;
            let event = event_for(&payment, outcome_event(&payment), payment.amount)?;
            bus::outbox::enqueue_pg(&mut tx, &event, DESTINATIONS).await?;
            tx.commit().await?;
            self.wake_relay.notify_one();
            Ok(Finished {
                payment,
                changed: true,
            })
        })
        .await
    }

    async fn abandon(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("DELETE FROM payments WHERE id = $1 AND status = 'pending'")
                .bind(id)
                .execute(self.pg.pool())
                .await?
                .rows_affected()
                == 1,
        )
    }

    async fn pending_before(
        &self,
        before: DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Vec<Payment>, StoreError> {
        sqlx::query(
            "SELECT * FROM payments WHERE status = 'pending' AND created_at < $1
             ORDER BY created_at LIMIT $2",
        )
        .bind(before.timestamp_millis())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pg.pool())
        .await?
        .iter()
        .map(to_payment)
        .collect()
    }

    async fn get(&self, id: Uuid) -> Result<Option<Payment>, StoreError> {
        sqlx::query("SELECT * FROM payments WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pg.pool())
            .await?
            .as_ref()
            .map(to_payment)
            .transpose()
    }

    async fn by_order(&self, order_id: Uuid) -> Result<Vec<Payment>, StoreError> {
        sqlx::query("SELECT * FROM payments WHERE order_id = $1 ORDER BY created_at, id")
            .bind(order_id)
            .fetch_all(self.pg.pool())
            .await?
            .iter()
            .map(to_payment)
            .collect()
    }

    async fn refund(&self, new: &NewRefund) -> Result<Refund, StoreError> {
        kit::pg::traced("INSERT refunds outbox; UPDATE payments", async {
        let mut tx = self.pg.pool().begin().await?;
        let row = sqlx::query("SELECT * FROM payments WHERE id = $1 FOR UPDATE")
            .bind(new.payment_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let refund = apply_new_refund(to_payment(&row)?, new, now_ms())?;
        let p = &refund.payment;
        sqlx::query(
            "UPDATE payments SET refunded_cents = $2, status = $3, version = $4, updated_at = $5
             WHERE id = $1",
        )
        .bind(p.id)
        .bind(p.refunded_amount.cents())
        .bind(&p.status)
        .bind(version(p.version))
        .bind(p.updated_at.timestamp_millis())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO refunds (id, payment_id, amount_cents, created_at, provider_reference, reason)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(refund.id)
        .bind(refund.payment_id)
        .bind(refund.amount.cents())
        .bind(refund.created_at.timestamp_millis())
        .bind(&refund.provider_reference)
        .bind(&refund.reason)
        .execute(&mut *tx)
        .await?;
        let event = event_for(p, types::PAYMENT_REFUNDED, refund.amount)?;
        bus::outbox::enqueue_pg(&mut tx, &event, DESTINATIONS).await?;
        tx.commit().await?;
        self.wake_relay.notify_one();
        Ok(refund)
            })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pg.pool()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pg.close().await;
    }
}
