//! Payments and refunds, each change written with its `payment.*` outbox row: the
//! [`PaymentStore`] contract and its SQLite implementation (PostgreSQL is in `crate::pg`,
//! DynamoDB in `crate::dynamo`).
//!
//! A payment is a state machine: `pending` (the intent, recorded before the provider is
//! called) → `succeeded` | `failed`; `succeeded` → `partially_refunded` → `refunded`. An order
//! has at most one attempt in flight or successful (`pending`, `succeeded`,
//! `partially_refunded`) under any concurrency: a partial unique index here and on PostgreSQL,
//! a guard item on DynamoDB. A refunded payment no longer counts, so it blocks nothing.
//!
//! Each payment has a version: 0 while pending, 1 once finished (its `payment.succeeded` or
//! `payment.failed` event), one more per refund; events carry it as `sequence`. A refund is
//! recorded only if the version is still the one it was computed from, so two refunds racing
//! on one payment never both count.

use std::sync::Arc;

use async_trait::async_trait;
use bus::Event;
use bus::event::{PaymentEvent, types};
use bus::names::PAYMENTS_TOPIC;
use bus::outbox::{self, Destination};
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, corrupt, is_unique_violation, now_ms};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
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
    // Existing payments get the version their events would have had: 1, plus one per refund.
    (
        4,
        "payment state machine",
        "ALTER TABLE payments ADD COLUMN card_brand TEXT;
        ALTER TABLE payments ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
        UPDATE payments SET version = 1 + (SELECT COUNT(*) FROM refunds WHERE payment_id = payments.id);
        DROP INDEX payments_one_success_per_order;
        CREATE UNIQUE INDEX payments_one_attempt_per_order ON payments (order_id)
            WHERE status IN ('pending', 'succeeded', 'partially_refunded');
        CREATE INDEX payments_pending ON payments (created_at) WHERE status = 'pending';
        ALTER TABLE refunds ADD COLUMN provider_reference TEXT;
        ALTER TABLE refunds ADD COLUMN reason TEXT;",
    ),
];

pub(crate) const SOURCE: &str = "mercato/payments";
pub(crate) const DESTINATIONS: &[Destination] = &[Destination::Stream(PAYMENTS_TOPIC)];

/// The statuses that hold an order: one attempt in flight, or the money taken and not all
/// given back. At most one payment per order is in one of them.
pub const HOLDING_STATUSES: [&str; 3] = ["pending", "succeeded", "partially_refunded"];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Payment {
    pub id: Uuid,
    pub order_id: Uuid,
    pub amount: Money,
    pub currency: String,
    /// `pending`, `succeeded`, `failed`, `partially_refunded` or `refunded`.
    pub status: String,
    /// The client's own word for it (`credit_card`, ...), kept and returned as sent.
    pub payment_method: String,
    /// `visa`, `mastercard`, `amex`, `rupay` or `unknown`: never the card number.
    pub card_brand: Option<String>,
    pub card_last4: Option<String>,
    pub provider_reference: Option<String>,
    pub failure_reason: Option<String>,
    pub refunded_amount: Money,
    /// 0 while pending, 1 once finished, one more per refund (the events' `sequence`).
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Payment {
    pub fn is_pending(&self) -> bool {
        self.status == "pending"
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Refund {
    pub id: Uuid,
    pub payment_id: Uuid,
    pub amount: Money,
    pub created_at: DateTime<Utc>,
    /// The refund's reference at the provider.
    pub provider_reference: Option<String>,
    /// Why, when the platform refunded by itself (`order_cancelled`, ...).
    pub reason: Option<String>,
    /// The payment after this refund.
    pub payment: Payment,
}

/// How the provider finished a pending payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Succeeded {
        reference: String,
        /// Brand and last four, when the provider tells them.
        card: Option<(String, String)>,
    },
    Failed {
        reference: Option<String>,
        reason: String,
    },
}

/// A pending payment after [`PaymentStore::finish`]; `changed` is false when it was already
/// finished (by a webhook, the reconciler or the request itself), so its follow-ups ran then.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub payment: Payment,
    pub changed: bool,
}

/// A refund the provider made, to record against the payment's `expected_version`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRefund {
    pub id: Uuid,
    pub payment_id: Uuid,
    pub expected_version: u64,
    pub amount: Money,
    pub provider_reference: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("this order already has a successful payment")]
    AlreadyPaid,
    #[error("a payment of this order is in progress")]
    InProgress,
    #[error("payment not found")]
    NotFound,
    #[error("only a successful payment can be refunded")]
    NotRefundable,
    #[error("refund of {requested} exceeds the {remaining} left to refund")]
    RefundTooLarge { requested: Money, remaining: Money },
    /// The payment changed (another refund) since the refund was computed from it.
    #[error("the payment changed meanwhile")]
    Conflict,
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
                       failure_reason, refunded_cents, created_at, updated_at, card_brand, version";

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
        card_brand: row.get(12)?,
        version: u64::try_from(row.get::<_, i64>(13)?).map_err(corrupt(13))?,
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
        sequence: payment.version,
    };
    Event::new(
        id,
        event_type,
        SOURCE,
        payment.order_id.to_string(),
        &payload,
    )
}

/// Where payments live. Every implementation keeps the same guarantees: a change and its
/// outbox row commit together; an order has at most one payment in [`HOLDING_STATUSES`] under
/// any concurrency; a pending payment is finished once; refunds never sum past the charge and
/// are recorded only against the version they were computed from.
#[async_trait]
pub trait PaymentStore: Send + Sync + std::fmt::Debug {
    /// Records a `pending` payment (no event: nothing happened yet).
    /// [`StoreError::AlreadyPaid`] or [`StoreError::InProgress`] when the order is held.
    async fn begin(&self, payment: &Payment) -> Result<(), StoreError>;

    /// Finishes a pending payment with its event (version 1); a payment already finished is
    /// returned as it is.
    async fn finish(&self, id: Uuid, settlement: &Settlement) -> Result<Finished, StoreError>;

    /// Withdraws a pending payment the provider never charged (no event: nothing happened);
    /// false when it is not pending (any more).
    async fn abandon(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Pending payments created before `before`, oldest first, at most `limit`.
    async fn pending_before(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Payment>, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Payment>, StoreError>;

    /// An order's payments, oldest first.
    async fn by_order(&self, order_id: Uuid) -> Result<Vec<Payment>, StoreError>;

    /// Records a refund the provider made, with its event; [`StoreError::Conflict`] when the
    /// payment's version is no longer `expected_version`.
    async fn refund(&self, refund: &NewRefund) -> Result<Refund, StoreError>;

    /// Readiness: the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Flushes and closes the database at shutdown.
    async fn close(&self);
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The finishing rules, shared by every backend: `None` when `payment` is not pending.
pub(crate) fn apply_settlement(
    mut payment: Payment,
    settlement: &Settlement,
    now_ms: i64,
) -> Option<Payment> {
    if !payment.is_pending() {
        return None;
    }
    match settlement {
        Settlement::Succeeded { reference, card } => {
            payment.status = "succeeded".into();
            payment.provider_reference = Some(reference.clone());
            if let Some((brand, last4)) = card {
                payment.card_brand = Some(brand.clone());
                payment.card_last4 = Some(last4.clone());
            }
        }
        Settlement::Failed { reference, reason } => {
            payment.status = "failed".into();
            payment.provider_reference = reference.clone();
            payment.failure_reason = Some(reason.clone());
        }
    }
    payment.version = 1;
    payment.updated_at = at(now_ms);
    Some(payment)
}

/// The event type of a finished payment.
pub(crate) fn outcome_event(payment: &Payment) -> &'static str {
    if payment.status == "failed" {
        types::PAYMENT_FAILED
    } else {
        types::PAYMENT_SUCCEEDED
    }
}

/// The refund rules, shared by every backend: only a successful payment, never zero, never
/// past what is left. Returns the payment as the refund leaves it (one version more) and the
/// amount refunded (everything left when `amount` is `None`).
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
    payment.version += 1;
    payment.updated_at = at(now_ms);
    Ok((payment, amount))
}

/// [`apply_refund`] for a recorded refund: the version must not have moved.
pub(crate) fn apply_new_refund(
    payment: Payment,
    refund: &NewRefund,
    now_ms: i64,
) -> Result<Refund, StoreError> {
    if payment.version != refund.expected_version {
        return Err(StoreError::Conflict);
    }
    let (payment, amount) = apply_refund(payment, Some(refund.amount), now_ms)?;
    Ok(Refund {
        id: refund.id,
        payment_id: refund.payment_id,
        amount,
        created_at: payment.updated_at,
        provider_reference: refund.provider_reference.clone(),
        reason: refund.reason.clone(),
        payment,
    })
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

/// Which of the two refusals a held order means: its holder is pending or it is paid.
fn holder_refusal(tx: &Transaction<'_>, order_id: Uuid) -> Result<StoreError, StoreError> {
    let status: Option<String> = tx
        .query_row(
            "SELECT status FROM payments WHERE order_id = ?1
             AND status IN ('pending', 'succeeded', 'partially_refunded')",
            [order_id.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match status.as_deref() {
        Some("pending") => StoreError::InProgress,
        _ => StoreError::AlreadyPaid,
    })
}

#[async_trait]
impl PaymentStore for SqlitePaymentStore {
    async fn begin(&self, payment: &Payment) -> Result<(), StoreError> {
        let p = payment.clone();
        self.db
            .write(move |tx| {
                let inserted = tx.execute(
                    "INSERT INTO payments (id, order_id, amount_cents, currency, status, payment_method, card_last4,
                                           provider_reference, failure_reason, refunded_cents, created_at, updated_at,
                                           card_brand, version)
                     VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, NULL, NULL, 0, ?7, ?8, ?9, 0)",
                    params![
                        p.id.to_string(),
                        p.order_id.to_string(),
                        p.amount.cents(),
                        p.currency,
                        p.payment_method,
                        p.card_last4,
                        p.created_at.timestamp_millis(),
                        p.updated_at.timestamp_millis(),
                        p.card_brand,
                    ],
                );
                match inserted {
                    Ok(_) => Ok(()),
                    Err(e) if is_unique_violation(&e) => Err(holder_refusal(tx, p.order_id)?),
                    Err(e) => Err(StoreError::Sqlite(e)),
                }
            })
            .await
    }

    async fn finish(&self, id: Uuid, settlement: &Settlement) -> Result<Finished, StoreError> {
        let settlement = settlement.clone();
        let finished = self
            .db
            .write(move |tx| {
                let current = load(tx, id)?.ok_or(StoreError::NotFound)?;
                let Some(payment) = apply_settlement(current.clone(), &settlement, now_ms()) else {
                    return Ok(Finished {
                        payment: current,
                        changed: false,
                    });
                };
                tx.execute(
                    "UPDATE payments SET status = ?2, provider_reference = ?3, failure_reason = ?4,
                            card_brand = ?5, card_last4 = ?6, version = ?7, updated_at = ?8
                     WHERE id = ?1 AND status = 'pending'",
                    params![
                        id.to_string(),
                        payment.status,
                        payment.provider_reference,
                        payment.failure_reason,
                        payment.card_brand,
                        payment.card_last4,
                        payment.version as i64,
                        payment.updated_at.timestamp_millis(),
                    ],
                )?;
                let event = event_for(&payment, outcome_event(&payment), payment.amount)?;
                outbox::enqueue(tx, &event, DESTINATIONS)?;
                Ok::<_, StoreError>(Finished {
                    payment,
                    changed: true,
                })
            })
            .await?;
        if finished.changed {
            self.wake_relay.notify_one();
        }
        Ok(finished)
    }

    async fn abandon(&self, id: Uuid) -> Result<bool, StoreError> {
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "DELETE FROM payments WHERE id = ?1 AND status = 'pending'",
                    [id.to_string()],
                )? == 1)
            })
            .await
    }

    async fn pending_before(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Payment>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db
            .read(move |conn| {
                Ok(conn
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM payments WHERE status = 'pending' AND created_at < ?1
                         ORDER BY created_at LIMIT ?2"
                    ))?
                    .query_map(params![before.timestamp_millis(), limit], to_payment)?
                    .collect::<Result<Vec<_>, _>>()?)
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

    async fn refund(&self, refund: &NewRefund) -> Result<Refund, StoreError> {
        let new = refund.clone();
        let refund = self
            .db
            .write(move |tx| {
                let payment = load(tx, new.payment_id)?.ok_or(StoreError::NotFound)?;
                let refund = apply_new_refund(payment, &new, now_ms())?;
                let p = &refund.payment;
                tx.execute(
                    "UPDATE payments SET refunded_cents = ?1, status = ?2, version = ?3, updated_at = ?4
                     WHERE id = ?5 AND version = ?6",
                    params![
                        p.refunded_amount.cents(),
                        p.status,
                        p.version as i64,
                        p.updated_at.timestamp_millis(),
                        p.id.to_string(),
                        new.expected_version as i64,
                    ],
                )?;
                tx.execute(
                    "INSERT INTO refunds (id, payment_id, amount_cents, created_at, provider_reference, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        refund.id.to_string(),
                        refund.payment_id.to_string(),
                        refund.amount.cents(),
                        refund.created_at.timestamp_millis(),
                        refund.provider_reference,
                        refund.reason,
                    ],
                )?;
                outbox::enqueue(tx, &event_for(p, types::PAYMENT_REFUNDED, refund.amount)?, DESTINATIONS)?;
                Ok::<_, StoreError>(refund)
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn payment(status: &str, cents: i64, refunded: i64, version: u64) -> Payment {
        Payment {
            id: Uuid::now_v7(),
            order_id: Uuid::now_v7(),
            amount: Money::from_cents(cents).unwrap(),
            currency: "USD".into(),
            status: status.into(),
            payment_method: "card".into(),
            card_brand: Some("visa".into()),
            card_last4: Some("4242".into()),
            provider_reference: None,
            failure_reason: None,
            refunded_amount: Money::from_cents(refunded).unwrap(),
            version,
            created_at: at(0),
            updated_at: at(0),
        }
    }

    #[test]
    fn a_pending_payment_finishes_once_at_version_one() {
        let pending = payment("pending", 1000, 0, 0);
        let ok = apply_settlement(
            pending.clone(),
            &Settlement::Succeeded {
                reference: "pi_1".into(),
                card: Some(("mastercard".into(), "4444".into())),
            },
            5,
        )
        .unwrap();
        assert_eq!(
            (ok.status.as_str(), ok.version, ok.card_brand.as_deref()),
            ("succeeded", 1, Some("mastercard"))
        );
        assert_eq!(outcome_event(&ok), types::PAYMENT_SUCCEEDED);
        let failed = Settlement::Failed {
            reference: None,
            reason: "card_declined".into(),
        };
        assert_eq!(apply_settlement(ok, &failed, 6), None, "finished already");
        let no = apply_settlement(pending, &failed, 6).unwrap();
        assert_eq!((no.status.as_str(), no.version), ("failed", 1));
        assert_eq!(outcome_event(&no), types::PAYMENT_FAILED);
    }

    #[test]
    fn refunds_sum_exactly_and_count_versions() {
        let paid = payment("succeeded", 2500, 0, 1);
        let (part, amount) = apply_refund(paid, Some(Money::from_cents(1000).unwrap()), 1).unwrap();
        assert_eq!(
            (amount.cents(), part.status.as_str(), part.version),
            (1000, "partially_refunded", 2)
        );
        let (rest, amount) = apply_refund(part.clone(), None, 2).unwrap();
        assert_eq!(
            (amount.cents(), rest.status.as_str(), rest.version),
            (1500, "refunded", 3)
        );
        assert!(matches!(
            apply_refund(rest, None, 3),
            Err(StoreError::NotRefundable)
        ));
        assert!(matches!(
            apply_refund(part.clone(), Some(Money::from_cents(1501).unwrap()), 3),
            Err(StoreError::RefundTooLarge { .. })
        ));
        assert!(matches!(
            apply_refund(payment("pending", 100, 0, 0), None, 3),
            Err(StoreError::NotRefundable)
        ));
        let stale = NewRefund {
            id: Uuid::now_v7(),
            payment_id: part.id,
            expected_version: 1,
            amount: Money::from_cents(1).unwrap(),
            provider_reference: None,
            reason: None,
        };
        assert!(matches!(
            apply_new_refund(part, &stale, 4),
            Err(StoreError::Conflict)
        ));
    }
}
