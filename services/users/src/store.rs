//! Where users live: the [`UserStore`] trait the API and start-up use, and its SQLite
//! implementation ([`crate::pg`] has the PostgreSQL one, feature `postgres`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kit::db::{Db, DbError, Step, corrupt, is_unique_violation, now_ms};
use kit::page::{BadCursor, Cursor, Page, PageRequest};
use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;
use uuid::Uuid;

use kit::auth::Role;

use crate::domain::{Email, Phone, UserName};

pub static MIGRATIONS: &[Step] = &[
    (
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
    ),
    (
        2,
        "credentials, roles and refresh tokens",
        "ALTER TABLE users ADD COLUMN password_hash TEXT;
        ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'customer';
        CREATE TABLE refresh_tokens (
            token_hash TEXT PRIMARY KEY,
            family TEXT NOT NULL,
            user_id TEXT NOT NULL,
            expires_at INTEGER NOT NULL,
            used_at INTEGER,
            revoked INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
        CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);",
    ),
];

/// A refresh token as stored: only its SHA-256, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    /// Every token rotated from one login shares the family of the first.
    pub family: Uuid,
    pub user_id: Uuid,
    pub expires_at_ms: i64,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq)]
pub enum RefreshUse {
    /// It was current: it is now used, and `replacement` (in its family) is current.
    Rotated(User),
    /// It had already been rotated: someone replayed it, so its whole family is revoked.
    Reused,
    /// Unknown, expired, revoked, or its user is gone.
    Invalid,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

/// Where the page after `user` starts.
pub(crate) fn user_cursor(user: &User) -> Cursor {
    Cursor::after_row(user.created_at.timestamp_millis(), user.id)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a user with this email already exists")]
    DuplicateEmail,
    #[error(transparent)]
    BadCursor(#[from] BadCursor),
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

/// Users, whatever the database. Emails are unique: a second user with one is
/// [`StoreError::DuplicateEmail`]. Listing is ordered by creation time, then id.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// A customer without a password (cannot sign in until given one).
    async fn create(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
    ) -> Result<User, StoreError> {
        self.register(name, email, phone, None, Role::Customer)
            .await
    }

    /// A new account; `password_hash` is a PHC string (argon2id), never a password.
    async fn register(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
        password_hash: Option<&str>,
        role: Role,
    ) -> Result<User, StoreError>;

    /// The account with this e-mail and its password hash, for signing in.
    async fn credentials(
        &self,
        email: &Email,
    ) -> Result<Option<(User, Option<String>)>, StoreError>;

    /// Sets an account's role and, when given, its password hash. False when no such user.
    async fn set_role(
        &self,
        id: Uuid,
        role: Role,
        password_hash: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// Stores a new refresh token (a sign-in starts a family).
    async fn issue_refresh(&self, token: &RefreshRecord) -> Result<(), StoreError>;

    /// Presents the token whose hash is `token_hash` at `now_ms`: if current, it is marked used
    /// and `replacement` joins its family, atomically. A used token presented again revokes the
    /// whole family (someone holds a stolen copy).
    async fn use_refresh(
        &self,
        token_hash: &str,
        replacement: &RefreshRecord,
        now_ms: i64,
    ) -> Result<RefreshUse, StoreError>;

    /// Revokes the family of the token whose hash is given (sign-out). False when unknown.
    async fn revoke_refresh(&self, token_hash: &str) -> Result<bool, StoreError>;

    /// Drops the refresh tokens of every family whose newest token expired before `now_ms`
    /// (nothing in such a family can be used or replayed any more); the number removed.
    async fn prune_refresh(&self, now_ms: i64) -> Result<usize, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<User>, StoreError>;

    /// A page of users, oldest first, ties by id.
    async fn list(&self, page: &PageRequest) -> Result<Page<User>, StoreError>;

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

const COLUMNS: &str = "id, name, email, phone, created_at, role";

fn to_user(row: &Row<'_>) -> rusqlite::Result<User> {
    let id: String = row.get(0)?;
    let role: String = row.get(5)?;
    Ok(User {
        id: id.parse().map_err(corrupt(0))?,
        name: row.get(1)?,
        email: row.get(2)?,
        phone: row.get(3)?,
        role: parse_role(&role).map_err(corrupt(5))?,
        created_at: DateTime::from_timestamp_millis(row.get(4)?).unwrap_or_default(),
    })
}

/// A stored role; anything else is a corrupt row.
pub(crate) fn parse_role(raw: &str) -> Result<Role, UnknownRole> {
    Role::parse(raw).ok_or_else(|| UnknownRole(raw.to_owned()))
}

#[derive(Debug, thiserror::Error)]
#[error("unknown role `{0}`")]
pub struct UnknownRole(String);

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
pub(crate) fn new_user(
    name: &UserName,
    email: &Email,
    phone: Option<&Phone>,
    role: Role,
) -> (User, i64) {
    let now = now_ms();
    let user = User {
        id: Uuid::now_v7(),
        name: name.as_str().to_owned(),
        email: email.as_str().to_owned(),
        phone: phone.map(|p| p.as_str().to_owned()),
        role,
        created_at: DateTime::from_timestamp_millis(now).unwrap_or_default(),
    };
    (user, now)
}

#[async_trait]
impl UserStore for SqliteUserStore {
    async fn register(
        &self,
        name: &UserName,
        email: &Email,
        phone: Option<&Phone>,
        password_hash: Option<&str>,
        role: Role,
    ) -> Result<User, StoreError> {
        let (user, now) = new_user(name, email, phone, role);
        let row = user.clone();
        let hash = password_hash.map(str::to_owned);
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO users (id, name, email, phone, created_at, password_hash, role)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        row.id.to_string(),
                        row.name,
                        row.email,
                        row.phone,
                        now,
                        hash,
                        row.role.as_str()
                    ],
                )
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::DuplicateEmail
                    } else {
                        StoreError::Sqlite(e)
                    }
                })
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

    async fn list(&self, page: &PageRequest) -> Result<Page<User>, StoreError> {
        let ((after_at, after_id), skip) = page.row_start()?;
        let limit = page.limit;
        let rows = self
            .db
            .read(move |conn| {
                let mut q = conn.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM users WHERE (created_at, id) > (?1, ?2)
                     ORDER BY created_at, id LIMIT ?3 OFFSET ?4"
                ))?;
                let users = q
                    .query_map(
                        params![after_at, after_id.to_string(), limit + 1, skip],
                        to_user,
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StoreError>(users)
            })
            .await?;
        Ok(Page::from_rows(rows, limit, user_cursor))
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM refresh_tokens WHERE user_id = ?1",
                    [id.to_string()],
                )?;
                Ok(tx.execute("DELETE FROM users WHERE id = ?1", [id.to_string()])? > 0)
            })
            .await
    }

    async fn credentials(
        &self,
        email: &Email,
    ) -> Result<Option<(User, Option<String>)>, StoreError> {
        let email = email.as_str().to_owned();
        self.db
            .read(move |conn| {
                let mut q = conn.prepare_cached(&format!(
                    "SELECT {COLUMNS}, password_hash FROM users WHERE email = ?1"
                ))?;
                Ok(q.query_row([email], |row| Ok((to_user(row)?, row.get(6)?)))
                    .optional()?)
            })
            .await
    }

    async fn set_role(
        &self,
        id: Uuid,
        role: Role,
        password_hash: Option<&str>,
    ) -> Result<bool, StoreError> {
        let hash = password_hash.map(str::to_owned);
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "UPDATE users SET role = ?2, password_hash = COALESCE(?3, password_hash)
                     WHERE id = ?1",
                    params![id.to_string(), role.as_str(), hash],
                )? > 0)
            })
            .await
    }

    async fn issue_refresh(&self, token: &RefreshRecord) -> Result<(), StoreError> {
        let t = token.clone();
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO refresh_tokens (token_hash, family, user_id, expires_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        t.token_hash,
                        t.family.to_string(),
                        t.user_id.to_string(),
                        t.expires_at_ms
                    ],
                )?;
                Ok(())
            })
            .await
    }

    async fn use_refresh(
        &self,
        token_hash: &str,
        replacement: &RefreshRecord,
        now_ms: i64,
    ) -> Result<RefreshUse, StoreError> {
        let (hash, next) = (token_hash.to_owned(), replacement.clone());
        self.db
            .write(move |tx| {
                let found = tx
                    .query_row(
                        "SELECT family, user_id, expires_at, used_at, revoked
                         FROM refresh_tokens WHERE token_hash = ?1",
                        [&hash],
                        |row| {
                            Ok((
                                row.get::<_, String>(0)?,
                                row.get::<_, String>(1)?,
                                row.get::<_, i64>(2)?,
                                row.get::<_, Option<i64>>(3)?,
                                row.get::<_, bool>(4)?,
                            ))
                        },
                    )
                    .optional()?;
                let Some((family, user_id, expires_at, used_at, revoked)) = found else {
                    return Ok(RefreshUse::Invalid);
                };
                if revoked {
                    return Ok(RefreshUse::Invalid);
                }
                if used_at.is_some() {
                    tx.execute(
                        "UPDATE refresh_tokens SET revoked = 1 WHERE family = ?1",
                        [&family],
                    )?;
                    return Ok(RefreshUse::Reused);
                }
                if expires_at <= now_ms {
                    return Ok(RefreshUse::Invalid);
                }
                let user = tx
                    .query_row(
                        &format!("SELECT {COLUMNS} FROM users WHERE id = ?1"),
                        [&user_id],
                        to_user,
                    )
                    .optional()?;
                let Some(user) = user else {
                    return Ok(RefreshUse::Invalid);
                };
                tx.execute(
                    "UPDATE refresh_tokens SET used_at = ?2 WHERE token_hash = ?1",
                    params![hash, now_ms],
                )?;
                tx.execute(
                    "INSERT INTO refresh_tokens (token_hash, family, user_id, expires_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![next.token_hash, family, user_id, next.expires_at_ms],
                )?;
                Ok(RefreshUse::Rotated(user))
            })
            .await
    }

    async fn revoke_refresh(&self, token_hash: &str) -> Result<bool, StoreError> {
        let hash = token_hash.to_owned();
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "UPDATE refresh_tokens SET revoked = 1 WHERE family =
                     (SELECT family FROM refresh_tokens WHERE token_hash = ?1)",
                    [hash],
                )? > 0)
            })
            .await
    }

    async fn prune_refresh(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "DELETE FROM refresh_tokens WHERE family IN (
                         SELECT family FROM refresh_tokens GROUP BY family
                         HAVING MAX(expires_at) < ?1)",
                    [now_ms],
                )?)
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
