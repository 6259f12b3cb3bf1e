//! The embedded backends: a durable stream (topic log with consumer groups and committed
//! offsets) and a queue (visibility timeout, receive count, dead-lettering), both in one
//! SQLite file, so `mercato up` needs nothing installed. Several processes may share the
//! file (`mercato serve` on one host); waiting consumers are woken at once in-process and
//! by a short poll across processes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kit::config::SqliteSettings;
use kit::db::{Db, Step, now_ms};
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{
    BusError, Delivered, Headers, OutgoingMessage, Queue, ReceivedMessage, Record, Stream,
    StreamConsumer, dead_letter_queue,
};

static STEPS: &[Step] = &[(
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
)];

/// Rows per multi-row statement: well under SQLite's bound-parameter limit.
const ROWS_PER_STATEMENT: usize = 256;

/// How often a waiting consumer re-checks for records written by another process.
const CROSS_PROCESS_POLL: Duration = Duration::from_millis(25);

#[derive(Debug)]
struct Inner {
    db: Db,
    partitions: u32,
    visibility: Duration,
    max_receives: i64,
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
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            partitions: 1,
            visibility_timeout: Duration::from_secs(30),
            max_receives: 5,
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
                appended: Notify::new(),
            }),
        })
    }

    pub async fn ping(&self) -> Result<(), BusError> {
        Ok(self.inner.db.ping().await?)
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
        let now = now_ms();
        let encoded: Vec<(u32, &Record, String)> = records
            .iter()
            .map(|r| {
                Ok((
                    partition_for(&r.key, self.inner.partitions),
                    r,
                    encode_headers(&r.headers)?,
                ))
            })
            .collect::<Result<_, BusError>>()?;
        let mut tx = self.inner.db.begin().await?;
        // Next offset per partition touched, read once per batch.
        let mut next: HashMap<u32, i64> = HashMap::new();
        for (partition, _, _) in &encoded {
            if !next.contains_key(partition) {
                let offset = sqlx::query_scalar::<_, i64>(
                    "SELECT COALESCE(MAX(offset) + 1, 0) FROM stream_records WHERE topic = ? AND partition = ?",
                )
                .bind(topic)
                .bind(partition)
                .fetch_one(&mut *tx)
                .await?;
                next.insert(*partition, offset);
            }
        }
        for chunk in encoded.chunks(ROWS_PER_STATEMENT) {
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO stream_records (topic, partition, offset, key, headers, payload, appended_at) ",
            );
            insert.push_values(chunk, |mut row, (partition, record, headers)| {
                let offset = next.get(partition).copied().unwrap_or(0);
                next.insert(*partition, offset + 1);
                row.push_bind(topic)
                    .push_bind(*partition)
                    .push_bind(offset)
                    .push_bind(&record.key)
                    .push_bind(headers)
                    .push_bind(&record.payload)
                    .push_bind(now);
            });
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.inner.appended.notify_waiters();
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Box<dyn StreamConsumer>, BusError> {
        let rows = sqlx::query(
            "SELECT partition, next_offset FROM stream_offsets WHERE consumer_group = ? AND topic = ?",
        )
        .bind(group)
        .bind(topic)
        .fetch_all(&self.inner.db.read)
        .await?;
        let mut positions: HashMap<u32, i64> = (0..self.inner.partitions).map(|p| (p, 0)).collect();
        for row in rows {
            positions.insert(row.try_get("partition")?, row.try_get("next_offset")?);
        }
        Ok(Box::new(EmbeddedConsumer {
            bus: self.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            positions,
        }))
    }
}

struct EmbeddedConsumer {
    bus: EmbeddedBus,
    topic: String,
    group: String,
    /// Next offset to read per partition (ahead of the committed one until `commit`).
    positions: HashMap<u32, i64>,
}

impl EmbeddedConsumer {
    async fn read_available(&mut self, max: usize) -> Result<Vec<Delivered>, BusError> {
        let mut out = Vec::new();
        let mut partitions: Vec<u32> = self.positions.keys().copied().collect();
        partitions.sort_unstable();
        for partition in partitions {
            if out.len() >= max {
                break;
            }
            let from = self.positions.get(&partition).copied().unwrap_or(0);
            let rows = sqlx::query(
                "SELECT offset, key, headers, payload FROM stream_records
                 WHERE topic = ? AND partition = ? AND offset >= ? ORDER BY offset LIMIT ?",
            )
            .bind(&self.topic)
            .bind(partition)
            .bind(from)
            .bind(i64::try_from(max - out.len()).unwrap_or(i64::MAX))
            .fetch_all(&self.bus.inner.db.read)
            .await?;
            for row in rows {
                let offset: i64 = row.try_get("offset")?;
                let headers: String = row.try_get("headers")?;
                out.push(Delivered {
                    topic: self.topic.clone(),
                    partition,
                    offset,
                    record: Record {
                        key: row.try_get("key")?,
                        headers: decode_headers(&headers)?,
                        payload: row.try_get("payload")?,
                    },
                });
                self.positions.insert(partition, offset + 1);
            }
        }
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
            let batch = self.read_available(max.max(1)).await?;
            if !batch.is_empty() || Instant::now() >= deadline {
                return Ok(batch);
            }
            let slice = (deadline - Instant::now()).min(CROSS_PROCESS_POLL);
            let _ = tokio::time::timeout(slice, notified).await;
        }
    }

    async fn commit(&mut self, delivered: &[Delivered]) -> Result<(), BusError> {
        let mut upto: HashMap<u32, i64> = HashMap::new();
        for d in delivered {
            let e = upto.entry(d.partition).or_insert(d.offset + 1);
            *e = (*e).max(d.offset + 1);
        }
        if upto.is_empty() {
            return Ok(());
        }
        let mut tx = self.bus.inner.db.begin().await?;
        for (partition, next) in upto {
            sqlx::query(
                "INSERT INTO stream_offsets (consumer_group, topic, partition, next_offset) VALUES (?, ?, ?, ?)
                 ON CONFLICT (consumer_group, topic, partition)
                 DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
            )
            .bind(&self.group)
            .bind(&self.topic)
            .bind(partition)
            .bind(next)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl Queue for EmbeddedBus {
    async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let encoded: Vec<(&OutgoingMessage, String)> = messages
            .iter()
            .map(|m| Ok((m, encode_headers(&m.attributes)?)))
            .collect::<Result<_, BusError>>()?;
        let mut tx = self.inner.db.begin().await?;
        for chunk in encoded.chunks(ROWS_PER_STATEMENT) {
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO queue_messages (queue, message_id, body, attributes, visible_at, sent_at) ",
            );
            insert.push_values(chunk, |mut row, (m, attributes)| {
                row.push_bind(queue)
                    .push_bind(&m.id)
                    .push_bind(&m.body)
                    .push_bind(attributes)
                    .push_bind(now)
                    .push_bind(now);
            });
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
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
            let any: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM queue_messages WHERE queue = ? AND visible_at <= ? LIMIT 1",
            )
            .bind(queue)
            .bind(now)
            .fetch_optional(&self.inner.db.read)
            .await?;
            if any.is_some() {
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
        sqlx::query("DELETE FROM queue_messages WHERE queue = ? AND receipt = ?")
            .bind(queue)
            .bind(receipt)
            .execute(self.inner.db.writer())
            .await?;
        Ok(())
    }

    async fn delete_batch(&self, queue: &str, receipts: &[String]) -> Result<(), BusError> {
        for chunk in receipts.chunks(ROWS_PER_STATEMENT) {
            let mut delete =
                QueryBuilder::<Sqlite>::new("DELETE FROM queue_messages WHERE queue = ");
            delete.push_bind(queue).push(" AND receipt IN (");
            let mut list = delete.separated(", ");
            for receipt in chunk {
                list.push_bind(receipt);
            }
            delete.push(")");
            delete.build().execute(self.inner.db.writer()).await?;
        }
        Ok(())
    }

    async fn release(&self, queue: &str, receipt: &str, delay: Duration) -> Result<(), BusError> {
        let visible_at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        sqlx::query("UPDATE queue_messages SET visible_at = ? WHERE queue = ? AND receipt = ?")
            .bind(visible_at)
            .bind(queue)
            .bind(receipt)
            .execute(self.inner.db.writer())
            .await?;
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<i64, BusError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM queue_messages WHERE queue = ?")
                .bind(queue)
                .fetch_one(&self.inner.db.read)
                .await?,
        )
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
        let mut tx = self.inner.db.begin().await?;
        let dead = sqlx::query(
            "UPDATE queue_messages SET queue = ?, receive_count = 0, receipt = NULL
             WHERE queue = ? AND visible_at <= ? AND receive_count >= ?",
        )
        .bind(dead_letter_queue(queue))
        .bind(queue)
        .bind(now)
        .bind(self.inner.max_receives)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let rows = sqlx::query(
            "UPDATE queue_messages
             SET receive_count = receive_count + 1, visible_at = ?, receipt = ? || ':' || id
             WHERE id IN (SELECT id FROM queue_messages WHERE queue = ? AND visible_at <= ? ORDER BY id LIMIT ?)
             RETURNING message_id, receipt, body, attributes, receive_count, sent_at",
        )
        .bind(visible_at)
        .bind(&batch)
        .bind(queue)
        .bind(now)
        .bind(i64::try_from(max).unwrap_or(10))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        if dead > 0 {
            tracing::warn!(
                queue,
                moved = dead,
                "messages moved to the dead-letter queue"
            );
            metrics::counter!("queue_dead_lettered_total", "queue" => queue.to_owned())
                .increment(dead);
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let attributes: String = row.try_get("attributes")?;
            out.push(ReceivedMessage {
                id: row.try_get("message_id")?,
                receipt: row.try_get("receipt")?,
                body: row.try_get("body")?,
                attributes: decode_headers(&attributes)?,
                receive_count: row.try_get("receive_count")?,
                sent_at_ms: row.try_get("sent_at")?,
            });
        }
        out.sort_by_key(|m| m.sent_at_ms);
        Ok(out)
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
