//! Payments and refunds in SQLite, each written with its `payment.*` outbox row.
//!
//! "One successful payment per order" is a partial unique index, so it holds under any
//! concurrency; "refunds never exceed the charge" is checked and updated in one write
//! transaction.

use std::sync::Arc;

use bus::Event;
use bus::event::{PaymentEvent, types};
use bus::names::PAYMENTS_TOPIC;
use bus::outbox::{self, Destination};
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, is_unique_violation, now_ms};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
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
];

const SOURCE: &str = "mercato/payments";
const DESTINATIONS: &[Destination] = &[Destination::Stream(PAYMENTS_TOPIC)];

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
    Db(#[from] sqlx::Error),
}

fn uuid_of(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let s: String = row.try_get(column)?;
    s.parse().map_err(|_| StoreError::Corrupt)
}

fn to_payment(row: &SqliteRow) -> Result<Payment, StoreError> {
    let money = |c: &str| -> Result<Money, StoreError> {
        Money::from_cents(row.try_get(c)?).map_err(|_| StoreError::Corrupt)
    };
    let time = |c: &str| -> Result<DateTime<Utc>, StoreError> {
        DateTime::from_timestamp_millis(row.try_get(c)?).ok_or(StoreError::Corrupt)
    };
    Ok(Payment {
        id: uuid_of(row, "id")?,
        order_id: uuid_of(row, "order_id")?,
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

fn event_for(
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
    };
    Event::new(
        id,
        event_type,
        SOURCE,
        payment.order_id.to_string(),
        &payload,
    )
}

#[derive(Debug, Clone)]
pub struct PaymentStore {
    db: Db,
    wake_relay: Arc<Notify>,
}

impl PaymentStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<PaymentStore, DbError> {
        Ok(PaymentStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
            wake_relay: Arc::new(Notify::new()),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> PaymentStore {
        self.wake_relay = wake;
        self
    }

    /// Records a charge attempt's outcome and its event in one transaction.
    pub async fn record(&self, payment: &Payment) -> Result<(), StoreError> {
        let event_type = if payment.status == "succeeded" {
            types::PAYMENT_SUCCEEDED
        } else {
            types::PAYMENT_FAILED
        };
        let event = event_for(payment, event_type, payment.amount)?;
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO payments (id, order_id, amount_cents, currency, status, payment_method, card_last4,
                                   provider_reference, failure_reason, refunded_cents, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
        )
        .bind(payment.id.to_string())
        .bind(payment.order_id.to_string())
        .bind(payment.amount.cents())
        .bind(&payment.currency)
        .bind(&payment.status)
        .bind(&payment.payment_method)
        .bind(&payment.card_last4)
        .bind(&payment.provider_reference)
        .bind(&payment.failure_reason)
        .bind(payment.created_at.timestamp_millis())
        .bind(payment.updated_at.timestamp_millis())
        .execute(&mut *tx)
        .await
        .map_err(|e| if is_unique_violation(&e) { StoreError::AlreadyPaid } else { StoreError::Db(e) })?;
        outbox::enqueue(&mut tx, &event, DESTINATIONS).await?;
        tx.commit().await?;
        self.wake_relay.notify_one();
        Ok(())
    }

    pub async fn has_success(&self, order_id: Uuid) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM payments WHERE order_id = ? AND status IN ('succeeded', 'partially_refunded', 'refunded')",
        )
        .bind(order_id.to_string())
        .fetch_one(&self.db.read)
        .await?;
        Ok(n > 0)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Payment>, StoreError> {
        let mut conn = self.db.read.acquire().await?;
        load(&mut conn, id).await
    }

    pub async fn by_order(&self, order_id: Uuid) -> Result<Vec<Payment>, StoreError> {
        sqlx::query("SELECT * FROM payments WHERE order_id = ? ORDER BY created_at, id")
            .bind(order_id.to_string())
            .fetch_all(&self.db.read)
            .await?
            .iter()
            .map(to_payment)
            .collect()
    }

    /// Refunds `amount` (everything left when `None`); the sum of refunds never passes the charge.
    pub async fn refund(
        &self,
        payment_id: Uuid,
        amount: Option<Money>,
    ) -> Result<Refund, StoreError> {
        let mut tx = self.db.begin().await?;
        let mut payment = load(&mut tx, payment_id)
            .await?
            .ok_or(StoreError::NotFound)?;
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
        let now = now_ms();
        payment.refunded_amount = refunded;
        payment.status = if refunded == payment.amount {
            "refunded".into()
        } else {
            "partially_refunded".into()
        };
        payment.updated_at = DateTime::from_timestamp_millis(now).unwrap_or_default();
        sqlx::query(
            "UPDATE payments SET refunded_cents = ?, status = ?, updated_at = ? WHERE id = ?",
        )
        .bind(refunded.cents())
        .bind(&payment.status)
        .bind(now)
        .bind(payment_id.to_string())
        .execute(&mut *tx)
        .await?;
        let refund_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO refunds (id, payment_id, amount_cents, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(refund_id.to_string())
        .bind(payment_id.to_string())
        .bind(amount.cents())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        outbox::enqueue(
            &mut tx,
            &event_for(&payment, types::PAYMENT_REFUNDED, amount)?,
            DESTINATIONS,
        )
        .await?;
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
}

async fn load(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Payment>, StoreError> {
    sqlx::query("SELECT * FROM payments WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(to_payment)
        .transpose()
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
        let store = PaymentStore::open(
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
        let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&store.db().read)
            .await
            .unwrap();
        assert_eq!(events, 4, "failed, succeeded, two refunds");
    }
}
