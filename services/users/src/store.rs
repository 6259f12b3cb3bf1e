//! Users in SQLite.

use chrono::{DateTime, Utc};
use kit::db::{Db, DbError, Step, is_unique_violation, now_ms};
use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
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
    Db(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
pub struct UserStore {
    db: Db,
}

fn to_user(row: &SqliteRow) -> Result<User, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(User {
        id: id.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        name: row.try_get("name")?,
        email: row.try_get("email")?,
        phone: row.try_get("phone")?,
        created_at: DateTime::from_timestamp_millis(row.try_get("created_at")?).unwrap_or_default(),
    })
}

impl UserStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<UserStore, DbError> {
        Ok(UserStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub async fn create(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
    ) -> Result<User, StoreError> {
        let now = now_ms();
        let user = User {
            id: Uuid::now_v7(),
            name: name.as_str().to_owned(),
            email: email.as_str().to_owned(),
            phone: phone.map(|p| p.as_str().to_owned()),
            created_at: DateTime::from_timestamp_millis(now).unwrap_or_default(),
        };
        sqlx::query(
            "INSERT INTO users (id, name, email, phone, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(user.id.to_string())
        .bind(&user.name)
        .bind(&user.email)
        .bind(&user.phone)
        .bind(now)
        .execute(self.db.writer())
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::DuplicateEmail
            } else {
                StoreError::Db(e)
            }
        })?;
        Ok(user)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<User>, sqlx::Error> {
        sqlx::query("SELECT * FROM users WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.db.read)
            .await?
            .as_ref()
            .map(to_user)
            .transpose()
    }

    pub async fn list(&self, skip: u32, limit: u32) -> Result<Vec<User>, sqlx::Error> {
        sqlx::query("SELECT * FROM users ORDER BY created_at, id LIMIT ? OFFSET ?")
            .bind(limit)
            .bind(skip)
            .fetch_all(&self.db.read)
            .await?
            .iter()
            .map(to_user)
            .collect()
    }

    /// True when a user was deleted.
    pub async fn delete(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM users WHERE id = ?")
            .bind(id.to_string())
            .execute(self.db.writer())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
