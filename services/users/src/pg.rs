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
use kit::auth::Role;

use crate::store::{
    RefreshRecord, RefreshUse, StoreError, User, UserStore, new_user, parse_role, user_cursor,
};
use kit::page::{Page, PageRequest};

pub static PG_MIGRATIONS: &[PgStep] = &[
    (
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
    ),
    (
        2,
        "credentials, roles and refresh tokens",
        "ALTER TABLE users ADD COLUMN password_hash TEXT;
        ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'customer';
        CREATE TABLE refresh_tokens (
            token_hash TEXT PRIMARY KEY,
            family UUID NOT NULL,
            user_id UUID NOT NULL,
            expires_at BIGINT NOT NULL,
            used_at BIGINT,
            revoked BOOLEAN NOT NULL DEFAULT FALSE
        );
        CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
        CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);",
    ),
];

/// The user columns in `to_user`'s order (a macro so queries stay literal for sqlx).
macro_rules! columns {
    () => {
        "id, name, email, phone, created_at, role"
    };
}

#[derive(Debug, Clone)]
pub struct PgUserStore {
    pg: Pg,
}

fn to_user(row: &PgRow) -> Result<User, sqlx::Error> {
    let role: String = row.try_get(5)?;
    Ok(User {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        email: row.try_get(2)?,
        phone: row.try_get(3)?,
        role: parse_role(&role).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
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
    async fn register(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
        password_hash: Option<&str>,
        role: Role,
    ) -> Result<User, StoreError> {
        let (user, now) = new_user(name, email, phone, role);
        sqlx::query(
            "INSERT INTO users (id, name, email, phone, created_at, password_hash, role)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(user.id)
        .bind(&user.name)
        .bind(&user.email)
        .bind(&user.phone)
        .bind(now)
        .bind(password_hash)
        .bind(role.as_str())
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
        let row = sqlx::query(concat!("SELECT ", columns!(), " FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pg.pool())
            .await?;
        Ok(row.as_ref().map(to_user).transpose()?)
    }

    async fn list(&self, page: &PageRequest) -> Result<Page<User>, StoreError> {
        let ((after_at, after_id), skip) = page.row_start()?;
        // UUID order is byte order, the same as SQLite's order of their lower-case text form.
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM users WHERE (created_at, id) > ($1, $2) ORDER BY created_at, id LIMIT $3 OFFSET $4"
        ))
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(page.limit) + 1)
        .bind(i64::from(skip))
        .fetch_all(self.pg.pool())
        .await?;
        let rows = rows.iter().map(to_user).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(rows, page.limit, user_cursor))
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        kit::pg::traced("DELETE refresh_tokens users", async {
            let mut tx = self.pg.pool().begin().await?;
            sqlx::query("DELETE FROM refresh_tokens WHERE user_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let done = sqlx::query("DELETE FROM users WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(done.rows_affected() > 0)
        })
        .await
    }

    async fn credentials(
        &self,
        email: &Email,
    ) -> Result<Option<(User, Option<String>)>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            ", password_hash FROM users WHERE email = $1"
        ))
        .bind(email.as_str())
        .fetch_optional(self.pg.pool())
        .await?;
        Ok(row
            .map(|row| Ok::<_, sqlx::Error>((to_user(&row)?, row.try_get(6)?)))
            .transpose()?)
    }

    async fn set_role(
        &self,
        id: Uuid,
        role: Role,
        password_hash: Option<&str>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE users SET role = $2, password_hash = COALESCE($3, password_hash) WHERE id = $1",
        )
        .bind(id)
        .bind(role.as_str())
        .bind(password_hash)
        .execute(self.pg.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn issue_refresh(&self, token: &RefreshRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family, user_id, expires_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&token.token_hash)
        .bind(token.family)
        .bind(token.user_id)
        .bind(token.expires_at_ms)
        .execute(self.pg.pool())
        .await?;
        Ok(())
    }

    async fn use_refresh(
        &self,
        token_hash: &str,
        replacement: &RefreshRecord,
        now_ms: i64,
    ) -> Result<RefreshUse, StoreError> {
        kit::pg::traced("UPDATE refresh_tokens; INSERT refresh_tokens", async {
            let mut tx = self.pg.pool().begin().await?;
            // Locks the row: of two concurrent uses of one token, the second sees it used.
            let found = sqlx::query(
                "SELECT family, user_id, expires_at, used_at, revoked
             FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
            )
            .bind(token_hash)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(found) = found else {
                return Ok(RefreshUse::Invalid);
            };
            let family: Uuid = found.try_get(0)?;
            let user_id: Uuid = found.try_get(1)?;
            let expires_at: i64 = found.try_get(2)?;
            let used_at: Option<i64> = found.try_get(3)?;
            let revoked: bool = found.try_get(4)?;
            if revoked {
                return Ok(RefreshUse::Invalid);
            }
            if used_at.is_some() {
                sqlx::query("UPDATE refresh_tokens SET revoked = TRUE WHERE family = $1")
                    .bind(family)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(RefreshUse::Reused);
            }
            if expires_at <= now_ms {
                return Ok(RefreshUse::Invalid);
            }
            let user = sqlx::query(concat!("SELECT ", columns!(), " FROM users WHERE id = $1"))
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(user) = user.as_ref().map(to_user).transpose()? else {
                return Ok(RefreshUse::Invalid);
            };
            sqlx::query("UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1")
                .bind(token_hash)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, family, user_id, expires_at)
             VALUES ($1, $2, $3, $4)",
            )
            .bind(&replacement.token_hash)
            .bind(family)
            .bind(user_id)
            .bind(replacement.expires_at_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(RefreshUse::Rotated(user))
        })
        .await
    }

    async fn prune_refresh(&self, now_ms: i64) -> Result<usize, StoreError> {
        let done = sqlx::query(
            "DELETE FROM refresh_tokens WHERE family IN (
                 SELECT family FROM refresh_tokens GROUP BY family HAVING MAX(expires_at) < $1)",
        )
        .bind(now_ms)
        .execute(self.pg.pool())
        .await?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }

    async fn revoke_refresh(&self, token_hash: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE refresh_tokens SET revoked = TRUE WHERE family =
             (SELECT family FROM refresh_tokens WHERE token_hash = $1)",
        )
        .bind(token_hash)
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
