//! Notification records in PostgreSQL (feature `postgres`): the same contract as the SQLite
//! store, in the service's own schema. A unique `event_id` makes a redelivered event a no-op,
//! even when two pollers insert it at the same moment (the second waits on the key, then
//! does nothing).
//!
//! Money is BIGINT cents and `created_at` BIGINT milliseconds, exactly as in SQLite, so both
//! backends round-trip and order records identically.

use async_trait::async_trait;
use chrono::DateTime;
use kit::Money;
use kit::config::PostgresSettings;
use kit::pg::{Pg, PgError, PgStep};
use sqlx::Row as _;
use sqlx::postgres::PgRow;

use crate::content::Notification;
use crate::store::{Filter, NotificationStore, StoreError, notification_cursor};
use kit::page::Page;

pub static PG_MIGRATIONS: &[PgStep] = &[(
    1,
    "notifications",
    "CREATE TABLE notifications (
        id UUID PRIMARY KEY,
        event_id UUID NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        order_id UUID NOT NULL,
        user_id UUID NOT NULL,
        recipient TEXT NOT NULL,
        subject TEXT NOT NULL,
        body TEXT NOT NULL,
        amount_cents BIGINT NOT NULL,
        currency TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX notifications_user ON notifications (user_id, created_at, id);
    CREATE INDEX notifications_order ON notifications (order_id, created_at, id);
    CREATE INDEX notifications_created ON notifications (created_at, id);",
)];

#[derive(Debug, Clone)]
pub struct PgNotificationStore {
    pg: Pg,
}

impl PgNotificationStore {
    /// Connects and migrates `schema` (the service name in production).
    pub async fn open(
        url: &str,
        schema: &str,
        settings: &PostgresSettings,
    ) -> Result<PgNotificationStore, PgError> {
        Ok(PgNotificationStore {
            pg: Pg::open(url, schema, settings, PG_MIGRATIONS).await?,
        })
    }

    pub fn pg(&self) -> &Pg {
        &self.pg
    }
}

fn to_notification(row: &PgRow) -> Result<Notification, sqlx::Error> {
    Ok(Notification {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        event_type: row.try_get(2)?,
        order_id: row.try_get(3)?,
        user_id: row.try_get(4)?,
        recipient: row.try_get(5)?,
        subject: row.try_get(6)?,
        body: row.try_get(7)?,
        // As in SQLite: amounts were valid Money when written.
        amount: Money::from_cents(row.try_get(8)?).unwrap_or(Money::ZERO),
        currency: row.try_get(9)?,
        created_at: DateTime::from_timestamp_millis(row.try_get(10)?).unwrap_or_default(),
    })
}

#[async_trait]
impl NotificationStore for PgNotificationStore {
    async fn insert_batch(&self, batch: &[Notification]) -> Result<Vec<bool>, StoreError> {
        kit::pg::traced("INSERT notifications", async {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // One transaction: one commit (one fsync) per batch, as in SQLite.
        let mut tx = self.pg.pool().begin().await?;
        let mut stored = Vec::with_capacity(batch.len());
        for n in batch {
            // One row per event id: a repeat (stored before or earlier in this batch)
            // changes nothing.
            let changed = sqlx::query(
                "INSERT INTO notifications (id, event_id, event_type, order_id, user_id, recipient, subject, body, amount_cents, currency, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(n.id)
            .bind(n.event_id)
            .bind(&n.event_type)
            .bind(n.order_id)
            .bind(n.user_id)
            .bind(&n.recipient)
            .bind(&n.subject)
            .bind(&n.body)
            .bind(n.amount.cents())
            .bind(&n.currency)
            .bind(n.created_at.timestamp_millis())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            stored.push(changed == 1);
        }
        tx.commit().await?;
        Ok(stored)
            })
        .await
    }

    async fn find(&self, filter: &Filter) -> Result<Page<Notification>, StoreError> {
        let ((after_at, after_id), skip) = filter.page.row_start()?;
        let rows = sqlx::query(
            "SELECT id, event_id, event_type, order_id, user_id, recipient, subject, body, amount_cents, currency, created_at
             FROM notifications
             WHERE ($1::UUID IS NULL OR user_id = $1) AND ($2::UUID IS NULL OR order_id = $2)
             AND (created_at, id) > ($3, $4)
             ORDER BY created_at, id LIMIT $5 OFFSET $6",
        )
        .bind(filter.user_id)
        .bind(filter.order_id)
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(filter.page.limit) + 1)
        .bind(i64::from(skip))
        .fetch_all(self.pg.pool())
        .await?;
        let rows = rows
            .iter()
            .map(to_notification)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(
            rows,
            filter.page.limit,
            notification_cursor,
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pg.pool()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pg.close().await;
    }
}
