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
use uuid::Uuid;

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
        // One statement for the whole batch: one round trip and one commit (one WAL flush).
        // One row per event id: a repeat (stored before, or earlier in this batch) changes
        // nothing; the batch's own repeats are left out before they reach the statement.
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        let firsts: Vec<&Notification> =
            batch.iter().filter(|n| seen.insert(n.event_id)).collect();
        let text = |f: fn(&Notification) -> &str| firsts.iter().map(|n| f(n)).collect::<Vec<&str>>();
        let inserted: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO notifications (id, event_id, event_type, order_id, user_id, recipient, subject, body, amount_cents, currency, created_at)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
                                  $7::text[], $8::text[], $9::bigint[], $10::text[], $11::bigint[])
             ON CONFLICT (event_id) DO NOTHING
             RETURNING event_id",
        )
        .bind(firsts.iter().map(|n| n.id).collect::<Vec<_>>())
        .bind(firsts.iter().map(|n| n.event_id).collect::<Vec<_>>())
        .bind(text(|n| n.event_type.as_str()))
        .bind(firsts.iter().map(|n| n.order_id).collect::<Vec<_>>())
        .bind(firsts.iter().map(|n| n.user_id).collect::<Vec<_>>())
        .bind(text(|n| n.recipient.as_str()))
        .bind(text(|n| n.subject.as_str()))
        .bind(text(|n| n.body.as_str()))
        .bind(firsts.iter().map(|n| n.amount.cents()).collect::<Vec<_>>())
        .bind(text(|n| n.currency.as_str()))
        .bind(firsts.iter().map(|n| n.created_at.timestamp_millis()).collect::<Vec<_>>())
        .fetch_all(self.pg.pool())
        .await?;
        let mut inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
        // Each new event id counts as stored once: for its first row in the batch.
        Ok(batch.iter().map(|n| inserted.remove(&n.event_id)).collect())
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
