//! The payments store on PostgreSQL (feature `postgres`), with the same semantics as the
//! SQLite one: a payment or refund and its outbox row in one transaction, at most one
//! successful payment per order (a partial unique index, so it holds under any concurrency),
//! refunds never past the charge.
//!
//! SQLite serialises refunds through its single writer; here the refund locks the payment row
//! (`SELECT ... FOR UPDATE`) before applying the shared rules, so concurrent refunds of one
//! payment queue up and each sees what the previous left. The CHECK on `refunded_cents` is the
//! backstop.

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
    DESTINATIONS, Payment, PaymentStore, Refund, SUCCESS_STATUSES, StoreError, apply_refund,
    event_for,
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
    })
}

#[async_trait]
impl PaymentStore for PgPaymentStore {
    async fn record(&self, payment: &Payment) -> Result<(), StoreError> {
        let event_type = if payment.status == "succeeded" {
            types::PAYMENT_SUCCEEDED
        } else {
            types::PAYMENT_FAILED
        };
        let event = event_for(payment, event_type, payment.amount)?;
        let p = payment;
        let mut tx = self.pg.pool().begin().await?;
        // A second success for the order waits on the index entry of the first until that
        // transaction ends, then fails with a unique violation: AlreadyPaid.
        sqlx::query(
            "INSERT INTO payments (id, order_id, amount_cents, currency, status, payment_method, card_last4,
                                   provider_reference, failure_reason, refunded_cents, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11)",
        )
        .bind(p.id)
        .bind(p.order_id)
        .bind(p.amount.cents())
        .bind(&p.currency)
        .bind(&p.status)
        .bind(&p.payment_method)
        .bind(&p.card_last4)
        .bind(&p.provider_reference)
        .bind(&p.failure_reason)
        .bind(p.created_at.timestamp_millis())
        .bind(p.updated_at.timestamp_millis())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if kit::pg::is_unique_violation(&e) {
                StoreError::AlreadyPaid
            } else {
                StoreError::Postgres(e)
            }
        })?;
        bus::outbox::enqueue_pg(&mut tx, &event, DESTINATIONS).await?;
        tx.commit().await?;
        self.wake_relay.notify_one();
        Ok(())
    }

    async fn has_success(&self, order_id: Uuid) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM payments WHERE order_id = $1 AND status = ANY($2))",
        )
        .bind(order_id)
        .bind(&SUCCESS_STATUSES[..])
        .fetch_one(self.pg.pool())
        .await?)
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

    async fn refund(&self, payment_id: Uuid, amount: Option<Money>) -> Result<Refund, StoreError> {
        let mut tx = self.pg.pool().begin().await?;
        let row = sqlx::query("SELECT * FROM payments WHERE id = $1 FOR UPDATE")
            .bind(payment_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let now = now_ms();
        let (payment, amount) = apply_refund(to_payment(&row)?, amount, now)?;
        sqlx::query(
            "UPDATE payments SET refunded_cents = $2, status = $3, updated_at = $4 WHERE id = $1",
        )
        .bind(payment_id)
        .bind(payment.refunded_amount.cents())
        .bind(&payment.status)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let refund_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO refunds (id, payment_id, amount_cents, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(refund_id)
        .bind(payment_id)
        .bind(amount.cents())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let event = event_for(&payment, types::PAYMENT_REFUNDED, amount)?;
        bus::outbox::enqueue_pg(&mut tx, &event, DESTINATIONS).await?;
        tx.commit().await?;
        self.wake_relay.notify_one();
        Ok(Refund {
            id: refund_id,
            payment_id,
            amount,
            created_at: payment.updated_at,
            payment,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pg.pool()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pg.close().await;
    }
}
