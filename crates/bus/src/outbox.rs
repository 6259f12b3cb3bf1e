//! The transactional outbox: a service writes its events into its own database in the same
//! transaction as the state change they describe, and the [`Relay`] publishes them afterwards,
//! at least once, retrying with jittered exponential backoff. A crash between commit and
//! publish delays an event; it never loses one. Consumers deduplicate by event id.
//!
//! Rows with one key (an order's events) go to each destination in commit order: a relay takes
//! a row only when every earlier row of its key and destination is due as well (none is backing
//! off or leased by another relay), and publishes at most one row per key in one call, so a
//! failure (even of one record in a batch) holds back the later rows of that key alone, and a
//! retry repeats a row before its successors, never after. docs/architecture.md, "Event
//! ordering", gives the guarantee per backend and its limits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kit::db::{Db, now_ms};
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{BusError, Event, OutgoingMessage, Queue, Record, Stream, Unsent};

/// The outbox table, to include in the owning service's migrations.
pub const MIGRATION: &str = "CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    key TEXT NOT NULL,
    headers TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    UNIQUE (event_id, destination)
);
CREATE INDEX outbox_due ON outbox (next_attempt_at, seq);";

/// Where an outbox row goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Stream(&'static str),
    Queue(&'static str),
}

impl Destination {
    pub(crate) fn encode(self) -> String {
        match self {
            Destination::Stream(topic) => format!("stream:{topic}"),
            Destination::Queue(queue) => format!("queue:{queue}"),
        }
    }
}

/// Writes one row per destination for `event`, inside the caller's transaction.
pub fn enqueue(
    conn: &Connection,
    event: &Event,
    destinations: &[Destination],
) -> Result<(), rusqlite::Error> {
    let headers = serde_json::to_string(&event.outbox_headers())
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let now = now_ms();
    let id = event.id.to_string();
    let mut insert = conn.prepare_cached(
        "INSERT INTO outbox (event_id, destination, key, headers, payload, created_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?;
    for destination in destinations {
        insert.execute(params![
            id,
            destination.encode(),
            event.subject,
            headers,
            event.data,
            now
        ])?;
    }
    Ok(())
}

/// The outbox table for PostgreSQL stores (timestamps in Unix milliseconds, as in SQLite).
#[cfg(feature = "postgres")]
pub const PG_MIGRATION: &str = "CREATE TABLE outbox (
    seq BIGSERIAL PRIMARY KEY,
    event_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    key TEXT NOT NULL,
    headers TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    UNIQUE (event_id, destination)
);
CREATE INDEX outbox_due ON outbox (next_attempt_at, seq);";

/// The PostgreSQL outbox's second step (a service's migration after [`PG_MIGRATION`]): the
/// relay finds the rows waiting out a failed publish through an index of the rows that failed
/// (none, mostly), not of every row's due time, which each order's rows paid to write and each
/// pass to read (the due rows come from the primary key).
#[cfg(feature = "postgres")]
pub const PG_MIGRATION_RETRYING_INDEX: &str = "DROP INDEX IF EXISTS outbox_due;
CREATE INDEX outbox_retrying ON outbox (seq) WHERE attempts > 0;";

/// Writes one row per destination for `event`, inside the caller's PostgreSQL transaction:
/// one statement for all destinations.
#[cfg(feature = "postgres")]
pub async fn enqueue_pg(
    conn: &mut sqlx::PgConnection,
    event: &Event,
    destinations: &[Destination],
) -> Result<(), sqlx::Error> {
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| PgOutboxRows::insert_sql(1));
    let rows = PgOutboxRows::of(event, destinations)?;
    rows.bind(sqlx::query(SQL.as_str())).execute(conn).await?;
    Ok(())
}

/// An event's outbox rows as the parameters of one `INSERT`, for a caller that folds them into
/// a statement of its own (a new order, its lines and its outbox rows in one round trip and
/// one commit). Rows go in destination order, so their `seq` keeps that order.
#[cfg(feature = "postgres")]
#[derive(Debug)]
pub struct PgOutboxRows {
    event_id: String,
    destinations: Vec<String>,
    key: String,
    headers: String,
    payload: String,
    now: i64,
}

#[cfg(feature = "postgres")]
impl PgOutboxRows {
    pub fn of(event: &Event, destinations: &[Destination]) -> Result<PgOutboxRows, sqlx::Error> {
        Ok(PgOutboxRows {
            event_id: event.id.to_string(),
            destinations: destinations.iter().map(|d| d.encode()).collect(),
            key: event.subject.clone(),
            headers: serde_json::to_string(&event.outbox_headers())
                .map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
            payload: event.data.clone(),
            now: now_ms(),
        })
    }

    /// The `INSERT` of the rows, its parameters numbered from `$first` (bind them with
    /// [`PgOutboxRows::bind`] right after the `first - 1` before them).
    pub fn insert_sql(first: usize) -> String {
        let p = |i: usize| format!("${}", first + i);
        format!(
            "INSERT INTO outbox (event_id, destination, key, headers, payload, created_at, next_attempt_at)
             SELECT {id}, d.destination, {key}, {headers}, {payload}, {now}, {now}
             FROM unnest({destinations}::text[]) WITH ORDINALITY AS d (destination, n) ORDER BY d.n",
            id = p(0),
            destinations = p(1),
            key = p(2),
            headers = p(3),
            payload = p(4),
            now = p(5),
        )
    }

    pub fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.event_id.as_str())
            .bind(self.destinations.as_slice())
            .bind(self.key.as_str())
            .bind(self.headers.as_str())
            .bind(self.payload.as_str())
            .bind(self.now)
    }
}

/// Where a service's outbox rows are: its own database, whichever it is.
#[derive(Debug, Clone)]
enum Source {
    Sqlite(Db),
    #[cfg(feature = "postgres")]
    Postgres(kit::pg::Pg),
    #[cfg(feature = "dynamodb")]
    Dynamo(crate::dynamo::DynamoOutbox),
}

/// Which row: SQL outboxes number theirs, DynamoDB's are keyed by a UUIDv7 string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RowId {
    Seq(i64),
    #[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
    Key(String),
}

fn seqs(ids: Vec<RowId>) -> Vec<i64> {
    ids.into_iter()
        .filter_map(|id| match id {
            RowId::Seq(seq) => Some(seq),
            RowId::Key(_) => None,
        })
        .collect()
}

#[cfg(feature = "dynamodb")]
fn keys(ids: Vec<RowId>) -> Vec<String> {
    ids.into_iter()
        .filter_map(|id| match id {
            RowId::Key(key) => Some(key),
            RowId::Seq(_) => None,
        })
        .collect()
}

/// How long a relay holds the rows it took before another relay may take them (SQLite and
/// DynamoDB, which lease rows): a relay that dies mid-publish delays its rows by this much,
/// never loses them.
pub(crate) const LEASE_MS: i64 = 30_000;

type Due = Vec<(String, Pending)>;

// The SQL outboxes take the rows a relay may take now, oldest first: due, and no earlier row of
// their key and destination waiting (backing off, or leased by another relay), found as each
// key's oldest waiting row.

// SQLite and DynamoDB lease the rows they take by pushing their next attempt out, in the
// statement that selects them, so two relays over one outbox never publish a row twice.
// PostgreSQL instead holds a lock of the outbox for the whole pass (select, publish, delete,
// one transaction): a lease is an update of every row, a new row version and index entry each,
// which the next pass's scans then walk; under load that statement was the costliest of an
// order. The rows are never written before they are deleted.

/// A relay pass's hold on the rows it took: their leases, or on PostgreSQL the open
/// transaction holding the outbox's lock, committed when the pass ends.
enum Pass {
    Leased,
    #[cfg(feature = "postgres")]
    Locked(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Runs `query` in the pass's transaction (a PostgreSQL pass always holds one; without it the
/// statement would commit on its own).
#[cfg(feature = "postgres")]
async fn execute_in_pass(
    pass: &mut Pass,
    pg: &kit::pg::Pg,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<(), BusError> {
    match pass {
        Pass::Locked(tx) => query.execute(&mut **tx).await,
        Pass::Leased => query.execute(pg.pool()).await,
    }
    .map(|_| ())
    .map_err(pg_error)
}
impl Source {
    async fn due(&self, batch: i64) -> Result<(Due, Pass), BusError> {
        let rows: Vec<(i64, String, String, String, String, String, i64)> = match self {
            #[cfg(feature = "dynamodb")]
            Source::Dynamo(outbox) => return Ok((outbox.due(batch).await?, Pass::Leased)),
            Source::Sqlite(db) => {
                let now = now_ms();
                let mut rows = db
                    .write(move |tx| {
                        let mut q = tx.prepare_cached(
                            "UPDATE outbox SET next_attempt_at = ?1 WHERE seq IN (
                               SELECT o.seq FROM outbox o
                               LEFT JOIN (SELECT destination, key, MIN(seq) AS first FROM outbox
                                          WHERE next_attempt_at > ?2 GROUP BY destination, key) waiting
                                      ON waiting.destination = o.destination AND waiting.key = o.key
                               WHERE o.next_attempt_at <= ?2 AND (waiting.first IS NULL OR o.seq < waiting.first)
                               ORDER BY o.seq LIMIT ?3)
                             RETURNING seq, event_id, destination, key, headers, payload, attempts",
                        )?;
                        let rows = q
                            .query_map(params![now + LEASE_MS, now, batch], |r| {
                                Ok((
                                    r.get(0)?,
                                    r.get(1)?,
                                    r.get(2)?,
                                    r.get(3)?,
                                    r.get(4)?,
                                    r.get(5)?,
                                    r.get(6)?,
                                ))
                            })?
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok::<_, BusError>(rows)
                    })
                    .await?;
                rows.sort_by_key(|r| r.0);
                rows
            }
            #[cfg(feature = "postgres")]
            Source::Postgres(pg) => {
                // Replicas share the table. A pass holds a lock of this schema's outbox until
                // it commits the deletes of what it sent, so the next pass (its rows read in
                // a statement that starts after the lock is taken) never sees them. The
                // lock waits rather than fails: a relay that found it taken would otherwise
                // spin on it at every order its replica writes.
                let now = now_ms();
                // The lock is taken with the transaction's BEGIN, in one round trip.
                let mut tx = pg
                    .pool()
                    .begin_with(
                        "BEGIN; SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.outbox'))",
                    )
                    .await
                    .map_err(pg_error)?;
                // The due rows in `seq` order, and the rows backing off after a failure
                // (flagged; a key's later rows wait for its first). Two plain parts, not a
                // join: the first walks the primary key, whose index entries of deleted rows
                // its scans mark dead; a join made PostgreSQL bitmap-scan every deleted row
                // version not yet vacuumed (thousands under load: 1.4 ms a pass), or estimate
                // the plan so high that it compiled it with JIT at every pass. The second
                // reads the partial index of failed rows ([`PG_MIGRATION_RETRYING_INDEX`]),
                // empty but for an outage; grouping them by key here made PostgreSQL set up a
                // hash table at every pass (0.4-0.5 ms a pass under load), so Rust does it.
                let found: Vec<FoundRow> = sqlx::query_as(
                    "(SELECT seq, event_id, destination, key, headers, payload, attempts, FALSE
                            FROM outbox WHERE next_attempt_at <= $1 ORDER BY seq LIMIT $2)
                         UNION ALL
                         (SELECT seq, '', destination, key, '', '', 0, TRUE
                            FROM outbox WHERE attempts > 0 AND next_attempt_at > $1)",
                )
                .bind(now)
                .bind(batch)
                .fetch_all(&mut *tx)
                .await
                .map_err(pg_error)?;
                let keep: Vec<bool> = {
                    // Each backing-off key's first row.
                    let mut backing_off: HashMap<(&str, &str), i64> = HashMap::new();
                    for row in found.iter().filter(|row| row.7) {
                        backing_off
                            .entry((row.2.as_str(), row.3.as_str()))
                            .and_modify(|first| *first = (*first).min(row.0))
                            .or_insert(row.0);
                    }
                    found
                        .iter()
                        .map(|row| {
                            !row.7
                                && backing_off
                                    .get(&(row.2.as_str(), row.3.as_str()))
                                    .is_none_or(|first| row.0 < *first)
                        })
                        .collect()
                };
                let mut rows: Vec<DueRow> = found
                    .into_iter()
                    .zip(keep)
                    .filter(|(_, keep)| *keep)
                    .map(|((a, b, c, d, e, f, g, _), _)| (a, b, c, d, e, f, i64::from(g)))
                    .collect();
                rows.sort_by_key(|r| r.0);
                return Ok((decode_due(rows)?, Pass::Locked(tx)));
            }
        };
        Ok((decode_due(rows)?, Pass::Leased))
    }

    /// Ends a pass: commits what it did on PostgreSQL (and lets the next pass take the lock).
    async fn finish(&self, pass: Pass) -> Result<(), BusError> {
        match pass {
            Pass::Leased => Ok(()),
            #[cfg(feature = "postgres")]
            Pass::Locked(tx) => tx.commit().await.map_err(pg_error),
        }
    }
}

type DueRow = (i64, String, String, String, String, String, i64);
/// A row of the PostgreSQL pass's query: a due row, or (flagged) a key's first row backing off.
#[cfg(feature = "postgres")]
type FoundRow = (i64, String, String, String, String, String, i32, bool);

fn decode_due(rows: Vec<DueRow>) -> Result<Due, BusError> {
    rows.into_iter()
        .map(
            |(seq, event_id, destination, key, headers, payload, attempts)| {
                let headers = serde_json::from_str(&headers)
                    .map_err(|e| BusError::Malformed(e.to_string()))?;
                Ok((
                    destination,
                    Pending {
                        seq: RowId::Seq(seq),
                        key,
                        event_id,
                        headers,
                        payload,
                        attempts,
                    },
                ))
            },
        )
        .collect()
}

impl Source {
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    async fn delete(&self, pass: &mut Pass, ids: Vec<RowId>) -> Result<(), BusError> {
        match self {
            #[cfg(feature = "dynamodb")]
            Source::Dynamo(outbox) => outbox.delete(keys(ids)).await,
            Source::Sqlite(db) => {
                let seqs = seqs(ids);
                db.write(move |tx| {
                    let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
                    for seq in seqs {
                        delete.execute([seq])?;
                    }
                    Ok::<_, BusError>(())
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Source::Postgres(pg) => {
                execute_in_pass(
                    pass,
                    pg,
                    sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)").bind(seqs(ids)),
                )
                .await
            }
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    async fn reschedule(
        &self,
        pass: &mut Pass,
        ids: Vec<RowId>,
        retry_at: i64,
    ) -> Result<(), BusError> {
        match self {
            #[cfg(feature = "dynamodb")]
            Source::Dynamo(outbox) => outbox.reschedule(keys(ids), retry_at).await,
            Source::Sqlite(db) => {
                let seqs = seqs(ids);
                db.write(move |tx| {
                    let mut update = tx.prepare_cached(
                        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?1 WHERE seq = ?2",
                    )?;
                    for seq in seqs {
                        update.execute([retry_at, seq])?;
                    }
                    Ok::<_, BusError>(())
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Source::Postgres(pg) => {
                execute_in_pass(
                    pass,
                    pg,
                    sqlx::query(
                        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1 WHERE seq = ANY($2)",
                    )
                    .bind(retry_at)
                    .bind(seqs(ids)),
                )
                .await
            }
        }
    }

    /// Gives back leased rows that were not tried (a predecessor of their key failed): due
    /// again at once, yet held back until that predecessor goes out.
    async fn release(&self, _pass: &mut Pass, ids: Vec<RowId>) -> Result<(), BusError> {
        let now = now_ms();
        match self {
            #[cfg(feature = "dynamodb")]
            Source::Dynamo(outbox) => outbox.reschedule_untried(keys(ids), now).await,
            Source::Sqlite(db) => {
                let seqs = seqs(ids);
                db.write(move |tx| {
                    let mut update =
                        tx.prepare_cached("UPDATE outbox SET next_attempt_at = ?1 WHERE seq = ?2")?;
                    for seq in seqs {
                        update.execute([now, seq])?;
                    }
                    Ok::<_, BusError>(())
                })
                .await
            }
            // Never leased: their next attempt was not moved, and the failed row before them
            // holds them back.
            #[cfg(feature = "postgres")]
            Source::Postgres(_) => Ok(()),
        }
    }

    /// An embedded database belongs to one process, so at start-up any lease in it was taken
    /// by a process that died mid-publish: its rows go out now rather than when the lease
    /// runs out. (DynamoDB is shared by replicas, whose leases must stand; a PostgreSQL pass
    /// takes no lease, and one that died rolled back.)
    async fn reclaim_at_start(&self) -> Result<(), BusError> {
        match self {
            Source::Sqlite(db) => {
                let now = now_ms();
                db.write(move |tx| {
                    tx.execute(
                        "UPDATE outbox SET next_attempt_at = ?1 WHERE next_attempt_at > ?1",
                        [now],
                    )?;
                    Ok::<_, BusError>(())
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Source::Postgres(_) => Ok(()),
            #[cfg(feature = "dynamodb")]
            Source::Dynamo(_) => Ok(()),
        }
    }

    /// Rows waiting, counted up to `cap`.
    async fn pending(&self, cap: i64) -> Result<i64, BusError> {
        match self {
            #[cfg(feature = "dynamodb")]
            Source::Dynamo(outbox) => outbox.pending(cap).await,
            Source::Sqlite(db) => {
                db.read(move |conn| {
                    Ok::<_, BusError>(conn.query_row(
                        "SELECT COUNT(*) FROM (SELECT 1 FROM outbox LIMIT ?1)",
                        [cap],
                        |r| r.get(0),
                    )?)
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Source::Postgres(pg) => sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT 1 FROM outbox LIMIT $1) AS waiting",
            )
            .bind(cap)
            .fetch_one(pg.pool())
            .await
            .map_err(pg_error),
        }
    }
}

impl Source {
    /// When the oldest row still waiting was written (Unix ms), `None` when the outbox is empty.
    async fn oldest_created_ms(&self) -> Result<Option<i64>, BusError> {
        match self {
            #[cfg(feature = "dynamodb")]
            Source::Dynamo(outbox) => outbox.oldest_created_ms().await,
            Source::Sqlite(db) => {
                // The first row by `seq` (the primary key, in commit order): no scan.
                db.read(|conn| {
                    Ok::<_, BusError>(
                        conn.query_row(
                            "SELECT created_at FROM outbox ORDER BY seq LIMIT 1",
                            [],
                            |r| r.get(0),
                        )
                        .optional()?,
                    )
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Source::Postgres(pg) => {
                sqlx::query_scalar("SELECT created_at FROM outbox ORDER BY seq LIMIT 1")
                    .fetch_optional(pg.pool())
                    .await
                    .map_err(pg_error)
            }
        }
    }
}

#[cfg(feature = "postgres")]
fn pg_error(e: sqlx::Error) -> BusError {
    BusError::Postgres(e.to_string())
}

pub(crate) struct Pending {
    pub(crate) seq: RowId,
    pub(crate) key: String,
    pub(crate) event_id: String,
    pub(crate) headers: crate::Headers,
    pub(crate) payload: String,
    pub(crate) attempts: i64,
}

/// Publishes a service's outbox rows to the stream and the queue.
#[derive(Clone)]
pub struct Relay {
    source: Source,
    stream: Arc<dyn Stream>,
    queue: Arc<dyn Queue>,
    wake: Arc<Notify>,
    batch: i64,
    /// The service whose outbox this is, for the backlog gauges.
    owner: &'static str,
}

/// How long a relay lets rows gather after a pass that found some (see [`Relay::run`]): a
/// few milliseconds more until an event goes out, against half the passes under load
/// (docs/benchmarks.md, "Reservations in memory, a relay that lingers").
const LINGER: Duration = Duration::from_millis(10);

/// How often a relay reports its backlog (`outbox_backlog`, `outbox_oldest_age_seconds`).
const BACKLOG_REPORT: Duration = Duration::from_secs(5);

/// Where the backlog count stops (the gauge then reads this): counting a backlog of millions
/// every few seconds would cost more than knowing it is large.
pub const BACKLOG_COUNT_CAP: i64 = 10_000;

impl Relay {
    pub fn new(db: Db, stream: Arc<dyn Stream>, queue: Arc<dyn Queue>) -> Relay {
        Relay::from_source(Source::Sqlite(db), stream, queue)
    }

    /// A relay for a service whose outbox is in PostgreSQL ([`PG_MIGRATION`]); several
    /// replicas may run one each.
    #[cfg(feature = "postgres")]
    pub fn on_postgres(pg: kit::pg::Pg, stream: Arc<dyn Stream>, queue: Arc<dyn Queue>) -> Relay {
        Relay::from_source(Source::Postgres(pg), stream, queue)
    }

    /// A relay for a service whose outbox is a DynamoDB table ([`crate::dynamo`]); several
    /// replicas may run one each (rows are leased with conditional updates).
    #[cfg(feature = "dynamodb")]
    pub fn on_dynamo(
        outbox: crate::dynamo::DynamoOutbox,
        stream: Arc<dyn Stream>,
        queue: Arc<dyn Queue>,
    ) -> Relay {
        Relay::from_source(Source::Dynamo(outbox), stream, queue)
    }

    fn from_source(source: Source, stream: Arc<dyn Stream>, queue: Arc<dyn Queue>) -> Relay {
        Relay {
            source,
            stream,
            queue,
            wake: Arc::new(Notify::new()),
            batch: 256,
            owner: "mercato",
        }
    }

    /// Names the service whose outbox this is (the `service` label of its gauges).
    pub fn owned_by(mut self, service: &'static str) -> Relay {
        self.owner = service;
        self
    }

    /// Rows waiting and the age of the oldest (zero when none), as gauges: an outbox that
    /// grows or ages is a relay that cannot publish (the `OutboxBacklogAging` alert).
    pub async fn report_backlog(&self) -> Result<(i64, Duration), BusError> {
        let pending = self.source.pending(BACKLOG_COUNT_CAP).await?;
        let oldest = self.source.oldest_created_ms().await?;
        let age = oldest.map_or(Duration::ZERO, |at| {
            Duration::from_millis(u64::try_from(now_ms().saturating_sub(at)).unwrap_or(0))
        });
        metrics::gauge!("outbox_backlog", "service" => self.owner).set(pending as f64);
        metrics::gauge!("outbox_oldest_age_seconds", "service" => self.owner)
            .set(age.as_secs_f64());
        Ok((pending, age))
    }

    /// Call after committing outbox rows so they go out now rather than at the next poll.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Relays until `shutdown`, then returns after the batch in hand.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Err(e) = self.source.reclaim_at_start().await {
            tracing::warn!(error = %e, "reclaiming outbox leases failed; they expire on their own");
        }
        let mut failures: u32 = 0;
        let mut reported = tokio::time::Instant::now() - BACKLOG_REPORT;
        loop {
            if reported.elapsed() >= BACKLOG_REPORT {
                reported = tokio::time::Instant::now();
                if let Err(e) = self.report_backlog().await {
                    tracing::warn!(error = %e, "measuring the outbox backlog failed");
                }
            }
            match self.relay_once().await {
                Ok(n) if n > 0 => {
                    failures = 0;
                    if shutdown.is_cancelled() {
                        return;
                    }
                    // Rows came in while this pass ran: under load, let the next ones gather
                    // for a moment (a producer's linger), so a pass (its transaction, round
                    // trips and commit) carries several orders' events, not one or two. A
                    // full batch goes again at once; the first rows after a quiet spell wait
                    // for nothing.
                    if i64::try_from(n).unwrap_or(i64::MAX) < self.batch {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(LINGER) => {},
                        }
                    }
                    continue;
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "outbox relay pass failed");
                }
            }
            let idle = if failures > 0 {
                backoff(i64::from(failures))
            } else {
                Duration::from_millis(250)
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {},
                () = tokio::time::sleep(idle) => {},
            }
        }
    }

    /// One pass: publishes every row it may take now (up to a batch). Returns how many went
    /// out.
    pub async fn relay_once(&self) -> Result<usize, BusError> {
        let (rows, mut pass) = self.source.due(self.batch).await?;
        if rows.is_empty() {
            self.source.finish(pass).await?;
            return Ok(0);
        }
        let mut by_destination: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
        for (destination, pending) in rows {
            by_destination.entry(destination).or_default().push(pending);
        }
        // The rows sent to every destination go in one delete: under load a pass carries many
        // orders' events, and each statement is a round trip and a commit.
        let mut sent = Vec::new();
        for (destination, rows) in by_destination {
            sent.extend(self.relay_to(&mut pass, &destination, rows).await?);
        }
        let published = sent.len();
        if !sent.is_empty() {
            self.source.delete(&mut pass, sent).await?;
        }
        self.source.finish(pass).await?;
        Ok(published)
    }

    /// Publishes `rows` (oldest first) to one destination in rounds holding at most one row per
    /// key: the first round takes each key's oldest row, the next each key's second, and so on.
    /// A key whose row fails sits out the later rounds; its untried rows are given back.
    /// Returns the rows sent, for the caller to delete.
    async fn relay_to(
        &self,
        pass: &mut Pass,
        destination: &str,
        rows: Vec<Pending>,
    ) -> Result<Vec<RowId>, BusError> {
        let mut rounds: Vec<Vec<Pending>> = Vec::new();
        let mut per_key: HashMap<String, usize> = HashMap::new();
        for row in rows {
            let round = per_key.entry(row.key.clone()).or_insert(0);
            if rounds.len() <= *round {
                rounds.push(Vec::new());
            }
            rounds[*round].push(row);
            *round += 1;
        }
        let mut failed_keys: HashSet<String> = HashSet::new();
        let mut untried: Vec<RowId> = Vec::new();
        let mut published = Vec::new();
        for round in rounds {
            let (held, round): (Vec<Pending>, Vec<Pending>) = round
                .into_iter()
                .partition(|row| failed_keys.contains(&row.key));
            untried.extend(held.into_iter().map(|row| row.seq));
            if round.is_empty() {
                continue;
            }
            let failed: HashSet<usize> = match self.publish(destination, &round).await {
                Ok(()) => HashSet::new(),
                Err(unsent) => {
                    tracing::warn!(destination, error = %unsent.error, events = unsent.indexes.len(), "publishing failed; will retry");
                    unsent.indexes.into_iter().collect()
                }
            };
            let (mut sent, mut retry, mut attempts) = (Vec::new(), Vec::new(), 0);
            for (i, row) in round.into_iter().enumerate() {
                if failed.contains(&i) {
                    attempts = attempts.max(row.attempts + 1);
                    failed_keys.insert(row.key);
                    retry.push(row.seq);
                } else {
                    sent.push(row.seq);
                }
            }
            metrics::counter!("outbox_events_total", "destination" => destination.to_owned(), "outcome" => "published")
                .increment(sent.len() as u64);
            metrics::counter!("outbox_events_total", "destination" => destination.to_owned(), "outcome" => "failed")
                .increment(retry.len() as u64);
            published.extend(sent);
            if !retry.is_empty() {
                let retry_at =
                    now_ms() + i64::try_from(backoff(attempts).as_millis()).unwrap_or(30_000);
                self.source.reschedule(pass, retry, retry_at).await?;
            }
        }
        if !untried.is_empty() {
            self.source.release(pass, untried).await?;
        }
        Ok(published)
    }

    async fn publish(&self, destination: &str, pending: &[Pending]) -> Result<(), Unsent> {
        // One producer span per record, open while the batch goes out (none while traces are
        // off); each record then carries its own span's context.
        let mut sends = Vec::new();
        // An injected outage of the stream or the queue (`kit::faults`): the rows stay in the
        // outbox and are retried like any failed publish.
        let injected = match destination.split_once(':') {
            Some(("stream", _)) if kit::faults::stream_publish_fails() => Some("stream-publish"),
            Some(("queue", _)) if kit::faults::queue_publish_fails() => Some("queue-publish"),
            _ => None,
        };
        if let Some(fault) = injected {
            return Err(Unsent::all(pending.len(), BusError::Injected(fault)));
        }
        if let Some(topic) = destination.strip_prefix("stream:") {
            let records: Vec<Record> = pending
                .iter()
                .map(|p| {
                    let mut headers = p.headers.clone();
                    sends.extend(crate::trace::send_span(
                        self.owner,
                        self.stream.system(),
                        topic,
                        &mut headers,
                    ));
                    Record {
                        key: p.key.clone(),
                        headers,
                        payload: p.payload.clone().into_bytes(),
                    }
                })
                .collect();
            self.stream.publish_each(topic, &records).await
        } else if let Some(queue) = destination.strip_prefix("queue:") {
            let messages: Vec<OutgoingMessage> = pending
                .iter()
                .map(|p| {
                    let mut attributes = p.headers.clone();
                    sends.extend(crate::trace::send_span(
                        self.owner,
                        self.queue.system(),
                        queue,
                        &mut attributes,
                    ));
                    OutgoingMessage {
                        id: p.event_id.clone(),
                        body: p.payload.clone(),
                        attributes,
                    }
                })
                .collect();
            self.queue.send_each(queue, &messages).await
        } else {
            Err(Unsent::all(
                pending.len(),
                BusError::Malformed(format!("unknown destination {destination}")),
            ))
        }
    }

    /// Rows not yet published, for readiness and tests.
    pub async fn pending(&self) -> Result<i64, BusError> {
        self.source.pending(i64::MAX).await
    }
}

/// 100 ms doubling per attempt up to 30 s, with ±20 % jitter so retries do not stampede.
fn backoff(attempt: i64) -> Duration {
    let exp = u32::try_from(attempt.clamp(0, 20)).unwrap_or(20);
    let base = 100u64.saturating_mul(2u64.saturating_pow(exp)).min(30_000);
    let jitter = fastrand::u64(0..=base / 5);
    let ms = if fastrand::bool() {
        base + jitter
    } else {
        base - jitter
    };
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::{EmbeddedBus, EmbeddedOptions};
    use async_trait::async_trait;
    use kit::config::SqliteSettings;
    use std::sync::atomic::{AtomicBool, Ordering};

    static STEPS: &[kit::db::Step] = &[(1, "outbox", MIGRATION)];

    /// A queue that fails until told otherwise: a broker that is down.
    struct Flaky {
        inner: EmbeddedBus,
        down: AtomicBool,
    }

    #[async_trait]
    impl Queue for Flaky {
        async fn send_batch(&self, q: &str, m: &[OutgoingMessage]) -> Result<(), BusError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(BusError::UnsupportedUrl("down".into()));
            }
            self.inner.send_batch(q, m).await
        }
        async fn receive(
            &self,
            q: &str,
            max: usize,
            w: Duration,
        ) -> Result<Vec<crate::ReceivedMessage>, BusError> {
            self.inner.receive(q, max, w).await
        }
        async fn delete(&self, q: &str, r: &str) -> Result<(), BusError> {
            self.inner.delete(q, r).await
        }
        async fn delete_batch(&self, q: &str, r: &[String]) -> Result<(), BusError> {
            self.inner.delete_batch(q, r).await
        }
        async fn release(&self, q: &str, r: &str, d: Duration) -> Result<(), BusError> {
            self.inner.release(q, r, d).await
        }
        async fn depth(&self, q: &str) -> Result<i64, BusError> {
            self.inner.depth(q).await
        }
    }

    /// A stream that refuses the records of chosen events: a partition whose leader is down, a
    /// record the broker rejects. `publish` fails as a whole when it carries one; `publish_each`
    /// fails those records only, as Kafka does.
    struct Refusing {
        inner: EmbeddedBus,
        refused: std::sync::Mutex<std::collections::BTreeSet<String>>,
    }

    impl Refusing {
        fn refuses(&self, record: &Record) -> bool {
            let refused = self.refused.lock().unwrap();
            record
                .headers
                .get(crate::event::attr::ID)
                .is_some_and(|id| refused.contains(id))
        }
    }

    #[async_trait]
    impl Stream for Refusing {
        async fn publish(&self, topic: &str, records: &[Record]) -> Result<(), BusError> {
            if records.iter().any(|r| self.refuses(r)) {
                return Err(BusError::Kafka("record refused".into()));
            }
            self.inner.publish(topic, records).await
        }
        async fn publish_each(&self, topic: &str, records: &[Record]) -> Result<(), Unsent> {
            let (refused, accepted): (Vec<_>, Vec<_>) = records
                .iter()
                .enumerate()
                .partition(|(_, r)| self.refuses(r));
            let accepted: Vec<Record> = accepted.into_iter().map(|(_, r)| r.clone()).collect();
            self.inner
                .publish(topic, &accepted)
                .await
                .map_err(|e| Unsent::all(records.len(), e))?;
            if refused.is_empty() {
                return Ok(());
            }
            Err(Unsent {
                indexes: refused.into_iter().map(|(i, _)| i).collect(),
                error: BusError::Kafka("record refused".into()),
            })
        }
        async fn subscribe(
            &self,
            topic: &str,
            group: &str,
        ) -> Result<Box<dyn crate::StreamConsumer>, BusError> {
            self.inner.subscribe(topic, group).await
        }
    }

    impl Source {
        async fn enqueue_for_test(&self, event: Event, to: &'static [Destination]) {
            match self {
                Source::Sqlite(db) => db
                    .write(move |tx| enqueue(tx, &event, to).map_err(BusError::from))
                    .await
                    .unwrap(),
                #[cfg(feature = "postgres")]
                Source::Postgres(pg) => {
                    let mut tx = pg.pool().begin().await.unwrap();
                    enqueue_pg(&mut tx, &event, to).await.unwrap();
                    tx.commit().await.unwrap();
                }
                #[cfg(feature = "dynamodb")]
                Source::Dynamo(outbox) => {
                    outbox
                        .client()
                        .transact_write_items()
                        .set_transact_items(Some(outbox.items(&event, to).unwrap()))
                        .send()
                        .await
                        .unwrap();
                }
            }
        }

        /// Skips the backoff: every row is due now.
        async fn make_all_due(&self) {
            match self {
                Source::Sqlite(db) => db
                    .write(|tx| {
                        Ok::<_, BusError>(tx.execute("UPDATE outbox SET next_attempt_at = 0", [])?)
                    })
                    .await
                    .map(|_| ())
                    .unwrap(),
                #[cfg(feature = "postgres")]
                Source::Postgres(pg) => {
                    sqlx::query("UPDATE outbox SET next_attempt_at = 0")
                        .execute(pg.pool())
                        .await
                        .unwrap();
                }
                #[cfg(feature = "dynamodb")]
                Source::Dynamo(outbox) => outbox.make_all_due().await.unwrap(),
            }
        }
    }

    fn event(n: u32) -> Event {
        Event::new(
            uuid::Uuid::new_v4(),
            "order.created",
            "test",
            format!("o{n}"),
            &serde_json::json!({ "n": n }),
        )
        .unwrap()
    }

    /// The outbox contract, run unchanged against each backend: rows go out once, a failing
    /// destination keeps its rows (and only its rows) for a later pass, and replicas never
    /// publish the same row twice.
    async fn keeps_the_contract(source: Source, dir: &std::path::Path) {
        let bus = EmbeddedBus::open(
            &format!("sqlite://{}/bus.db", dir.display()),
            &SqliteSettings::default(),
            EmbeddedOptions::default(),
        )
        .await
        .unwrap();
        let flaky = Arc::new(Flaky {
            inner: bus.clone(),
            down: AtomicBool::new(true),
        });
        let relay = Relay::from_source(source.clone(), Arc::new(bus.clone()), flaky.clone());

        let first = event(1);
        source
            .enqueue_for_test(
                first.clone(),
                &[Destination::Stream("orders"), Destination::Queue("q")],
            )
            .await;
        assert_eq!(
            relay.relay_once().await.unwrap(),
            1,
            "the stream row goes out"
        );
        assert_eq!(relay.pending().await.unwrap(), 1, "the queue row waits");
        let (backlog, age) = relay.report_backlog().await.unwrap();
        assert_eq!(backlog, 1);
        assert!(age < Duration::from_secs(60), "{age:?}");
        assert_eq!(
            relay.relay_once().await.unwrap(),
            0,
            "backing off, nothing due"
        );
        flaky.down.store(false, Ordering::SeqCst);
        source.make_all_due().await;
        assert_eq!(relay.relay_once().await.unwrap(), 1);
        assert_eq!(relay.pending().await.unwrap(), 0);
        assert_eq!(
            relay.report_backlog().await.unwrap(),
            (0, Duration::ZERO),
            "an empty outbox has no age"
        );
        let got = bus.receive("q", 10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, first.id.to_string());

        // Two relays over one outbox (two replicas): 300 rows, each published exactly once.
        for n in 0..300 {
            source
                .enqueue_for_test(event(n), &[Destination::Queue("q2")])
                .await;
        }
        assert_eq!(
            source.pending(100).await.unwrap(),
            100,
            "counting stops at the cap"
        );
        let other = Relay::from_source(source.clone(), Arc::new(bus.clone()), flaky.clone());
        let (a, b) = tokio::join!(
            async {
                let mut n = 0;
                while relay.pending().await.unwrap() > 0 {
                    n += relay.relay_once().await.unwrap();
                }
                n
            },
            async {
                let mut n = 0;
                while other.pending().await.unwrap() > 0 {
                    n += other.relay_once().await.unwrap();
                }
                n
            }
        );
        assert_eq!(a + b, 300);
        assert_eq!(bus.depth("q2").await.unwrap(), 300);
        let mut ids = std::collections::BTreeSet::new();
        loop {
            let got = bus.receive("q2", 100, Duration::ZERO).await.unwrap();
            if got.is_empty() {
                break;
            }
            ids.extend(got.into_iter().map(|m| m.id));
        }
        assert_eq!(ids.len(), 300, "no row published twice");
    }

    fn keyed(key: &str, n: u32) -> Event {
        Event::new(
            uuid::Uuid::now_v7(),
            "payment.refunded",
            "test",
            key.to_owned(),
            &serde_json::json!({ "n": n }),
        )
        .unwrap()
    }

    /// Every id published on `topic` so far, in stream order.
    async fn published(bus: &EmbeddedBus, topic: &str) -> Vec<String> {
        let mut consumer = bus
            .subscribe(topic, &format!("check-{}", uuid::Uuid::new_v4()))
            .await
            .unwrap();
        let got = consumer.poll(1000, Duration::ZERO).await.unwrap();
        got.into_iter()
            .map(|d| d.record.headers[crate::event::attr::ID].clone())
            .collect()
    }

    /// The ordering contract, run unchanged against each backend: rows of one key go out in
    /// commit order. A row that fails holds back the later rows of its key (and only of its
    /// key) until it is published itself.
    async fn keeps_each_keys_order(source: Source, dir: &std::path::Path) {
        const TOPIC: &str = "ordered";
        let bus = EmbeddedBus::open(
            &format!("sqlite://{}/ordered.db", dir.display()),
            &SqliteSettings::default(),
            EmbeddedOptions::default(),
        )
        .await
        .unwrap();
        let stream = Arc::new(Refusing {
            inner: bus.clone(),
            refused: Default::default(),
        });
        let relay = Relay::from_source(source.clone(), stream.clone(), Arc::new(bus.clone()));
        let to: &'static [Destination] = &[Destination::Stream(TOPIC)];

        let (k1, k2, l1) = (keyed("K", 1), keyed("K", 2), keyed("L", 1));
        stream.refused.lock().unwrap().insert(k1.id.to_string());
        source.enqueue_for_test(k1.clone(), to).await;
        assert_eq!(relay.relay_once().await.unwrap(), 0, "K's first row fails");
        source.enqueue_for_test(k2.clone(), to).await;
        source.enqueue_for_test(l1.clone(), to).await;
        relay.relay_once().await.unwrap();
        assert_eq!(
            published(&bus, TOPIC).await,
            vec![l1.id.to_string()],
            "L goes out; K's second row waits for K's first"
        );
        assert_eq!(relay.pending().await.unwrap(), 2);

        // K's first row due again and still refused, in one call with a new row of L: L's goes
        // out on its own account, K's second still waits.
        let l2 = keyed("L", 2);
        source.enqueue_for_test(l2.clone(), to).await;
        source.make_all_due().await;
        assert_eq!(relay.relay_once().await.unwrap(), 1);
        assert_eq!(
            published(&bus, TOPIC).await,
            vec![l1.id.to_string(), l2.id.to_string()]
        );
        assert_eq!(relay.pending().await.unwrap(), 2);

        stream.refused.lock().unwrap().clear();
        source.make_all_due().await;
        while relay.pending().await.unwrap() > 0 {
            relay.relay_once().await.unwrap();
        }
        let order = published(&bus, TOPIC).await;
        let position = |e: &Event| order.iter().position(|id| *id == e.id.to_string());
        assert!(
            position(&k1).unwrap() < position(&k2).unwrap(),
            "K in commit order: {order:?}"
        );
        assert_eq!(order.len(), 4, "each row once: {order:?}");
    }

    #[tokio::test]
    async fn sqlite_outbox_keeps_each_keys_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(
            &format!("sqlite://{}/svc.db", dir.path().display()),
            &SqliteSettings::default(),
            STEPS,
        )
        .await
        .unwrap();
        keeps_each_keys_order(Source::Sqlite(db), dir.path()).await;
    }

    /// The outbox's steps as a service migrates them.
    #[cfg(feature = "postgres")]
    static OUTBOX_PG_STEPS: &[kit::pg::PgStep] = &[
        (1, "outbox", PG_MIGRATION),
        (2, "outbox retrying index", PG_MIGRATION_RETRYING_INDEX),
    ];

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_outbox_keeps_each_keys_order() {
        let dir = tempfile::tempdir().unwrap();
        let url = kit::pg::test_database_url();
        let pg = kit::pg::Pg::open(
            &url,
            &kit::pg::unique_schema("outbox_order"),
            &kit::config::PostgresSettings::default(),
            OUTBOX_PG_STEPS,
        )
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {url} (TEST_DATABASE_URL): {e}; scripts/test starts one")
        });
        keeps_each_keys_order(Source::Postgres(pg.clone()), dir.path()).await;
        pg.drop_schema().await.unwrap();
    }

    /// DynamoDB on the server at `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts moto).
    #[cfg(feature = "dynamodb")]
    #[tokio::test]
    async fn dynamodb_outbox_keeps_each_keys_order() {
        let endpoint = std::env::var("TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "TEST_DYNAMODB_ENDPOINT is not set: run under scripts/check-aws (it starts moto)"
            )
        });
        let url = kit::dynamo_url::parse(&format!(
            "dynamodb://outbox-{}?region=us-east-1&endpoint={endpoint}",
            uuid::Uuid::new_v4()
        ))
        .unwrap();
        let config = crate::dynamo::sdk_config(&url).await;
        let outbox = crate::dynamo::DynamoOutbox::new(
            aws_sdk_dynamodb::Client::new(&config),
            url.table.clone(),
        );
        outbox.ensure_table().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        keeps_each_keys_order(Source::Dynamo(outbox), dir.path()).await;
    }

    #[tokio::test]
    async fn sqlite_outbox_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(
            &format!("sqlite://{}/svc.db", dir.path().display()),
            &SqliteSettings::default(),
            STEPS,
        )
        .await
        .unwrap();
        keeps_the_contract(Source::Sqlite(db), dir.path()).await;
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_outbox_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let url = kit::pg::test_database_url();
        let pg = kit::pg::Pg::open(
            &url,
            &kit::pg::unique_schema("outbox"),
            &kit::config::PostgresSettings::default(),
            OUTBOX_PG_STEPS,
        )
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {url} (TEST_DATABASE_URL): {e}; scripts/test starts one")
        });
        keeps_the_contract(Source::Postgres(pg.clone()), dir.path()).await;
        pg.drop_schema().await.unwrap();
    }

    /// DynamoDB on the server at `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts moto), in
    /// a table of its own: fails, never skips, without it.
    #[cfg(feature = "dynamodb")]
    #[tokio::test]
    async fn dynamodb_outbox_keeps_the_contract() {
        let endpoint = std::env::var("TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "TEST_DYNAMODB_ENDPOINT is not set: run under scripts/check-aws (it starts moto)"
            )
        });
        let url = kit::dynamo_url::parse(&format!(
            "dynamodb://outbox-{}?region=us-east-1&endpoint={endpoint}",
            uuid::Uuid::new_v4()
        ))
        .unwrap();
        let config = crate::dynamo::sdk_config(&url).await;
        let outbox = crate::dynamo::DynamoOutbox::new(
            aws_sdk_dynamodb::Client::new(&config),
            url.table.clone(),
        );
        outbox.ensure_table().await.unwrap();
        outbox.ensure_table().await.unwrap(); // idempotent
        let dir = tempfile::tempdir().unwrap();
        keeps_the_contract(Source::Dynamo(outbox), dir.path()).await;
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) <= Duration::from_millis(240));
        assert!(backoff(30) <= Duration::from_millis(36_000));
        assert!(backoff(30) >= Duration::from_millis(24_000));
    }
}
