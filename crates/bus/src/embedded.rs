//! The embedded backends: a durable stream (topic log with consumer groups and committed
//! offsets) and a queue (visibility timeout, receive count, dead-lettering), both in one
//! SQLite file, so `mercato up` needs nothing installed. Several processes may share the
//! file (`mercato serve` on one host); waiting consumers are woken at once in-process and
//! by a short poll across processes. The members of a consumer group share its partitions
//! the way Kafka's do: each partition is leased to one live member at a time (see
//! [`Membership`]), so two replicas of a service never both read one record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kit::config::SqliteSettings;
use kit::db::{Db, Step, now_ms};
use rusqlite::params;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{
    BusError, Delivered, Headers, OutgoingMessage, Queue, ReceivedMessage, Record, Stream,
    StreamConsumer, dead_letter_queue,
};

static STEPS: &[Step] = &[
    (
        1,
        "stream and queue",
        "CREATE TABLE stream_records (
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        key TEXT NOT NULL,
        headers TEXT NOT NULL,
        payload BLOB NOT NULL,
        appended_at INTEGER NOT NULL,
        PRIMARY KEY (topic, partition, offset)
    ) WITHOUT ROWID;
    CREATE TABLE stream_offsets (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        next_offset INTEGER NOT NULL,
        PRIMARY KEY (consumer_group, topic, partition)
    ) WITHOUT ROWID;
    CREATE TABLE queue_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        body TEXT NOT NULL,
        attributes TEXT NOT NULL,
        receive_count INTEGER NOT NULL DEFAULT 0,
        visible_at INTEGER NOT NULL,
        receipt TEXT,
        sent_at INTEGER NOT NULL
    );
    CREATE INDEX queue_messages_ready ON queue_messages (queue, visible_at, id);
    CREATE INDEX queue_messages_receipt ON queue_messages (receipt);",
    ),
    (
        2,
        "stream heads",
        // The next offset per partition, kept apart from the records so that pruning old
        // records never makes offsets start again (consumers would skip the new ones).
        "CREATE TABLE stream_heads (
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            next_offset INTEGER NOT NULL,
            PRIMARY KEY (topic, partition)
        ) WITHOUT ROWID;
        INSERT INTO stream_heads (topic, partition, next_offset)
            SELECT topic, partition, MAX(offset) + 1 FROM stream_records GROUP BY topic, partition;
        CREATE INDEX stream_records_age ON stream_records (appended_at);",
    ),
    (
        3,
        "consumer group members and partition leases",
        // A member is live while it renews its row; a partition is read only by the member
        // holding its unexpired lease.
        "CREATE TABLE stream_members (
            consumer_group TEXT NOT NULL,
            topic TEXT NOT NULL,
            member TEXT NOT NULL,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (consumer_group, topic, member)
        ) WITHOUT ROWID;
        CREATE TABLE stream_leases (
            consumer_group TEXT NOT NULL,
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            member TEXT NOT NULL,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (consumer_group, topic, partition)
        ) WITHOUT ROWID;",
    ),
];

/// How often a waiting consumer re-checks for records written by another process.
const CROSS_PROCESS_POLL: Duration = Duration::from_millis(25);

/// How often a member renews its row and leases, and sees members come and go (more often
/// when the session is shorter than four of these).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How soon a member tries again for partitions it should hold but another still does (it
/// gives them up at its own next heartbeat).
const HANDOVER_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Inner {
    db: Db,
    partitions: u32,
    visibility: Duration,
    max_receives: i64,
    session: Duration,
    appended: Notify,
}

/// Stream and queue on one SQLite database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub partitions: u32,
    pub visibility_timeout: Duration,
    pub max_receives: i64,
    /// How long a consumer group member and its partitions live without a heartbeat: a
    /// process that dies (SIGKILL) hands its partitions over this long after its last one.
    pub session_timeout: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            partitions: 1,
            visibility_timeout: Duration::from_secs(30),
            max_receives: 5,
            session_timeout: Duration::from_secs(10),
        }
    }
}

impl EmbeddedBus {
    pub async fn open(
        url: &str,
        sqlite: &SqliteSettings,
        options: EmbeddedOptions,
    ) -> Result<EmbeddedBus, BusError> {
        let db = Db::open(url, sqlite, STEPS).await?;
        Ok(EmbeddedBus {
            inner: Arc::new(Inner {
                db,
                partitions: options.partitions.max(1),
                visibility: options.visibility_timeout,
                max_receives: options.max_receives.max(1),
                session: options.session_timeout.max(Duration::from_millis(100)),
                appended: Notify::new(),
            }),
        })
    }

    pub async fn ping(&self) -> Result<(), BusError> {
        Ok(self.inner.db.ping().await?)
    }

    /// Drops stream records older than `retention` (consumer offsets are kept: a group
    /// behind the retention horizon resumes at the oldest record left). Returns how many.
    pub async fn prune(&self, retention: Duration) -> Result<usize, BusError> {
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2);
        self.inner
            .db
            .write(move |tx| {
                Ok::<_, BusError>(tx.execute(
                    "DELETE FROM stream_records WHERE appended_at < ?1",
                    [cutoff],
                )?)
            })
            .await
    }

    pub async fn close(&self) {
        self.inner.db.close().await;
    }

    /// Waits until `deadline` for an in-process append, or one poll interval for others.
    async fn wait_for_append(&self, deadline: Instant) {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let slice = (deadline - now).min(CROSS_PROCESS_POLL);
        let _ = tokio::time::timeout(slice, self.inner.appended.notified()).await;
    }
}

/// FNV-1a: a stable key → partition mapping (std's hasher is randomised per process).
fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions
}

fn encode_headers(headers: &Headers) -> Result<String, BusError> {
    serde_json::to_string(headers).map_err(|e| BusError::Malformed(e.to_string()))
}

fn decode_headers(text: &str) -> Result<Headers, BusError> {
    serde_json::from_str(text).map_err(|e| BusError::Malformed(e.to_string()))
}

#[async_trait]
impl Stream for EmbeddedBus {
    async fn publish(&self, topic: &str, records: &[Record]) -> Result<(), BusError> {
        if records.is_empty() {
            return Ok(());
        }
        let rows: Vec<(u32, Record, String)> = records
            .iter()
            .map(|r| {
                Ok((
                    partition_for(&r.key, self.inner.partitions),
                    r.clone(),
                    encode_headers(&r.headers)?,
                ))
            })
            .collect::<Result<_, BusError>>()?;
        let topic = topic.to_owned();
        self.inner
            .db
            .write(move |tx| {
                let now = now_ms();
                let mut next: HashMap<u32, i64> = HashMap::new();
                let mut head = tx.prepare_cached(
                    "SELECT COALESCE((SELECT next_offset FROM stream_heads WHERE topic = ?1 AND partition = ?2), 0)",
                )?;
                let mut advance = tx.prepare_cached(
                    "INSERT INTO stream_heads (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                     ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                )?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO stream_records (topic, partition, offset, key, headers, payload, appended_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for (partition, record, headers) in &rows {
                    let offset = match next.get(partition) {
                        Some(o) => *o,
                        None => head.query_row(params![topic, partition], |r| r.get(0))?,
                    };
                    insert.execute(params![topic, partition, offset, record.key, headers, record.payload, now])?;
                    next.insert(*partition, offset + 1);
                }
                for (partition, next_offset) in &next {
                    advance.execute(params![topic, partition, next_offset])?;
                }
                Ok::<_, BusError>(())
            })
            .await?;
        self.inner.appended.notify_waiters();
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Box<dyn StreamConsumer>, BusError> {
        let membership = Membership {
            group: group.to_owned(),
            topic: topic.to_owned(),
            member: uuid::Uuid::now_v7().to_string(),
            partitions: self.inner.partitions,
            session: self.inner.session,
        };
        // Joining at once lets the members already there make room at their next heartbeat.
        let join = membership.clone();
        self.inner
            .db
            .write(move |tx| Ok::<_, BusError>(join.renew_member(tx, now_ms())?))
            .await?;
        Ok(Box::new(EmbeddedConsumer {
            bus: self.clone(),
            membership,
            positions: HashMap::new(),
            next_heartbeat: Instant::now(),
            delivered: metrics::counter!(
                "stream_records_delivered_total",
                "topic" => topic.to_owned(),
                "group" => group.to_owned()
            ),
        }))
    }
}

/// One member of a consumer group on one topic. Written here because SQLite has no group
/// coordinator: partition `p` belongs to the `p mod n`-th of the `n` live members (ordered by
/// id), and a member reads it only once it holds the partition's lease, which the previous
/// holder gives up at its next heartbeat (after committing what it read) or loses when it
/// stops renewing. So one record goes to one member at a time; a member that dies without
/// committing leaves its records to the next holder (at least once, as with Kafka).
#[derive(Debug, Clone)]
struct Membership {
    group: String,
    topic: String,
    member: String,
    partitions: u32,
    session: Duration,
}

impl Membership {
    fn renew_member(&self, tx: &rusqlite::Transaction<'_>, now: i64) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT INTO stream_members (consumer_group, topic, member, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (consumer_group, topic, member) DO UPDATE SET expires_at = excluded.expires_at",
        )?
        .execute(params![self.group, self.topic, self.member, now + millis(self.session)])?;
        Ok(())
    }

    /// Renews this member, forgets the dead ones, gives up the partitions that are no longer
    /// its share and takes those of its share that are free. Returns the partitions it holds
    /// (with their committed offsets) and whether it holds its whole share.
    fn rebalance(
        &self,
        tx: &rusqlite::Transaction<'_>,
        now: i64,
    ) -> rusqlite::Result<(Vec<(u32, i64)>, bool)> {
        self.renew_member(tx, now)?;
        tx.prepare_cached(
            "DELETE FROM stream_members WHERE consumer_group = ?1 AND topic = ?2 AND expires_at < ?3",
        )?
        .execute(params![self.group, self.topic, now])?;
        let live: Vec<String> = tx
            .prepare_cached(
                "SELECT member FROM stream_members WHERE consumer_group = ?1 AND topic = ?2 ORDER BY member",
            )?
            .query_map(params![self.group, self.topic], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let share: Vec<u32> = match live.iter().position(|m| *m == self.member) {
            Some(index) => (0..self.partitions)
                .filter(|p| *p as usize % live.len() == index)
                .collect(),
            None => Vec::new(),
        };
        let mut give_up = tx.prepare_cached(
            "DELETE FROM stream_leases
             WHERE consumer_group = ?1 AND topic = ?2 AND member = ?3 AND partition = ?4",
        )?;
        for partition in (0..self.partitions).filter(|p| !share.contains(p)) {
            give_up.execute(params![self.group, self.topic, self.member, partition])?;
        }
        let mut take = tx.prepare_cached(
            "INSERT INTO stream_leases (consumer_group, topic, partition, member, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE
                SET member = excluded.member, expires_at = excluded.expires_at
                WHERE stream_leases.member = excluded.member OR stream_leases.expires_at < ?6",
        )?;
        for partition in &share {
            take.execute(params![
                self.group,
                self.topic,
                partition,
                self.member,
                now + millis(self.session),
                now
            ])?;
        }
        let held: Vec<(u32, i64)> = tx
            .prepare_cached(
                "SELECT l.partition, COALESCE(o.next_offset, 0) FROM stream_leases l
                 LEFT JOIN stream_offsets o ON o.consumer_group = l.consumer_group
                    AND o.topic = l.topic AND o.partition = l.partition
                 WHERE l.consumer_group = ?1 AND l.topic = ?2 AND l.member = ?3",
            )?
            .query_map(params![self.group, self.topic, self.member], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        let whole = held.len() == share.len();
        Ok((held, whole))
    }

    /// Leaves the group: its partitions go to the others at their next heartbeat.
    fn leave(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let who = params![self.group, self.topic, self.member];
        tx.execute(
            "DELETE FROM stream_leases WHERE consumer_group = ?1 AND topic = ?2 AND member = ?3",
            who,
        )?;
        tx.execute(
            "DELETE FROM stream_members WHERE consumer_group = ?1 AND topic = ?2 AND member = ?3",
            who,
        )?;
        Ok(())
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

struct EmbeddedConsumer {
    bus: EmbeddedBus,
    membership: Membership,
    /// Next offset to read per partition this member holds (ahead of the committed one until
    /// `commit`); only held partitions are here.
    positions: HashMap<u32, i64>,
    next_heartbeat: Instant,
    delivered: metrics::Counter,
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        let membership = self.membership.clone();
        self.bus
            .inner
            .db
            .write_detached(move |tx| membership.leave(tx));
    }
}

impl EmbeddedConsumer {
    /// Takes part in the group when a heartbeat is due: keeps the positions of partitions it
    /// still holds, starts the new ones at their committed offsets, drops the lost ones.
    async fn heartbeat_if_due(&mut self) -> Result<(), BusError> {
        if Instant::now() < self.next_heartbeat {
            return Ok(());
        }
        let membership = self.membership.clone();
        let (held, whole) = self
            .bus
            .inner
            .db
            .write(move |tx| Ok::<_, BusError>(membership.rebalance(tx, now_ms())?))
            .await?;
        self.positions
            .retain(|p, _| held.iter().any(|(h, _)| h == p));
        for (partition, committed) in held {
            self.positions.entry(partition).or_insert(committed);
        }
        let heartbeat = HEARTBEAT.min(self.membership.session / 4);
        self.next_heartbeat = Instant::now() + if whole { heartbeat } else { HANDOVER_RETRY };
        Ok(())
    }

    async fn read_available(&mut self, max: usize) -> Result<Vec<Delivered>, BusError> {
        let mut from: Vec<(u32, i64)> = self.positions.iter().map(|(p, o)| (*p, *o)).collect();
        if from.is_empty() {
            return Ok(Vec::new());
        }
        from.sort_unstable();
        let topic = self.membership.topic.clone();
        let rows: Vec<(u32, i64, String, String, Vec<u8>)> = self
            .bus
            .inner
            .db
            .read(move |conn| {
                let mut q = conn.prepare_cached(
                    "SELECT offset, key, headers, payload FROM stream_records
                     WHERE topic = ?1 AND partition = ?2 AND offset >= ?3 ORDER BY offset LIMIT ?4",
                )?;
                let mut out = Vec::new();
                for (partition, offset) in from {
                    if out.len() >= max {
                        break;
                    }
                    let limit = i64::try_from(max - out.len()).unwrap_or(i64::MAX);
                    let rows = q.query_map(params![topic, partition, offset, limit], |r| {
                        Ok((partition, r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?;
                    for row in rows {
                        out.push(row?);
                    }
                }
                Ok::<_, BusError>(out)
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (partition, offset, key, headers, payload) in rows {
            self.positions.insert(partition, offset + 1);
            out.push(Delivered {
                topic: self.membership.topic.clone(),
                partition,
                offset,
                record: Record {
                    key,
                    headers: decode_headers(&headers)?,
                    payload,
                },
            });
        }
        self.delivered.increment(out.len() as u64);
        Ok(out)
    }
}

#[async_trait]
impl StreamConsumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivered>, BusError> {
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before reading, so an append in between is not missed.
            let bus = self.bus.clone();
            let notified = bus.inner.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.heartbeat_if_due().await?;
            let batch = self.read_available(max.max(1)).await?;
            if !batch.is_empty() || Instant::now() >= deadline {
                return Ok(batch);
            }
            let slice = (deadline - Instant::now()).min(CROSS_PROCESS_POLL);
            let _ = tokio::time::timeout(slice, notified).await;
        }
    }

    async fn lag(&mut self) -> Result<Vec<(u32, i64)>, BusError> {
        let (group, topic) = (self.membership.group.clone(), self.membership.topic.clone());
        self.bus
            .inner
            .db
            .read(move |conn| {
                let mut q = conn.prepare_cached(
                    "SELECT h.partition, h.next_offset - COALESCE(o.next_offset, 0)
                     FROM stream_heads h LEFT JOIN stream_offsets o
                       ON o.consumer_group = ?1 AND o.topic = h.topic AND o.partition = h.partition
                     WHERE h.topic = ?2 ORDER BY h.partition",
                )?;
                let rows = q.query_map(params![group, topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok::<_, BusError>(rows.collect::<Result<Vec<(u32, i64)>, _>>()?)
            })
            .await
            // The partitions this member does not hold are another member's to report: 0 here,
            // so the gauges' sum over a group's replicas is the group's lag, and a partition
            // handed over does not leave a stale figure behind.
            .map(|lags| {
                lags.into_iter()
                    .map(|(p, lag)| {
                        (
                            p,
                            if self.positions.contains_key(&p) {
                                lag
                            } else {
                                0
                            },
                        )
                    })
                    .collect()
            })
    }

    async fn commit(&mut self, delivered: &[Delivered]) -> Result<(), BusError> {
        let upto: Vec<(u32, i64)> = crate::commit_points(delivered)
            .into_iter()
            .map(|((_, partition), next)| (partition, next))
            .collect();
        if upto.is_empty() {
            return Ok(());
        }
        let (group, topic) = (self.membership.group.clone(), self.membership.topic.clone());
        self.bus
            .inner
            .db
            .write(move |tx| {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO stream_offsets (consumer_group, topic, partition, next_offset) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (consumer_group, topic, partition)
                     DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
                )?;
                for (partition, next) in upto {
                    upsert.execute(params![group, topic, partition, next])?;
                }
                Ok::<_, BusError>(())
            })
            .await
    }
}

#[async_trait]
impl Queue for EmbeddedBus {
    async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let rows: Vec<(OutgoingMessage, String)> = messages
            .iter()
            .map(|m| Ok((m.clone(), encode_headers(&m.attributes)?)))
            .collect::<Result<_, BusError>>()?;
        let queue = queue.to_owned();
        self.inner
            .db
            .write(move |tx| {
                let now = now_ms();
                let mut insert = tx.prepare_cached(
                    "INSERT INTO queue_messages (queue, message_id, body, attributes, visible_at, sent_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                )?;
                for (m, attributes) in &rows {
                    insert.execute(params![queue, m.id, m.body, attributes, now])?;
                }
                Ok::<_, BusError>(())
            })
            .await?;
        self.inner.appended.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, BusError> {
        let deadline = Instant::now() + wait;
        loop {
            let now = now_ms();
            // A cheap read first: an idle poll must not take the write lock.
            let q = queue.to_owned();
            let any: bool = self
                .inner
                .db
                .read(move |conn| {
                    let mut check = conn.prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE queue = ?1 AND visible_at <= ?2)",
                    )?;
                    Ok::<_, BusError>(check.query_row(params![q, now], |r| r.get(0))?)
                })
                .await?;
            if any {
                let batch = self.claim(queue, max.max(1), now).await?;
                if !batch.is_empty() {
                    return Ok(batch);
                }
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            self.wait_for_append(deadline).await;
        }
    }

    async fn delete(&self, queue: &str, receipt: &str) -> Result<(), BusError> {
        self.delete_batch(queue, &[receipt.to_owned()]).await
    }

    async fn delete_batch(&self, queue: &str, receipts: &[String]) -> Result<(), BusError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let (queue, receipts) = (queue.to_owned(), receipts.to_vec());
        self.inner
            .db
            .write(move |tx| {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM queue_messages WHERE queue = ?1 AND receipt = ?2",
                )?;
                for receipt in &receipts {
                    delete.execute(params![queue, receipt])?;
                }
                Ok::<_, BusError>(())
            })
            .await
    }

    async fn release(&self, queue: &str, receipt: &str, delay: Duration) -> Result<(), BusError> {
        let visible_at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        let (queue, receipt) = (queue.to_owned(), receipt.to_owned());
        self.inner
            .db
            .write(move |tx| {
                tx.execute(
                    "UPDATE queue_messages SET visible_at = ?1 WHERE queue = ?2 AND receipt = ?3",
                    params![visible_at, queue, receipt],
                )?;
                Ok::<_, BusError>(())
            })
            .await
    }

    async fn depth(&self, queue: &str) -> Result<i64, BusError> {
        let queue = queue.to_owned();
        self.inner
            .db
            .read(move |conn| {
                Ok::<_, BusError>(conn.query_row(
                    "SELECT COUNT(*) FROM queue_messages WHERE queue = ?1",
                    params![queue],
                    |r| r.get(0),
                )?)
            })
            .await
    }
}

impl EmbeddedBus {
    /// Moves exhausted messages to the dead-letter queue, then claims up to `max` visible ones.
    async fn claim(
        &self,
        queue: &str,
        max: usize,
        now: i64,
    ) -> Result<Vec<ReceivedMessage>, BusError> {
        let visible_at = now + i64::try_from(self.inner.visibility.as_millis()).unwrap_or(30_000);
        let batch = uuid::Uuid::new_v4().to_string();
        let max_receives = self.inner.max_receives;
        let q = queue.to_owned();
        let (dead, rows) = self
            .inner
            .db
            .write(move |tx| {
                let dead = tx.execute(
                    "UPDATE queue_messages SET queue = ?1, receive_count = 0, receipt = NULL
                     WHERE queue = ?2 AND visible_at <= ?3 AND receive_count >= ?4",
                    params![dead_letter_queue(&q), q, now, max_receives],
                )?;
                let mut claim = tx.prepare_cached(
                    "UPDATE queue_messages
                     SET receive_count = receive_count + 1, visible_at = ?1, receipt = ?2 || ':' || id
                     WHERE id IN (SELECT id FROM queue_messages WHERE queue = ?3 AND visible_at <= ?4 ORDER BY id LIMIT ?5)
                     RETURNING message_id, receipt, body, attributes, receive_count, sent_at, id",
                )?;
                let rows = claim
                    .query_map(params![visible_at, batch, q, now, i64::try_from(max).unwrap_or(10)], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, BusError>((dead, rows))
            })
            .await?;
        if dead > 0 {
            tracing::warn!(
                queue,
                moved = dead,
                "messages moved to the dead-letter queue"
            );
            metrics::counter!("queue_dead_lettered_total", "queue" => queue.to_owned())
                .increment(dead as u64);
        }
        let mut out = Vec::with_capacity(rows.len());
        for (id, receipt, body, attributes, receive_count, sent_at_ms, seq) in rows {
            out.push((
                seq,
                ReceivedMessage {
                    id,
                    receipt,
                    body,
                    attributes: decode_headers(&attributes)?,
                    receive_count,
                    sent_at_ms,
                },
            ));
        }
        // RETURNING gives no order guarantee; deliver in send order.
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, m)| m).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn bus(dir: &tempfile::TempDir, options: EmbeddedOptions) -> EmbeddedBus {
        let url = format!("sqlite://{}/bus.db", dir.path().display());
        EmbeddedBus::open(&url, &SqliteSettings::default(), options)
            .await
            .unwrap()
    }

    fn record(key: &str, n: u8) -> Record {
        Record {
            key: key.into(),
            headers: Headers::new(),
            payload: vec![n],
        }
    }

    #[tokio::test]
    async fn consumer_group_resumes_after_committed_offset() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus(
            &dir,
            EmbeddedOptions {
                partitions: 3,
                ..Default::default()
            },
        )
        .await;
        let records: Vec<Record> = (0..10).map(|n| record(&format!("k{n}"), n)).collect();
        bus.publish("t", &records).await.unwrap();

        let mut c = bus.subscribe("t", "g").await.unwrap();
        let first = c.poll(4, Duration::ZERO).await.unwrap();
        assert_eq!(first.len(), 4);
        c.commit(&first).await.unwrap();
        // Polled but never committed: a new member of the group sees it again.
        let uncommitted = c.poll(100, Duration::ZERO).await.unwrap();
        assert_eq!(uncommitted.len(), 6);
        drop(c);

        let mut again = bus.subscribe("t", "g").await.unwrap();
        let rest = again.poll(100, Duration::ZERO).await.unwrap();
        let mut seen: Vec<u8> = first
            .iter()
            .chain(rest.iter())
            .map(|d| d.record.payload[0])
            .collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..10).collect::<Vec<u8>>(),
            "every record exactly once across the commit"
        );

        // Another group starts from the beginning.
        let mut other = bus.subscribe("t", "other").await.unwrap();
        assert_eq!(other.poll(100, Duration::ZERO).await.unwrap().len(), 10);
    }

    /// Polls until records arrive or `patience` runs out: their payloads' bytes, and how long
    /// that took.
    async fn first_records(
        consumer: &mut Box<dyn StreamConsumer>,
        patience: Duration,
    ) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let mut taken = Vec::new();
        while taken.is_empty() && started.elapsed() < patience {
            taken = consumer.poll(10, Duration::from_millis(100)).await.unwrap();
        }
        let payloads = taken.iter().map(|d| d.record.payload[0]).collect();
        (payloads, started.elapsed())
    }

    /// A member that dies without leaving (a SIGKILLed replica: nothing runs at its end) keeps
    /// its partition until its session runs out; then another reads it from the committed
    /// offset.
    #[tokio::test]
    async fn a_dead_member_hands_its_partition_over_after_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions {
            session_timeout: Duration::from_millis(600),
            ..Default::default()
        };
        // Two handles on one file, as two processes.
        let (one, two) = (
            bus(&dir, options.clone()).await,
            bus(&dir, options.clone()).await,
        );
        one.publish("t", &[record("a", 1), record("b", 2)])
            .await
            .unwrap();
        let mut first = one.subscribe("t", "g").await.unwrap();
        let got = first.poll(1, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        first.commit(&got).await.unwrap();
        let uncommitted = first.poll(10, Duration::ZERO).await.unwrap();
        assert_eq!(uncommitted.len(), 1);
        std::mem::forget(first);

        let mut second = two.subscribe("t", "g").await.unwrap();
        let (taken, waited) = first_records(&mut second, Duration::from_secs(10)).await;
        assert!(
            waited >= Duration::from_millis(300),
            "not before the dead member's session ran out"
        );
        assert_eq!(
            taken,
            vec![2],
            "the dead member's uncommitted record, and not its committed one"
        );
    }

    /// With more members than partitions, the extra one waits: it reads nothing while the
    /// holder lives, and takes over at once when the holder leaves.
    #[tokio::test]
    async fn a_spare_member_reads_nothing_until_the_holder_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (
            bus(&dir, EmbeddedOptions::default()).await,
            bus(&dir, EmbeddedOptions::default()).await,
        );
        let mut holder = one.subscribe("t", "g").await.unwrap();
        let mut spare = two.subscribe("t", "g").await.unwrap();
        let (mut by_holder, mut by_spare) = (Vec::new(), Vec::new());
        // Whichever member the partition settles on, a record goes to one of them only.
        for n in 0..20 {
            one.publish("t", &[record("k", n)]).await.unwrap();
            for (consumer, seen) in [(&mut holder, &mut by_holder), (&mut spare, &mut by_spare)] {
                let got = consumer.poll(10, Duration::from_millis(100)).await.unwrap();
                consumer.commit(&got).await.unwrap();
                seen.extend(got.iter().map(|d| d.record.payload[0]));
            }
        }
        let mut all: Vec<u8> = by_holder.iter().chain(&by_spare).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..20).collect::<Vec<u8>>(),
            "each record once, none lost"
        );
        // Make `holder` the one that held the partition last, then let it leave.
        if by_spare.last() > by_holder.last() {
            std::mem::swap(&mut holder, &mut spare);
        }
        // One record not yet read: the group's lag, summed over its members as a dashboard
        // sums the replicas' gauges, counts it once.
        one.publish("t", &[record("k", 99)]).await.unwrap();
        let lag = |lags: Vec<(u32, i64)>| lags.iter().map(|(_, n)| n).sum::<i64>();
        assert_eq!(
            lag(holder.lag().await.unwrap()) + lag(spare.lag().await.unwrap()),
            1
        );
        let got = holder.poll(10, Duration::from_millis(100)).await.unwrap();
        holder.commit(&got).await.unwrap();
        drop(holder);
        one.publish("t", &[record("k", 20)]).await.unwrap();
        let (taken, _) = first_records(&mut spare, Duration::from_secs(5)).await;
        assert_eq!(
            taken,
            vec![20],
            "taken over well before a session (10 s) ran out"
        );
    }

    #[tokio::test]
    async fn retention_drops_old_records_and_consumers_carry_on() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus(&dir, EmbeddedOptions::default()).await;
        bus.publish("t", &[record("a", 1), record("b", 2)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(bus.prune(Duration::from_secs(3600)).await.unwrap(), 0);
        assert_eq!(bus.prune(Duration::from_millis(1)).await.unwrap(), 2);
        bus.publish("t", &[record("c", 3)]).await.unwrap();
        let mut c = bus.subscribe("t", "late").await.unwrap();
        let got = c.poll(10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].offset, 2, "offsets keep counting after a prune");
    }

    #[tokio::test]
    async fn one_key_keeps_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus(
            &dir,
            EmbeddedOptions {
                partitions: 4,
                ..Default::default()
            },
        )
        .await;
        for n in 0..5 {
            bus.publish("t", &[record("same", n)]).await.unwrap();
        }
        let mut c = bus.subscribe("t", "g").await.unwrap();
        let got: Vec<u8> = c
            .poll(10, Duration::ZERO)
            .await
            .unwrap()
            .iter()
            .map(|d| d.record.payload[0])
            .collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn poll_wakes_on_publish() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus(&dir, EmbeddedOptions::default()).await;
        let mut c = bus.subscribe("t", "g").await.unwrap();
        let publisher = bus.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            publisher.publish("t", &[record("k", 7)]).await.unwrap();
        });
        let got = c.poll(10, Duration::from_secs(10)).await.unwrap();
        assert_eq!(got.len(), 1);
    }

    fn message(id: &str) -> OutgoingMessage {
        OutgoingMessage {
            id: id.into(),
            body: format!("body-{id}"),
            attributes: Headers::new(),
        }
    }

    #[tokio::test]
    async fn queue_hides_received_messages_until_released_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus(
            &dir,
            EmbeddedOptions {
                visibility_timeout: Duration::from_millis(200),
                ..Default::default()
            },
        )
        .await;
        bus.send_batch("q", &[message("a"), message("b")])
            .await
            .unwrap();
        let got = bus.receive("q", 10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 2);
        assert!(
            bus.receive("q", 10, Duration::ZERO)
                .await
                .unwrap()
                .is_empty(),
            "in flight"
        );
        bus.delete("q", &got[0].receipt).await.unwrap();
        bus.release("q", &got[1].receipt, Duration::ZERO)
            .await
            .unwrap();
        let again = bus.receive("q", 10, Duration::ZERO).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, got[1].id);
        assert_eq!(again[0].receive_count, 2);
        // Not deleted: visible again once the visibility timeout passes.
        let later = bus.receive("q", 10, Duration::from_secs(5)).await.unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].receive_count, 3);
        assert_eq!(bus.depth("q").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn batch_delete_acknowledges_only_the_given_receipts() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus(&dir, EmbeddedOptions::default()).await;
        bus.send_batch("q", &[message("a"), message("b"), message("c")])
            .await
            .unwrap();
        bus.send_batch("other", &[message("z")]).await.unwrap();
        let got = bus.receive("q", 10, Duration::ZERO).await.unwrap();
        assert_eq!(
            got.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            vec!["a", "b", "c"]
        );
        bus.delete_batch("q", &[got[0].receipt.clone(), got[2].receipt.clone()])
            .await
            .unwrap();
        assert_eq!(bus.depth("q").await.unwrap(), 1);
        assert_eq!(bus.depth("other").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn exhausted_messages_go_to_the_dead_letter_queue() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus(
            &dir,
            EmbeddedOptions {
                max_receives: 2,
                ..Default::default()
            },
        )
        .await;
        bus.send_batch("q", &[message("poison")]).await.unwrap();
        for _ in 0..2 {
            let got = bus.receive("q", 1, Duration::ZERO).await.unwrap();
            assert_eq!(got.len(), 1);
            bus.release("q", &got[0].receipt, Duration::ZERO)
                .await
                .unwrap();
        }
        assert!(
            bus.receive("q", 1, Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
        let dead = bus.receive("q-dlq", 1, Duration::ZERO).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, "poison");
    }
}
