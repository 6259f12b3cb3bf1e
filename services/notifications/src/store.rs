//! Where notification records live: a trait and its SQLite implementation (DynamoDB for the
//! Lambda is in `dynamo`, PostgreSQL in `pg` with feature `postgres`). Inserting is
//! idempotent per event id.

use async_trait::async_trait;
use chrono::DateTime;
use kit::Money;
use kit::db::{Db, DbError, Step, corrupt};
use kit::page::{BadCursor, Cursor, Page, PageRequest};

use rusqlite::{Row, params};
use uuid::Uuid;

use crate::content::Notification;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    BadCursor(#[from] BadCursor),
    /// A remote store (DynamoDB) failed or answered something unreadable.
    #[error("notification store failed: {0}")]
    Remote(String),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
}

impl StoreError {
    /// True when the database could not be reached in time (pool exhausted, connection lost):
    /// a 503 the client may retry, rather than a fault of ours.
    pub fn is_unavailable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            StoreError::Postgres(e) => kit::pg::is_out_of_reach(e),
            _ => false,
        }
    }
}

/// Which records, and which page of them.
#[derive(Debug, Clone)]
pub struct Filter {
    pub user_id: Option<Uuid>,
    pub order_id: Option<Uuid>,
    pub page: PageRequest,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            user_id: None,
            order_id: None,
            page: PageRequest::first(100),
        }
    }
}

/// Where the page after `n` starts, on the stores that sort by `(created_at, id)`.
pub fn notification_cursor(n: &Notification) -> Cursor {
    Cursor::after_row(n.created_at.timestamp_millis(), n.id)
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

    /// A page of the records matching `filter`, oldest first (by `created_at`, then id). With
    /// neither a user nor an order (an operator's view) DynamoDB answers in table order.
    async fn find(&self, filter: &Filter) -> Result<Page<Notification>, StoreError>;

    /// Readiness: the store answers. The default suits stores without a connection of their
    /// own to check (DynamoDB: every call is a fresh HTTPS request).
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Closes the store at shutdown, after the last batch; nothing to do by default.
    async fn close(&self) {}
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

const COLUMNS: &str = "id, event_id, event_type, order_id, user_id, recipient, subject, body, amount_cents, currency, created_at";

fn to_notification(row: &Row<'_>) -> rusqlite::Result<Notification> {
    let id = |i: usize| -> rusqlite::Result<Uuid> {
        row.get::<_, String>(i)?.parse().map_err(corrupt(i))
    };
    Ok(Notification {
        id: id(0)?,
        event_id: id(1)?,
        event_type: row.get(2)?,
        order_id: id(3)?,
        user_id: id(4)?,
        recipient: row.get(5)?,
        subject: row.get(6)?,
        body: row.get(7)?,
        amount: Money::from_cents(row.get(8)?).unwrap_or(Money::ZERO),
        currency: row.get(9)?,
        created_at: DateTime::from_timestamp_millis(row.get(10)?).unwrap_or_default(),
    })
}

#[async_trait]
impl NotificationStore for SqliteNotificationStore {
    async fn insert_batch(&self, batch: &[Notification]) -> Result<Vec<bool>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let batch = batch.to_vec();
        self.db
            .write(move |tx| {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO notifications (id, event_id, event_type, order_id, user_id, recipient, subject, body, amount_cents, currency, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (event_id) DO NOTHING",
                )?;
                // One row per event id: a repeat (stored before or earlier in this batch) changes nothing.
                let mut stored = Vec::with_capacity(batch.len());
                for n in &batch {
                    let changed = insert.execute(params![
                        n.id.to_string(),
                        n.event_id.to_string(),
                        n.event_type,
                        n.order_id.to_string(),
                        n.user_id.to_string(),
                        n.recipient,
                        n.subject,
                        n.body,
                        n.amount.cents(),
                        n.currency,
                        n.created_at.timestamp_millis()
                    ])?;
                    stored.push(changed == 1);
                }
                Ok(stored)
            })
            .await
    }

    async fn find(&self, filter: &Filter) -> Result<Page<Notification>, StoreError> {
        let ((after_at, after_id), skip) = filter.page.row_start()?;
        let limit = filter.page.limit;
        let filter = filter.clone();
        let rows = self
            .db
            .read(move |conn| {
                Ok::<_, StoreError>(
                    conn.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM notifications
                         WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR order_id = ?2)
                         AND (created_at, id) > (?3, ?4)
                         ORDER BY created_at, id LIMIT ?5 OFFSET ?6"
                    ))?
                    .query_map(
                        params![
                            filter.user_id.map(|u| u.to_string()),
                            filter.order_id.map(|u| u.to_string()),
                            after_at,
                            after_id.to_string(),
                            limit + 1,
                            skip
                        ],
                        to_notification,
                    )?
                    .collect::<Result<Vec<_>, _>>()?,
                )
            })
            .await?;
        Ok(Page::from_rows(rows, limit, notification_cursor))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    async fn close(&self) {
        self.db.close().await;
    }
}
