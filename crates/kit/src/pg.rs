//! PostgreSQL the way every production store uses it (feature `postgres`): one pool per
//! service, each service in a schema of its own, migrations at start-up.
//!
//! A schema per service lets the five stores share one database (the seed's single
//! `DATABASE_URL`) without their `outbox`, `processed_events` or `idempotency_keys` tables
//! colliding, and keeps them as separable as five databases would be: a service only ever
//! sees its own schema through `search_path`. Migrations run under a transaction-level
//! advisory lock, so replicas starting together apply each step exactly once.

pub mod batch;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, Executor as _};

use crate::config::PostgresSettings;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("unsupported database url: expected postgres://user@host/database")]
    UnsupportedUrl,
    #[error("`{0}` is not a usable schema name (lower-case letters, digits and _, at most 63)")]
    BadSchema(String),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error("migration {version} ({description}) failed: {source}")]
    Migration {
        version: i64,
        description: &'static str,
        source: sqlx::Error,
    },
}

/// One schema step: version, description, SQL (several statements allowed). Versions only
/// ever grow.
pub type PgStep = (i64, &'static str, &'static str);

/// A service's PostgreSQL pool, bound to its schema.
#[derive(Debug, Clone)]
pub struct Pg {
    pool: PgPool,
    schema: String,
}

/// True for URLs this module opens.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn check_schema(schema: &str) -> Result<(), PgError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(PgError::BadSchema(schema.to_owned()))
    }
}

impl Pg {
    /// Connects to `url`, creates `schema` if needed and applies `steps` inside it.
    pub async fn open(
        url: &str,
        schema: &str,
        settings: &PostgresSettings,
        steps: &'static [PgStep],
    ) -> Result<Pg, PgError> {
        if !is_postgres_url(url) {
            return Err(PgError::UnsupportedUrl);
        }
        check_schema(schema)?;
        let options = PgConnectOptions::from_str(url)?
            .options([("search_path", schema)])
            .application_name("mercato");
        migrate(options.clone(), schema, steps).await?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            .connect_with(options)
            .await?;
        Ok(Pg {
            pool,
            schema: schema.to_owned(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Readiness: the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), PgError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Waits for the pool's connections to close.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Drops the whole schema: for tests, which each work in a schema of their own.
    pub async fn drop_schema(self) -> Result<(), PgError> {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        self.pool.execute(AssertSqlSafe(sql)).await?;
        self.pool.close().await;
        Ok(())
    }
}

async fn migrate(
    options: PgConnectOptions,
    schema: &str,
    steps: &'static [PgStep],
) -> Result<(), PgError> {
    let mut conn = sqlx::postgres::PgConnection::connect_with(&options).await?;
    let mut tx = conn.begin().await?;
    // Serialises concurrent starts of one service; released at commit.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("mercato-migrations:{schema}"))
        .execute(&mut *tx)
        .await?;
    // "already exists, skipping" notices on every start are noise, not news.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    // The name was checked by `check_schema`, so quoting it is enough.
    let create = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS \"{schema}\".schema_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );"
    );
    sqlx::raw_sql(AssertSqlSafe(create))
        .execute(&mut *tx)
        .await?;
    let applied: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await?;
    for (version, description, sql) in steps.iter().filter(|(v, _, _)| *v > applied) {
        let fail = |source| PgError::Migration {
            version: *version,
            description,
            source,
        };
        sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(fail)?;
        sqlx::query("INSERT INTO schema_migrations (version, description) VALUES ($1, $2)")
            .bind(version)
            .bind(description)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
    }
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}

/// Runs one transaction's work, `begin` to `commit`, inside a `transaction` span as the SQLite
/// writer does ([`crate::telemetry::in_exported_trace`]); `summary` says which statements
/// (`db.query.summary`: tables and kinds), never their values.
pub async fn traced<T>(summary: &'static str, work: impl std::future::Future<Output = T>) -> T {
    if !crate::telemetry::in_exported_trace() {
        return work.await;
    }
    let span = tracing::info_span!(
        "postgresql",
        otel.name = "transaction",
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = "transaction",
        db.query.summary = summary,
    );
    tracing::Instrument::instrument(work, span).await
}

/// True when `e` is a unique or primary-key violation (a duplicate the caller reports as 409).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// True when the database could not be reached in time (pool exhausted or closed, connection
/// lost): a 503 the client may retry, rather than a fault of ours.
pub fn is_out_of_reach(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}

/// For tests: the database named by `TEST_DATABASE_URL`, else the local server every
/// development machine here runs (`postgres://postgres@127.0.0.1:5432/test`).
pub fn test_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// For tests: a schema name nobody else uses, so suites can run in parallel on one database.
pub fn unique_schema(prefix: &str) -> String {
    format!(
        "{prefix}_t{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..12)
            .unwrap_or("0")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    static STEPS: &[PgStep] = &[
        (1, "t", "CREATE TABLE t (v BIGINT NOT NULL UNIQUE)"),
        (
            2,
            "t2",
            "ALTER TABLE t ADD COLUMN w TEXT; CREATE INDEX t_w ON t (w)",
        ),
    ];

    #[test]
    fn schema_names_are_checked() {
        assert!(check_schema("orders").is_ok());
        assert!(check_schema("orders_t1").is_ok());
        for bad in ["", "Orders", "1x", "a-b", "a\"; DROP", &"x".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn migrates_once_even_when_started_together_and_isolates_schemas() {
        let url = test_database_url();
        let schema = unique_schema("kit");
        let settings = PostgresSettings::default();
        // Two replicas starting at once: the advisory lock lets each step apply once.
        let (a, b) = tokio::join!(
            Pg::open(&url, &schema, &settings, STEPS),
            Pg::open(&url, &schema, &settings, STEPS)
        );
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e} (see scripts/test)")),
            b.unwrap(),
        );
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(a.pool())
                .await
                .unwrap();
        assert_eq!(versions, vec![1, 2]);
        sqlx::query("INSERT INTO t (v, w) VALUES (1, 'x')")
            .execute(a.pool())
            .await
            .unwrap();
        let dup = sqlx::query("INSERT INTO t (v) VALUES (1)")
            .execute(b.pool())
            .await
            .unwrap_err();
        assert!(is_unique_violation(&dup));
        // Another schema on the same database sees none of it.
        let other = Pg::open(&url, &unique_schema("kit"), &settings, STEPS)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(other.pool())
            .await
            .unwrap();
        assert_eq!(n, 0);
        other.ping().await.unwrap();
        other.drop_schema().await.unwrap();
        b.close().await;
        a.drop_schema().await.unwrap();
    }
}
