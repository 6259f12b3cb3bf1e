//! Where notification records live: a trait (the Lambda will also get a DynamoDB one) and
//! its SQLite implementation. Inserting is idempotent per event id.

use async_trait::async_trait;
use chrono::DateTime;
use kit::Money;
use kit::db::{Db, DbError, Step};
use std::collections::HashSet;

use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use crate::content::Notification;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("stored value is corrupt")]
    Corrupt,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub user_id: Option<Uuid>,
    pub order_id: Option<Uuid>,
    pub limit: u32,
}

#[async_trait]
pub trait NotificationStore: Send + Sync {
    /// Stores each notification unless a record for its event id exists (in the store or
    /// earlier in `batch`). Returns, per input, whether it was stored now.
    async fn insert_batch(&self, batch: &[Notification]) -> Result<Vec<bool>, StoreError>;

    async fn insert_once(&self, n: &Notification) -> Result<bool, StoreError> {
        Ok(self
            .insert_batch(std::slice::from_ref(n))
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    async fn find(&self, filter: &Filter) -> Result<Vec<Notification>, StoreError>;
}

pub static MIGRATIONS: &[Step] = &[(
    1,
    "notifications",
    "CREATE TABLE notifications (
        id TEXT PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        order_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        subject TEXT NOT NULL,
        body TEXT NOT NULL,
        amount_cents INTEGER NOT NULL,
        currency TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX notifications_user ON notifications (user_id, created_at);
    CREATE INDEX notifications_order ON notifications (order_id, created_at);",
)];

#[derive(Debug, Clone)]
pub struct SqliteNotificationStore {
    db: Db,
}

impl SqliteNotificationStore {
    pub async fn open(url: &str, sqlite: &kit::config::SqliteSettings) -> Result<Self, DbError> {
        Ok(SqliteNotificationStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

fn to_notification(row: &SqliteRow) -> Result<Notification, StoreError> {
    let id = |c: &str| -> Result<Uuid, StoreError> {
        let s: String = row.try_get(c)?;
        s.parse().map_err(|_| StoreError::Corrupt)
    };
    Ok(Notification {
        id: id("id")?,
        event_id: id("event_id")?,
        event_type: row.try_get("event_type")?,
        order_id: id("order_id")?,
        user_id: id("user_id")?,
        recipient: row.try_get("recipient")?,
        subject: row.try_get("subject")?,
        body: row.try_get("body")?,
        amount: Money::from_cents(row.try_get("amount_cents")?).map_err(|_| StoreError::Corrupt)?,
        currency: row.try_get("currency")?,
        created_at: DateTime::from_timestamp_millis(row.try_get("created_at")?)
            .ok_or(StoreError::Corrupt)?,
    })
}

#[async_trait]
impl NotificationStore for SqliteNotificationStore {
    async fn insert_batch(&self, batch: &[Notification]) -> Result<Vec<bool>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO notifications (id, event_id, event_type, order_id, user_id, recipient, subject, body, amount_cents, currency, created_at) ",
        );
        insert.push_values(batch, |mut row, n| {
            row.push_bind(n.id.to_string())
                .push_bind(n.event_id.to_string())
                .push_bind(&n.event_type)
                .push_bind(n.order_id.to_string())
                .push_bind(n.user_id.to_string())
                .push_bind(&n.recipient)
                .push_bind(&n.subject)
                .push_bind(&n.body)
                .push_bind(n.amount.cents())
                .push_bind(&n.currency)
                .push_bind(n.created_at.timestamp_millis());
        });
        insert.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
        let mut stored: HashSet<String> = insert
            .build_query_scalar::<String>()
            .fetch_all(self.db.writer())
            .await?
            .into_iter()
            .collect();
        // The first record of an event id is the one stored; repeats are duplicates.
        Ok(batch
            .iter()
            .map(|n| stored.remove(&n.event_id.to_string()))
            .collect())
    }

    async fn find(&self, filter: &Filter) -> Result<Vec<Notification>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM notifications
             WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR order_id = ?2)
             ORDER BY created_at, id LIMIT ?3",
        )
        .bind(filter.user_id.map(|u| u.to_string()))
        .bind(filter.order_id.map(|u| u.to_string()))
        .bind(filter.limit)
        .fetch_all(&self.db.read)
        .await?;
        rows.iter().map(to_notification).collect()
    }
}
