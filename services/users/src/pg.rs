//! Users in PostgreSQL (feature `postgres`): the same contract as the SQLite store, in the
//! service's own schema (`users` in production, a throw-away one per test).
//!
//! Times are BIGINT milliseconds since the epoch, as in SQLite, so both backends order,
//! paginate and round-trip `created_at` identically.

use async_trait::async_trait;
use chrono::DateTime;
use kit::config::PostgresSettings;
use kit::pg::{Pg, PgError, PgStep, is_unique_violation};
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::domain::{Email, Phone, UserName};
use crate::store::{StoreError, User, UserStore, new_user};

pub static PG_MIGRATIONS: &[PgStep] = &[(
    1,
    "users",
    "CREATE TABLE users (
        id UUID PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT NOT NULL UNIQUE,
        phone TEXT,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX users_created ON users (created_at, id);",
)];

#[derive(Debug, Clone)]
pub struct PgUserStore {
    pg: Pg,
}

fn to_user(row: &PgRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        email: row.try_get(2)?,
        phone: row.try_get(3)?,
        created_at: DateTime::from_timestamp_millis(row.try_get(4)?).unwrap_or_default(),
    })
}

impl PgUserStore {
    /// Connects and migrates `schema` (the service name in production).
    pub async fn open(
        url: &str,
        schema: &str,
        settings: &PostgresSettings,
    ) -> Result<PgUserStore, PgError> {
        Ok(PgUserStore {
            pg: Pg::open(url, schema, settings, PG_MIGRATIONS).await?,
        })
    }

    pub fn pg(&self) -> &Pg {
        &self.pg
    }
}

#[async_trait]
impl UserStore for PgUserStore {
    async fn create(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
    ) -> Result<User, StoreError> {
        let (user, now) = new_user(name, email, phone);
        sqlx::query(
            "INSERT INTO users (id, name, email, phone, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(user.id)
        .bind(&user.name)
        .bind(&user.email)
        .bind(&user.phone)
        .bind(now)
        .execute(self.pg.pool())
        .await
        .map_err(|e| {
            // The only unique columns are the fresh v7 id and the email.
            if is_unique_violation(&e) {
                StoreError::DuplicateEmail
            } else {
                StoreError::Postgres(e)
            }
        })?;
        Ok(user)
    }

    async fn get(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT id, name, email, phone, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pg.pool())
            .await?;
        Ok(row.as_ref().map(to_user).transpose()?)
    }

    async fn list(&self, skip: u32, limit: u32) -> Result<Vec<User>, StoreError> {
        // UUID order is byte order, the same as SQLite's order of their lower-case text form.
        let rows = sqlx::query(
            "SELECT id, name, email, phone, created_at FROM users
             ORDER BY created_at, id LIMIT $1 OFFSET $2",
        )
        .bind(i64::from(limit))
        .bind(i64::from(skip))
        .fetch_all(self.pg.pool())
        .await?;
        Ok(rows.iter().map(to_user).collect::<Result<_, _>>()?)
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(self.pg.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pg.pool()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pg.close().await;
    }
}
