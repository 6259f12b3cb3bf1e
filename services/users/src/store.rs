//! Where users live: the [`UserStore`] trait the API and start-up use, and its SQLite
//! implementation ([`crate::pg`] has the PostgreSQL one, feature `postgres`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kit::db::{Db, DbError, Step, corrupt, is_unique_violation, now_ms};
use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{Email, Phone, UserName};

pub static MIGRATIONS: &[Step] = &[(
    1,
    "users",
    "CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT NOT NULL UNIQUE,
        phone TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX users_created ON users (created_at, id);",
)];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a user with this email already exists")]
    DuplicateEmail,
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
            StoreError::Postgres(e) => matches!(
                e,
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
            ),
            _ => false,
        }
    }
}

/// Users, whatever the database. Emails are unique: a second user with one is
/// [`StoreError::DuplicateEmail`]. Listing is ordered by creation time, then id.
#[async_trait]
pub trait UserStore: Send + Sync {
    async fn create(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
    ) -> Result<User, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<User>, StoreError>;

    async fn list(&self, skip: u32, limit: u32) -> Result<Vec<User>, StoreError>;

    /// True when a user was deleted.
    async fn delete(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Readiness: the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the database at shutdown, after the last request.
    async fn close(&self);
}

#[derive(Debug, Clone)]
pub struct SqliteUserStore {
    db: Db,
}

const COLUMNS: &str = "id, name, email, phone, created_at";

fn to_user(row: &Row<'_>) -> rusqlite::Result<User> {
    let id: String = row.get(0)?;
    Ok(User {
        id: id.parse().map_err(corrupt(0))?,
        name: row.get(1)?,
        email: row.get(2)?,
        phone: row.get(3)?,
        created_at: DateTime::from_timestamp_millis(row.get(4)?).unwrap_or_default(),
    })
}

impl SqliteUserStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<SqliteUserStore, DbError> {
        Ok(SqliteUserStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// A user for a new row: a time-ordered id and the creation instant in whole milliseconds,
/// the precision both backends store.
pub(crate) fn new_user(name: &UserName, email: &Email, phone: Option<&Phone>) -> (User, i64) {
    let now = now_ms();
    let user = User {
        id: Uuid::now_v7(),
        name: name.as_str().to_owned(),
        email: email.as_str().to_owned(),
        phone: phone.map(|p| p.as_str().to_owned()),
        created_at: DateTime::from_timestamp_millis(now).unwrap_or_default(),
    };
    (user, now)
}

#[async_trait]
impl UserStore for SqliteUserStore {
    async fn create(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
    ) -> Result<User, StoreError> {
        let (user, now) = new_user(name, email, phone);
        let row = user.clone();
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO users (id, name, email, phone, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![row.id.to_string(), row.name, row.email, row.phone, now],
                )
                .map_err(|e| if is_unique_violation(&e) { StoreError::DuplicateEmail } else { StoreError::Sqlite(e) })
            })
            .await?;
        Ok(user)
    }

    async fn get(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        self.db
            .read(move |conn| {
                let mut q =
                    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM users WHERE id = ?1"))?;
                Ok(q.query_row([id.to_string()], to_user).optional()?)
            })
            .await
    }

    async fn list(&self, skip: u32, limit: u32) -> Result<Vec<User>, StoreError> {
        self.db
            .read(move |conn| {
                let mut q = conn.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM users ORDER BY created_at, id LIMIT ?1 OFFSET ?2"
                ))?;
                let users = q
                    .query_map([limit, skip], to_user)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(users)
            })
            .await
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        self.db
            .write(move |tx| {
                Ok(tx.execute("DELETE FROM users WHERE id = ?1", [id.to_string()])? > 0)
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    async fn close(&self) {
        self.db.close().await;
    }
}
