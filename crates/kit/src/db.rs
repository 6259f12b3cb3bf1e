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
//!
//! Group commit: the writes waiting when the writer turns to the next one run together in one
//! transaction, each under a savepoint of its own (a write that fails rolls back to it, and
//! only its own changes go), and every caller hears of its write after the one commit. A
//! commit appends each page it changed to the WAL, so a much-written page (an index's last
//! leaf, a hot product's row) is written once a group, not once a write: under load most of
//! the bytes this process wrote to disk.

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

/// A reader thread: owns one connection and runs jobs on it in order. Reads get no span of
/// their own (point lookups, most of them): they would double a request's spans for little to
/// see.
#[derive(Debug)]
struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    fn spawn(name: String, mut conn: Connection) -> Result<Worker, DbError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(job) = queue.recv() {
                // A panicking job must not take the connection down with it; its caller sees
                // the dropped reply as `Closed`.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
            }
        })?;
        Ok(Worker { jobs })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnOnce(&mut Connection) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = reply.send(f(conn));
            }))
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)
    }
}

#[derive(Debug)]
struct Inner {
    writer: Writer,
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
        conn.pragma_update(
            None,
            "wal_autocheckpoint",
            settings.wal_autocheckpoint_pages.max(1),
        )?;
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

/// One write of a group: given the group's transaction (or the error that kept it from
/// starting), it runs under a savepoint of its own and returns what to tell its caller once
/// the commit's outcome is known.
type GroupWrite = Box<dyn FnOnce(Result<&Transaction<'_>, &rusqlite::Error>) -> Deliver + Send>;

/// Tells a write's caller its outcome: `None` if the group committed, else the error.
type Deliver = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

/// Most writes in one transaction.
const MOST_WRITES_PER_COMMIT: usize = 64;

enum WriterJob {
    Write(GroupWrite),
    /// Work on the connection outside any transaction (a checkpoint), in its turn.
    Raw(Job),
}

/// The writer thread: runs the waiting writes in groups, one transaction each.
#[derive(Debug)]
struct Writer {
    jobs: mpsc::Sender<WriterJob>,
}

impl Writer {
    fn spawn(name: String, mut conn: Connection) -> Result<Writer, DbError> {
        let (jobs, queue) = mpsc::channel::<WriterJob>();
        std::thread::Builder::new().name(name).spawn(move || {
            let mut next: Option<WriterJob> = None;
            loop {
                let job = match next.take() {
                    Some(job) => job,
                    None => match queue.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    },
                };
                match job {
                    WriterJob::Raw(job) => {
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
                    }
                    WriterJob::Write(first) => {
                        let mut group = vec![first];
                        // Only what is waiting now: a write never waits for company.
                        while group.len() < MOST_WRITES_PER_COMMIT {
                            match queue.try_recv() {
                                Ok(WriterJob::Write(write)) => group.push(write),
                                Ok(raw) => {
                                    next = Some(raw);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        commit_group(&mut conn, group);
                    }
                }
            }
        })?;
        Ok(Writer { jobs })
    }

    fn send(&self, job: WriterJob) -> Result<(), DbError> {
        self.jobs.send(job).map_err(|_| DbError::Closed)
    }
}

/// Runs `group` in one `BEGIN IMMEDIATE` transaction and tells each write the outcome.
fn commit_group(conn: &mut Connection, group: Vec<GroupWrite>) {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            for write in group {
                write(Err(&e))(Some(&e));
            }
            return;
        }
    };
    let mut done: Vec<Deliver> = Vec::with_capacity(group.len());
    let mut lost: Option<rusqlite::Error> = None;
    for write in group {
        match &lost {
            None => done.push(write(Ok(&tx))),
            Some(e) => write(Err(e))(Some(e)),
        }
        // Some errors (a full disk, an I/O error) make SQLite roll the whole transaction back:
        // what the writes before did is gone, and a savepoint now would open a new one.
        if lost.is_none() && tx.is_autocommit() {
            lost = Some(group_rolled_back());
        }
    }
    let committed = match lost {
        Some(e) => Err(e),
        None => tx.commit(),
    };
    let error = committed.err();
    for deliver in done {
        deliver(error.as_ref());
    }
}

fn group_rolled_back() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
        Some("the write's transaction was rolled back by SQLite".into()),
    )
}

/// An owned copy of a group's error, for each of its writes.
fn copy_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// `f` as one write of a group: under a savepoint, released if it returns `Ok`, rolled back
/// to if it returns `Err` (or panics: then `None`, and its caller hears `Closed`).
fn in_savepoint<T, E, F>(tx: &Transaction<'_>, f: F) -> Option<Result<T, E>>
where
    F: FnOnce(&Transaction<'_>) -> Result<T, E>,
    E: From<rusqlite::Error>,
{
    let run = |sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([]));
    if let Err(e) = run("SAVEPOINT write") {
        return Some(Err(E::from(e)));
    }
    let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(tx)));
    let ended = if matches!(out, Ok(Ok(_))) {
        run("RELEASE write")
    } else {
        run("ROLLBACK TO write").and_then(|_| run("RELEASE write"))
    };
    match (out, ended) {
        (Err(_), _) => None,
        (Ok(Ok(_)), Err(e)) => Some(Err(E::from(e))),
        (Ok(out), _) => Some(out),
    }
}

/// `f` as a [`GroupWrite`] whose outcome goes to `reply` (if any) after the group's commit.
fn group_write<T, E, F>(
    f: F,
    reply: Option<tokio::sync::oneshot::Sender<Result<T, E>>>,
) -> GroupWrite
where
    F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<rusqlite::Error> + Send + 'static,
{
    let span = writer_span();
    Box::new(move |tx| -> Deliver {
        // The caller's trace continues on this thread: what the write stores (an outbox row's
        // trace context) names this span.
        let _inside = span.as_ref().map(tracing::Span::enter);
        let out = match tx {
            Ok(tx) => in_savepoint(tx, f),
            Err(e) => Some(Err(E::from(copy_error(e)))),
        };
        Box::new(move |commit| {
            let (Some(reply), Some(out)) = (reply, out) else {
                return;
            };
            let _ = reply.send(match (out, commit) {
                (Ok(_), Some(e)) => Err(E::from(copy_error(e))),
                (out, _) => out,
            });
        })
    })
}

/// The span of one write inside an exported trace ([`crate::telemetry::in_exported_trace`]):
/// the kind of work, never the statement's values.
fn writer_span() -> Option<tracing::Span> {
    crate::telemetry::in_exported_trace().then(|| {
        tracing::info_span!(
            "sqlite",
            otel.name = "transaction",
            otel.kind = "client",
            db.system.name = "sqlite",
            db.operation.name = "transaction",
        )
    })
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
            let writer = Writer::spawn(format!("sqlite-w-{name}"), conn)?;
            let readers = (0..settings.read_connections.max(1))
                .map(|i| {
                    Worker::spawn(
                        format!("sqlite-r{i}-{name}"),
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
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inner
            .writer
            .send(WriterJob::Write(group_write(f, Some(reply))))
            .map_err(E::from)?;
        answer.await.map_err(|_| E::from(DbError::Closed))?
    }

    /// Queues `f` as a write transaction without waiting for it: for clean-up from `Drop`,
    /// where nothing can be awaited. Writes run one at a time in the order they were queued,
    /// so a later [`Db::write`] on this handle sees its effect. Its outcome is not reported.
    pub fn write_detached<F>(&self, f: F)
    where
        F: FnOnce(&Transaction<'_>) -> Result<(), rusqlite::Error> + Send + 'static,
    {
        let _ = self
            .inner
            .writer
            .send(WriterJob::Write(group_write(f, None)));
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
        let (done, checkpointed) = tokio::sync::oneshot::channel();
        let checkpoint = WriterJob::Raw(Box::new(move |conn| {
            let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
            let _ = done.send(());
        }));
        if self.inner.writer.send(checkpoint).is_ok() {
            let _ = checkpointed.await;
        }
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

    /// Writes waiting together commit together, each under a savepoint: one that fails leaves
    /// nothing (not even the rows it wrote before failing), the others in its group keep
    /// theirs, and every caller hears its own outcome.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_waiting_together_commit_together_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        static STEPS: &[Step] = &[(1, "t", "CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")];
        let db = Db::open(
            &format!("sqlite://{}", path.display()),
            &SqliteSettings::default(),
            STEPS,
        )
        .await
        .unwrap();
        // The writer waits inside a first write until the others are queued behind it.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let first = {
            let db = db.clone();
            tokio::spawn(async move {
                db.write(move |tx| {
                    wait.recv().unwrap();
                    Ok::<_, TestError>(tx.execute("INSERT INTO t VALUES (0)", [])?)
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let writes: Vec<_> = (1..=40_i64)
            .map(|v| {
                let (db, path) = (db.clone(), path.clone());
                tokio::spawn(async move {
                    db.write(move |tx| {
                        tx.execute("INSERT INTO t VALUES (?1)", [v * 1_000])?;
                        match v % 4 {
                            // Fails after writing: its first row must go too.
                            1 => Err(TestError::Abort),
                            // Fails on a duplicate (0 is the first write's).
                            2 => Ok(tx.execute("INSERT INTO t VALUES (0)", []).map(|_| (0, 0))?),
                            _ => {
                                let in_group: i64 =
                                    tx.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?;
                                let committed: i64 = Connection::open(&path)?.query_row(
                                    "SELECT COUNT(*) FROM t",
                                    [],
                                    |r| r.get(0),
                                )?;
                                Ok((in_group, committed))
                            }
                        }
                    })
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let mut grouped = false;
        for (i, w) in writes.into_iter().enumerate() {
            let v = i64::try_from(i).unwrap() + 1;
            match (v % 4, w.await.unwrap()) {
                (1, Err(TestError::Abort)) => {}
                (2, Err(TestError::Sqlite(e))) if is_unique_violation(&e) => {}
                (0 | 3, Ok((in_group, committed))) => grouped |= in_group > committed + 1,
                (_, other) => panic!("write {v}: {other:?}"),
            }
        }
        assert!(
            grouped,
            "some write saw another's uncommitted row: they shared a transaction"
        );
        let kept: Vec<i64> = db
            .read(|c| {
                let mut s = c.prepare("SELECT v FROM t ORDER BY v")?;
                let rows = s
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<i64>, _>>()?;
                Ok::<_, TestError>(rows)
            })
            .await
            .unwrap();
        let expected: Vec<i64> = std::iter::once(0)
            .chain(
                (1..=40)
                    .filter(|v| v % 4 == 0 || v % 4 == 3)
                    .map(|v| v * 1_000),
            )
            .collect();
        assert_eq!(kept, expected);
    }
}
