//! Payments and refunds, each written with its `payment.*` outbox row: the [`PaymentStore`]
//! contract and its SQLite implementation (PostgreSQL is in `crate::pg`, feature `postgres`).
//!
//! "One successful payment per order" is a partial unique index, so it holds under any
//! concurrency; "refunds never exceed the charge" is checked and updated in one write
//! transaction.

use std::sync::Arc;

use async_trait::async_trait;
use bus::Event;
use bus::event::{PaymentEvent, types};
use bus::names::PAYMENTS_TOPIC;
use bus::outbox::{self, Destination};
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, corrupt, is_unique_violation, now_ms};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;

pub static MIGRATIONS: &[Step] = &[
    (
        1,
        "payments",
        "CREATE TABLE payments (
            id TEXT PRIMARY KEY,
            order_id TEXT NOT NULL,
            amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0),
            currency TEXT NOT NULL,
            status TEXT NOT NULL,
            payment_method TEXT NOT NULL,
            card_last4 TEXT,
            provider_reference TEXT,
            failure_reason TEXT,
            refunded_cents INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            CHECK (refunded_cents >= 0 AND refunded_cents <= amount_cents)
        );
        CREATE INDEX payments_order ON payments (order_id, created_at);
        CREATE UNIQUE INDEX payments_one_success_per_order ON payments (order_id)
            WHERE status IN ('succeeded', 'partially_refunded', 'refunded');
        CREATE TABLE refunds (
            id TEXT PRIMARY KEY,
            payment_id TEXT NOT NULL REFERENCES payments (id),
            amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
            created_at INTEGER NOT NULL
        );",
    ),
    (2, "outbox", outbox::MIGRATION),
    (3, "idempotency keys", kit::idempotency::MIGRATION),
];

pub(crate) const SOURCE: &str = "mercato/payments";
pub(crate) const DESTINATIONS: &[Destination] = &[Destination::Stream(PAYMENTS_TOPIC)];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Payment {
    pub id: Uuid,
    pub order_id: Uuid,
    pub amount: Money,
    pub currency: String,
    /// `succeeded`, `failed`, `partially_refunded` or `refunded`.
    pub status: String,
    pub payment_method: String,
    pub card_last4: Option<String>,
    pub provider_reference: Option<String>,
    pub failure_reason: Option<String>,
    pub refunded_amount: Money,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Refund {
    pub id: Uuid,
    pub payment_id: Uuid,
    pub amount: Money,
    pub created_at: DateTime<Utc>,
    /// The payment after this refund.
    pub payment: Payment,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("this order already has a successful payment")]
    AlreadyPaid,
    #[error("payment not found")]
    NotFound,
    #[error("only a successful payment can be refunded")]
    NotRefundable,
    #[error("refund of {requested} exceeds the {remaining} left to refund")]
    RefundTooLarge { requested: Money, remaining: Money },
    #[error("stored value is corrupt")]
    Corrupt,
    #[error("event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
    /// DynamoDB failed, answered something unreadable, or kept refusing a contended write.
    #[cfg(feature = "dynamodb")]
    #[error("dynamodb: {0}")]
    Dynamo(String),
}

const COLUMNS: &str =
    "id, order_id, amount_cents, currency, status, payment_method, card_last4, provider_reference,
                       failure_reason, refunded_cents, created_at, updated_at";

fn to_payment(row: &Row<'_>) -> rusqlite::Result<Payment> {
    let id = |i: usize| -> rusqlite::Result<Uuid> {
        row.get::<_, String>(i)?.parse().map_err(corrupt(i))
    };
    let money = |i: usize| -> rusqlite::Result<Money> {
        Money::from_cents(row.get(i)?).map_err(corrupt(i))
    };
    let time = |i: usize| -> rusqlite::Result<DateTime<Utc>> {
        Ok(DateTime::from_timestamp_millis(row.get(i)?).unwrap_or_default())
    };
    Ok(Payment {
        id: id(0)?,
        order_id: id(1)?,
        amount: money(2)?,
        currency: row.get(3)?,
        status: row.get(4)?,
        payment_method: row.get(5)?,
        card_last4: row.get(6)?,
        provider_reference: row.get(7)?,
        failure_reason: row.get(8)?,
        refunded_amount: money(9)?,
        created_at: time(10)?,
        updated_at: time(11)?,
    })
}

pub(crate) fn event_for(
    payment: &Payment,
    event_type: &str,
    amount: Money,
) -> Result<Event, serde_json::Error> {
    let id = Uuid::now_v7();
    let payload = PaymentEvent {
        event_id: id,
        event_type: event_type.to_owned(),
        payment_id: payment.id,
        order_id: payment.order_id,
        amount,
        currency: payment.currency.clone(),
        status: payment.status.clone(),
        occurred_at: payment.updated_at,
        sequence: 0,
    };
    Event::new(
        id,
        event_type,
        SOURCE,
        payment.order_id.to_string(),
        &payload,
    )
}

/// The statuses of a payment that took the customer's money; at most one per order.
pub const SUCCESS_STATUSES: [&str; 3] = ["succeeded", "partially_refunded", "refunded"];

/// Where payments live. Implementations keep the same guarantees: a payment or refund and its
/// outbox row commit together, an order has at most one successful payment under any
/// concurrency, and refunds never sum past the charge.
#[async_trait]
pub trait PaymentStore: Send + Sync + std::fmt::Debug {
    /// Records a charge attempt's outcome and its event in one transaction;
    /// [`StoreError::AlreadyPaid`] when the order already has a successful payment.
    async fn record(&self, payment: &Payment) -> Result<(), StoreError>;

    async fn has_success(&self, order_id: Uuid) -> Result<bool, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Payment>, StoreError>;

    /// An order's payments, oldest first.
    async fn by_order(&self, order_id: Uuid) -> Result<Vec<Payment>, StoreError>;

    /// Refunds `amount` (everything left when `None`); the sum of refunds never passes the charge.
    async fn refund(&self, payment_id: Uuid, amount: Option<Money>) -> Result<Refund, StoreError>;

    /// Readiness: the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Flushes and closes the database at shutdown.
    async fn close(&self);
}

/// The refund rules, shared by every backend: only a successful payment, never zero, never
/// past what is left. Returns the payment as the refund leaves it and the amount refunded
/// (everything left when `amount` is `None`).
pub(crate) fn apply_refund(
    mut payment: Payment,
    amount: Option<Money>,
    now_ms: i64,
) -> Result<(Payment, Money), StoreError> {
    if !matches!(payment.status.as_str(), "succeeded" | "partially_refunded") {
        return Err(StoreError::NotRefundable);
    }
    let remaining = payment
        .amount
        .checked_sub(payment.refunded_amount)
        .ok_or(StoreError::Corrupt)?;
    let amount = amount.unwrap_or(remaining);
    if amount.cents() == 0 || amount > remaining {
        return Err(StoreError::RefundTooLarge {
            requested: amount,
            remaining,
        });
    }
    let refunded = payment
        .refunded_amount
        .checked_add(amount)
        .ok_or(StoreError::Corrupt)?;
    payment.refunded_amount = refunded;
    payment.status = if refunded == payment.amount {
        "refunded".into()
    } else {
        "partially_refunded".into()
    };
    payment.updated_at = DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
    Ok((payment, amount))
}

#[derive(Debug, Clone)]
pub struct SqlitePaymentStore {
    db: Db,
    wake_relay: Arc<Notify>,
}

impl SqlitePaymentStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<SqlitePaymentStore, DbError> {
        Ok(SqlitePaymentStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
            wake_relay: Arc::new(Notify::new()),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> SqlitePaymentStore {
        self.wake_relay = wake;
        self
    }
}

#[async_trait]
impl PaymentStore for SqlitePaymentStore {
    /// Records a charge attempt's outcome and its event in one transaction.
    async fn record(&self, payment: &Payment) -> Result<(), StoreError> {
        let event_type = if payment.status == "succeeded" {
            types::PAYMENT_SUCCEEDED
        } else {
            types::PAYMENT_FAILED
        };
        let event = event_for(payment, event_type, payment.amount)?;
        let p = payment.clone();
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO payments (id, order_id, amount_cents, currency, status, payment_method, card_last4,
                                           provider_reference, failure_reason, refunded_cents, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10, ?11)",
                    params![
                        p.id.to_string(),
                        p.order_id.to_string(),
                        p.amount.cents(),
                        p.currency,
                        p.status,
                        p.payment_method,
                        p.card_last4,
                        p.provider_reference,
                        p.failure_reason,
                        p.created_at.timestamp_millis(),
                        p.updated_at.timestamp_millis()
                    ],
                )
                .map_err(|e| if is_unique_violation(&e) { StoreError::AlreadyPaid } else { StoreError::Sqlite(e) })?;
                outbox::enqueue(tx, &event, DESTINATIONS)?;
                Ok::<_, StoreError>(())
            })
            .await?;
        self.wake_relay.notify_one();
        Ok(())
    }

    async fn has_success(&self, order_id: Uuid) -> Result<bool, StoreError> {
        self.db
            .read(move |conn| {
                Ok(conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM payments WHERE order_id = ?1
                                        AND status IN ('succeeded', 'partially_refunded', 'refunded'))",
                    )?
                    .query_row([order_id.to_string()], |r| r.get(0))?)
            })
            .await
    }

    async fn get(&self, id: Uuid) -> Result<Option<Payment>, StoreError> {
        self.db.read(move |conn| load(conn, id)).await
    }

    async fn by_order(&self, order_id: Uuid) -> Result<Vec<Payment>, StoreError> {
        self.db
            .read(move |conn| {
                Ok(conn
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM payments WHERE order_id = ?1 ORDER BY created_at, id"
                    ))?
                    .query_map([order_id.to_string()], to_payment)?
                    .collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Refunds `amount` (everything left when `None`); the sum of refunds never passes the charge.
    async fn refund(&self, payment_id: Uuid, amount: Option<Money>) -> Result<Refund, StoreError> {
        let refund = self
            .db
            .write(move |tx| {
                let payment = load(tx, payment_id)?.ok_or(StoreError::NotFound)?;
                let now = now_ms();
                let (payment, amount) = apply_refund(payment, amount, now)?;
                tx.execute(
                    "UPDATE payments SET refunded_cents = ?1, status = ?2, updated_at = ?3 WHERE id = ?4",
                    params![payment.refunded_amount.cents(), payment.status, now, payment_id.to_string()],
                )?;
                let refund_id = Uuid::now_v7();
                tx.execute(
                    "INSERT INTO refunds (id, payment_id, amount_cents, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![refund_id.to_string(), payment_id.to_string(), amount.cents(), now],
                )?;
                outbox::enqueue(tx, &event_for(&payment, types::PAYMENT_REFUNDED, amount)?, DESTINATIONS)?;
                Ok::<_, StoreError>(Refund { id: refund_id, payment_id, amount, created_at: payment.updated_at, payment })
            })
            .await?;
        self.wake_relay.notify_one();
        Ok(refund)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    async fn close(&self) {
        self.db.close().await;
    }
}

fn load(conn: &Connection, id: Uuid) -> Result<Option<Payment>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM payments WHERE id = ?1"))?
        .query_row([id.to_string()], to_payment)
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(order_id: Uuid, status: &str, cents: i64) -> Payment {
        let now = DateTime::from_timestamp_millis(now_ms()).unwrap();
        Payment {
            id: Uuid::now_v7(),
            order_id,
            amount: Money::from_cents(cents).unwrap(),
            currency: "USD".into(),
            status: status.into(),
            payment_method: "card".into(),
            card_last4: Some("4242".into()),
            provider_reference: None,
            failure_reason: None,
            refunded_amount: Money::ZERO,
            created_at: now,
            updated_at: now,
        }
    }

    #[tokio::test]
    async fn one_success_per_order_and_refunds_bounded_by_the_charge() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqlitePaymentStore::open(
            &format!("sqlite://{}/p.db", dir.path().display()),
            &Default::default(),
        )
        .await
        .unwrap();
        let order = Uuid::now_v7();
        store.record(&payment(order, "failed", 1000)).await.unwrap();
        let ok = payment(order, "succeeded", 1000);
        store.record(&ok).await.unwrap();
        assert!(matches!(
            store.record(&payment(order, "succeeded", 1000)).await,
            Err(StoreError::AlreadyPaid)
        ));

        let part = store
            .refund(ok.id, Some(Money::from_cents(300).unwrap()))
            .await
            .unwrap();
        assert_eq!(part.payment.status, "partially_refunded");
        assert!(matches!(
            store
                .refund(ok.id, Some(Money::from_cents(701).unwrap()))
                .await,
            Err(StoreError::RefundTooLarge { .. })
        ));
        let rest = store.refund(ok.id, None).await.unwrap();
        assert_eq!(rest.amount.cents(), 700);
        assert_eq!(rest.payment.status, "refunded");
        assert!(matches!(
            store.refund(ok.id, None).await,
            Err(StoreError::NotRefundable)
        ));
        let events: i64 = store
            .db()
            .read(|c| {
                Ok::<_, StoreError>(c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)
            })
            .await
            .unwrap();
        assert_eq!(events, 4, "failed, succeeded, two refunds");
    }
}
