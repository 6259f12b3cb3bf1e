//! SQLite the way every embedded store uses it: WAL, one writer thread, a few reader threads,
//! migrations at start-up.
//!
//! A whole transaction runs as one closure on the connection's own thread, so it costs one
//! hand-off between the async runtime and SQLite, however many statements it has. (A driver
//! that sends every statement to a worker thread, as sqlx's SQLite driver does, pays two
//! context switches per statement: it capped reservations at about 3,000 per second here.)
//! Own code rather than tokio-rusqlite: we need a reader pool and our own error types.
//! Writers queue on the single writer thread in arrival order and start with
//! `BEGIN IMMEDIATE`, so a transaction never fails half-way with SQLITE_BUSY.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::config::SqliteSettings;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database url `{0}`: expected sqlite://path")]
    UnsupportedUrl(String),
    #[error("cannot create the data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database is closed")]
    Closed,
    #[error("migration {version} ({description}) failed: {source}")]
    Migration {
        version: i64,
        description: &'static str,
        source: rusqlite::Error,
    },
}

/// One schema step: version, description, SQL. Versions only ever grow.
pub type Step = (i64, &'static str, &'static str);

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A thread that owns one connection and runs jobs on it in order.
#[derive(Debug)]
struct Worker {
    jobs: mpsc::Sender<Job>,
    /// What its jobs are, for their spans: `transaction` (the writer) or `query`.
    operation: &'static str,
}

impl Worker {
    fn spawn(
        name: String,
        operation: &'static str,
        mut conn: Connection,
    ) -> Result<Worker, DbError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(job) = queue.recv() {
                // A panicking job must not take the connection down with it; its caller sees
                // the dropped reply as `Closed`.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
            }
        })?;
        Ok(Worker { jobs, operation })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnOnce(&mut Connection) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let span = self.span();
        self.jobs
            .send(Box::new(move |conn| {
                // The caller's trace continues on this thread: what the job writes (an
                // outbox row's trace context) names this span.
                let _inside = span.as_ref().map(tracing::Span::enter);
                let _ = reply.send(f(conn));
            }))
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)
    }

    /// Queues `f` and returns at once; a closed worker drops it.
    fn detach(&self, f: impl FnOnce(&mut Connection) + Send + 'static) {
        let _ = self.jobs.send(Box::new(f));
    }

    /// The span of one write transaction inside an exported trace
    /// ([`crate::telemetry::in_exported_trace`]): the kind of work, never the statement's
    /// values. Reads (point lookups, most of them) get none: they would double the spans of a
    /// request for little to see.
    fn span(&self) -> Option<tracing::Span> {
        (self.operation == "transaction" && crate::telemetry::in_exported_trace()).then(|| {
            tracing::info_span!(
                "sqlite",
                otel.name = self.operation,
                otel.kind = "client",
                db.system.name = "sqlite",
                db.operation.name = self.operation,
            )
        })
    }
}

#[derive(Debug)]
struct Inner {
    writer: Worker,
    readers: Vec<Worker>,
    next_reader: AtomicUsize,
    /// Connections a caller may use on its own thread for a short read ([`Db::read_now`]);
    /// `busy_timeout` 0, so one never waits on a lock there.
    inline: Vec<std::sync::Mutex<Connection>>,
}

/// A SQLite database: transactions on the writer thread, queries on reader threads.
#[derive(Debug, Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

fn path_of(url: &str) -> Result<PathBuf, DbError> {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| DbError::UnsupportedUrl(url.to_owned()))
}

fn connect(
    path: &Path,
    settings: &SqliteSettings,
    writer: bool,
) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_millis(settings.busy_timeout_ms))?;
    if writer {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    let synchronous = match settings.synchronous.to_ascii_lowercase().as_str() {
        "full" => "FULL",
        "extra" => "EXTRA",
        "off" => "OFF",
        _ => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -16_000)?;
    if !writer {
        conn.pragma_update(None, "query_only", "ON")?;
    }
    // A cached statement keeps its plan whatever values are bound to it. Without the query
    // planner stability guarantee this SQLite re-prepares a statement (schema parse included)
    // whenever a bound `LIMIT ?` changes: the stream's poll did, nearly ten times an order,
    // a quarter of an order's instructions (docs/benchmarks.md).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// The writer's connection, migrated. Processes that create one new file together (replicas
/// starting at once on a fresh data directory) can find it locked while another switches it
/// to WAL: SQLite answers busy at once there instead of waiting, so that is tried again, for
/// at most the busy timeout (a second at least).
fn open_writer(
    path: &Path,
    settings: &SqliteSettings,
    steps: &[Step],
) -> Result<Connection, DbError> {
    let deadline =
        std::time::Instant::now() + Duration::from_millis(settings.busy_timeout_ms.max(1_000));
    loop {
        let opened = connect(path, settings, true)
            .map_err(DbError::from)
            .and_then(|mut conn| migrate(&mut conn, steps).map(|()| conn));
        match opened {
            Err(DbError::Sqlite(e) | DbError::Migration { source: e, .. })
                if is_busy(&e) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            done => return done,
        }
    }
}

/// The database is locked by another connection (a checkpoint, a write, a switch to WAL).
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// `f` in a write transaction (`BEGIN IMMEDIATE`): committed if it returns `Ok`, rolled back
/// (dropped) if it returns `Err`.
fn in_write_transaction<T, E, F>(conn: &mut Connection, f: F) -> Result<T, E>
where
    F: FnOnce(&Transaction<'_>) -> Result<T, E>,
    E: From<rusqlite::Error>,
{
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}

/// Connections for reads on the caller's thread: one per async worker of a 2-core machine.
const INLINE_CONNECTIONS: usize = 2;

fn migrate(conn: &mut Connection, steps: &[Step]) -> Result<(), DbError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at INTEGER NOT NULL
        )",
    )?;
    let applied: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for (version, description, sql) in steps.iter().filter(|(v, _, _)| *v > applied) {
        let fail = |source| DbError::Migration {
            version: *version,
            description,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        // Processes sharing the file (`mercato serve` replicas starting together) race here:
        // the step is applied by whichever takes the write lock first, and skipped by the
        // others once they hold it.
        let done: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [version],
                |r| r.get(0),
            )
            .map_err(fail)?;
        if done {
            continue;
        }
        tx.execute_batch(sql).map_err(fail)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![version, description, now_ms()],
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)?;
    }
    Ok(())
}

impl Db {
    /// Opens (creating if needed) the database at `url` (`sqlite://path`) and applies `steps`.
    pub async fn open(
        url: &str,
        settings: &SqliteSettings,
        steps: &'static [Step],
    ) -> Result<Db, DbError> {
        let path = path_of(url)?;
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("db")
            .to_owned();
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || {
            let conn = open_writer(&path, &settings, steps)?;
            let writer = Worker::spawn(format!("sqlite-w-{name}"), "transaction", conn)?;
            let readers = (0..settings.read_connections.max(1))
                .map(|i| {
                    Worker::spawn(
                        format!("sqlite-r{i}-{name}"),
                        "query",
                        connect(&path, &settings, false)?,
                    )
                })
                .collect::<Result<Vec<_>, DbError>>()?;
            let inline = (0..INLINE_CONNECTIONS)
                .map(|_| {
                    let conn = connect(&path, &settings, false)?;
                    conn.busy_timeout(Duration::ZERO)?;
                    Ok(std::sync::Mutex::new(conn))
                })
                .collect::<Result<Vec<_>, DbError>>()?;
            Ok(Db {
                inner: Arc::new(Inner {
                    writer,
                    readers,
                    next_reader: AtomicUsize::new(0),
                    inline,
                }),
            })
        })
        .await
        .map_err(|_| DbError::Closed)?
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`): committed if it returns `Ok`,
    /// rolled back if it returns `Err`.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<rusqlite::Error> + From<DbError> + Send + 'static,
    {
        self.inner
            .writer
            .run(move |conn| in_write_transaction(conn, f))
            .await
            .map_err(E::from)?
    }

    /// Queues `f` as a write transaction without waiting for it: for clean-up from `Drop`,
    /// where nothing can be awaited. Writes run one at a time in the order they were queued,
    /// so a later [`Db::write`] on this handle sees its effect. Its outcome is not reported.
    pub fn write_detached<F>(&self, f: F)
    where
        F: FnOnce(&Transaction<'_>) -> Result<(), rusqlite::Error> + Send + 'static,
    {
        self.inner.writer.detach(move |conn| {
            let _ = in_write_transaction(conn, f);
        });
    }

    /// Runs `f` on a reader connection (round-robin); it sees the last committed state.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let i = self.inner.next_reader.fetch_add(1, Ordering::Relaxed) % self.inner.readers.len();
        self.inner.readers[i]
            .run(move |conn| f(conn))
            .await
            .map_err(E::from)?
    }

    /// Runs a short read (a few rows by key) on the calling thread when an inline connection
    /// is free, sparing the two thread hand-offs of [`Db::read`] (the largest cost of a point
    /// read: `perf` showed the futex wake-ups above SQLite itself). When none is free, or the
    /// database is busy (a checkpoint), it goes to a reader thread, which may wait. Only for
    /// reads bounded by a key: a scan would hold the async worker.
    pub async fn read_now<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: Fn(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
        T: Send + 'static,
        E: From<rusqlite::Error> + From<DbError> + Send + 'static,
    {
        for slot in &self.inner.inline {
            let Ok(conn) = slot.try_lock() else {
                continue;
            };
            match f(&conn) {
                Err(e) if is_busy(&e) => break,
                done => return done.map_err(E::from),
            }
        }
        self.read(move |conn| f(conn).map_err(E::from)).await
    }

    /// Readiness: the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.read(|conn| {
            Ok::<_, DbError>(
                conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                    .map(|_| ())?,
            )
        })
        .await
    }

    /// Checkpoints the WAL so the main file holds everything; the threads end when the last
    /// handle is dropped.
    pub async fn close(&self) {
        let _ = self
            .inner
            .writer
            .run(|conn| conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
            .await;
    }
}

/// True when `e` is a UNIQUE or PRIMARY KEY violation (a duplicate the caller reports as 409).
pub fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// Maps a value that parsed badly (a stored id that is not a UUID, say) to rusqlite's
/// conversion error for that column, for use inside row mappers.
pub fn corrupt<E: std::error::Error + Send + Sync + 'static>(
    column: usize,
) -> impl FnOnce(E) -> rusqlite::Error {
    move |e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    }
}

/// Milliseconds since the Unix epoch, the timestamp unit of every embedded table.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error(transparent)]
        Db(#[from] DbError),
        #[error(transparent)]
        Sqlite(#[from] rusqlite::Error),
        #[error("rolled back on purpose")]
        Abort,
    }

    /// A cached statement whose `LIMIT ?` changes from call to call keeps its plan: no
    /// re-preparation (without the planner stability guarantee, one per new limit).
    #[test]
    fn a_bound_limit_does_not_re_prepare_a_cached_statement() {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join("t.db"), &SqliteSettings::default(), true).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (v INTEGER PRIMARY KEY); INSERT INTO t VALUES (1), (2), (3);",
        )
        .unwrap();
        let sql = "SELECT v FROM t WHERE v >= ?1 ORDER BY v LIMIT ?2";
        for limit in 1..=3_i64 {
            let rows: Vec<i64> = conn
                .prepare_cached(sql)
                .unwrap()
                .query_map([1, limit], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(rows.len(), usize::try_from(limit).unwrap());
        }
        let statement = conn.prepare_cached(sql).unwrap();
        assert_eq!(
            statement.get_status(rusqlite::StatementStatus::RePrepare),
            0
        );
    }

    #[tokio::test]
    async fn processes_opening_one_new_file_together_apply_each_step_once() {
        let dir = tempfile::tempdir().unwrap();
        static STEPS: &[Step] = &[
            (1, "a", "CREATE TABLE a (v INTEGER)"),
            (2, "b", "CREATE TABLE b (v INTEGER)"),
            (
                3,
                "c",
                "CREATE TABLE c (v INTEGER); INSERT INTO c VALUES (1)",
            ),
        ];
        // Fresh files, each opened by many at once: each open has its own connections, as
        // each replica's process would.
        for file in 0..20 {
            let url = format!("sqlite://{}/shared-{file}.db", dir.path().display());
            let mut opens = tokio::task::JoinSet::new();
            for _ in 0..16 {
                let url = url.clone();
                opens.spawn(async move { Db::open(&url, &SqliteSettings::default(), STEPS).await });
            }
            while let Some(opened) = opens.join_next().await {
                opened.unwrap().unwrap();
            }
            let check = Db::open(&url, &SqliteSettings::default(), STEPS)
                .await
                .unwrap();
            let (steps, rows): (i64, i64) = check
                .read(|c| {
                    Ok::<_, TestError>(c.query_row(
                        "SELECT (SELECT COUNT(*) FROM schema_migrations), (SELECT COUNT(*) FROM c)",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?)
                })
                .await
                .unwrap();
            assert_eq!((steps, rows), (3, 1), "every step applied once");
        }
    }

    #[tokio::test]
    async fn migrates_writes_rolls_back_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/nested/t.db", dir.path().display());
        static STEPS: &[Step] = &[(1, "t", "CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")];
        let db = Db::open(&url, &SqliteSettings::default(), STEPS)
            .await
            .unwrap();
        db.write(|tx| Ok::<_, TestError>(tx.execute("INSERT INTO t VALUES (1)", [])?))
            .await
            .unwrap();
        let err = db
            .write(|tx| Ok::<_, TestError>(tx.execute("INSERT INTO t VALUES (1)", [])?))
            .await
            .unwrap_err();
        assert!(matches!(err, TestError::Sqlite(ref e) if is_unique_violation(e)));
        let aborted = db
            .write(|tx| {
                tx.execute("INSERT INTO t VALUES (2)", [])?;
                Err::<(), _>(TestError::Abort)
            })
            .await;
        assert!(matches!(aborted, Err(TestError::Abort)));
        db.close().await;
        drop(db);
        // Re-opening re-applies nothing and keeps exactly the committed data.
        let db = Db::open(&url, &SqliteSettings::default(), STEPS)
            .await
            .unwrap();
        let n: i64 = db
            .read(|c| Ok::<_, TestError>(c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 1);
        db.ping().await.unwrap();
    }
}
