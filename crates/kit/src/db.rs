//! SQLite the way every embedded store uses it: WAL, one writer, a few readers, migrations at start.
//!
//! All writes go through a single-connection pool and start with `BEGIN IMMEDIATE`, so writers
//! queue fairly inside the process instead of spinning in SQLite's busy handler, and a
//! transaction can never fail half-way with SQLITE_BUSY when it upgrades from read to write.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::config::SqliteSettings;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database url `{0}`: expected sqlite://path")]
    UnsupportedUrl(String),
    #[error("cannot create the data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// One schema step: version, description, SQL. Versions only ever grow.
pub type Step = (i64, &'static str, &'static str);

#[derive(Debug, Clone)]
struct Steps(&'static [Step]);

impl MigrationSource<'static> for Steps {
    fn resolve(
        self,
    ) -> futures_core_compat::BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>>
    {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

mod futures_core_compat {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

/// A SQLite database: `read` for queries, `write` (one connection) for transactions.
#[derive(Debug, Clone)]
pub struct Db {
    pub read: SqlitePool,
    write: SqlitePool,
}

impl Db {
    /// Opens (creating if needed) the database at `url` and applies `steps`.
    pub async fn open(
        url: &str,
        settings: &SqliteSettings,
        steps: &'static [Step],
    ) -> Result<Db, DbError> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| DbError::UnsupportedUrl(url.to_owned()))?;
        if let Some(parent) = std::path::Path::new(path).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
        let synchronous = match settings.synchronous.to_ascii_lowercase().as_str() {
            "full" => SqliteSynchronous::Full,
            "extra" => SqliteSynchronous::Extra,
            "off" => SqliteSynchronous::Off,
            _ => SqliteSynchronous::Normal,
        };
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_millis(settings.busy_timeout_ms))
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-16000");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        Migrator::new(Steps(steps)).await?.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(settings.read_connections.max(1))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Ok(Db { read, write })
    }

    /// Starts a write transaction; callers queue here, one at a time.
    pub async fn begin(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.write.begin_with("BEGIN IMMEDIATE").await
    }

    /// The single write connection's pool, for one-statement writes outside a transaction.
    pub fn writer(&self) -> &SqlitePool {
        &self.write
    }

    /// Readiness: the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map(|_| ())
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

/// True when `e` is a UNIQUE or PRIMARY KEY violation (a duplicate the caller should report as 409).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Milliseconds since the Unix epoch, the timestamp unit of every embedded table.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrates_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/nested/t.db", dir.path().display());
        static STEPS: &[Step] = &[(1, "t", "CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")];
        let db = Db::open(&url, &SqliteSettings::default(), STEPS)
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let err = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(db.writer())
            .await
            .unwrap_err();
        assert!(is_unique_violation(&err));
        db.close().await;
        // Re-opening re-applies nothing and keeps the data.
        let db = Db::open(&url, &SqliteSettings::default(), STEPS)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&db.read)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}
