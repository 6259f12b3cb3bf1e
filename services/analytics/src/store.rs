//! Window state in SQLite, applied exactly once per event id. Each partition's progress in
//! event time and the watermark it yields are stored in the same transaction as the window
//! figures and the processed event ids, so a restart resumes exactly where the last committed
//! batch left off.

use bus::event::{OrderEvent, types};
use chrono::{DateTime, Utc};
use kit::db::{Db, DbError, Step, now_ms};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

use rusqlite::{Connection, OptionalExtension as _, params};

use crate::engine::{
    Lateness, PartialWindow, PartitionProgress, ProductSales, WindowReport, Windows, add_count,
    average, is_final, low_water_mark,
};
use crate::revenue::Revenue;
use crate::sketch::UserSketch;

pub static MIGRATIONS: &[Step] = &[
    (
        1,
        "windows",
        "CREATE TABLE processed_events (
        event_id TEXT PRIMARY KEY,
        processed_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE windows (
        window_start INTEGER PRIMARY KEY,
        window_end INTEGER NOT NULL,
        order_count INTEGER NOT NULL DEFAULT 0,
        revenue_cents INTEGER NOT NULL DEFAULT 0,
        items_sold INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE window_users (
        window_start INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        PRIMARY KEY (window_start, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE window_products (
        window_start INTEGER NOT NULL,
        product_id TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        revenue_cents INTEGER NOT NULL,
        PRIMARY KEY (window_start, product_id)
    ) WITHOUT ROWID;
    CREATE TABLE window_event_types (
        window_start INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (window_start, event_type)
    ) WITHOUT ROWID;
    CREATE TABLE users_seen (user_id TEXT PRIMARY KEY) WITHOUT ROWID;",
    ),
    (
        2,
        "watermark, lateness, sketches, emission",
        "ALTER TABLE windows ADD COLUMN late_events INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE windows ADD COLUMN users_sketch BLOB;
    -- set once the final window has been handed to the results sinks
    ALTER TABLE windows ADD COLUMN emitted_at INTEGER;
    CREATE INDEX windows_unemitted ON windows (window_end) WHERE emitted_at IS NULL;
    CREATE TABLE engine_state (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;",
    ),
    (
        3,
        "per-partition watermark",
        "CREATE TABLE partition_progress (
        partition INTEGER PRIMARY KEY,
        max_event_ms INTEGER NOT NULL,
        seen_at_ms INTEGER NOT NULL
    );",
    ),
    (
        4,
        "revenue as 128-bit cents",
        // SQLite integers are 64-bit: two orders near the largest amount overflowed into a
        // REAL that no report could read. Revenue is now decimal text of 128-bit cents,
        // summed in Rust (`crate::revenue`). Integer rows convert exactly; a REAL (a sum the
        // old code already broke) keeps its nearest integer, the only figure left of it (a
        // replay from the stream recomputes it exactly).
        // `windows` is rebuilt rather than given a new column: SQLite appends added columns,
        // which would put revenue behind the 4 KiB users sketch, on an overflow page that
        // every summary and batch would then read.
        "CREATE TABLE windows_128 (
        window_start INTEGER PRIMARY KEY,
        window_end INTEGER NOT NULL,
        order_count INTEGER NOT NULL DEFAULT 0,
        revenue_cents TEXT NOT NULL DEFAULT '0',
        items_sold INTEGER NOT NULL DEFAULT 0,
        late_events INTEGER NOT NULL DEFAULT 0,
        users_sketch BLOB,
        emitted_at INTEGER
    );
    INSERT INTO windows_128 (window_start, window_end, order_count, revenue_cents, items_sold,
                             late_events, users_sketch, emitted_at)
        SELECT window_start, window_end, order_count,
               CASE typeof(revenue_cents) WHEN 'integer' THEN CAST(revenue_cents AS TEXT)
                                          ELSE printf('%.0f', revenue_cents) END,
               items_sold, late_events, users_sketch, emitted_at
        FROM windows;
    DROP TABLE windows;
    ALTER TABLE windows_128 RENAME TO windows;
    CREATE INDEX windows_unemitted ON windows (window_end) WHERE emitted_at IS NULL;
    ALTER TABLE window_products ADD COLUMN revenue TEXT NOT NULL DEFAULT '0';
    UPDATE window_products SET revenue = CASE typeof(revenue_cents)
        WHEN 'integer' THEN CAST(revenue_cents AS TEXT) ELSE printf('%.0f', revenue_cents) END;
    ALTER TABLE window_products DROP COLUMN revenue_cents;
    ALTER TABLE window_products RENAME COLUMN revenue TO revenue_cents;",
    ),
];

/// engine_state row where stores before migration 3 kept the latest event time applied;
/// [`AnalyticsStore::open`] turns it into a watermark.
const LEGACY_MAX_EVENT_TIME: &str = "max_event_time_ms";
/// engine_state row holding the watermark (ms since epoch); it only moves forward.
const WATERMARK: &str = "watermark_ms";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("stored value is corrupt")]
    Corrupt,
    #[error("stored revenue `{0}` is not a decimal number of cents")]
    CorruptRevenue(String),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Totals since the first event.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub order_count: i64,
    pub unique_users: i64,
    pub total_revenue: Revenue,
    pub avg_order_value: Revenue,
    pub items_sold: i64,
    pub events_processed: i64,
    /// Events that arrived after their window was final (not in the figures).
    pub late_events: i64,
    pub first_window_start: Option<DateTime<Utc>>,
    pub last_window_end: Option<DateTime<Utc>>,
    /// Windows ending at or before this are final; absent before the first event.
    pub watermark: Option<DateTime<Utc>>,
}

/// What one [`AnalyticsStore::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events not seen before (late ones included).
    pub fresh: usize,
    /// Of those, the ones whose window was already final.
    pub late: usize,
}

/// What a batch adds to one window.
#[derive(Debug)]
struct WindowDelta {
    end: i64,
    orders: i64,
    revenue: Revenue,
    items: i64,
    late: i64,
}

impl WindowDelta {
    fn new(end: i64) -> WindowDelta {
        WindowDelta {
            end,
            orders: 0,
            revenue: Revenue::ZERO,
            items: 0,
            late: 0,
        }
    }
}

/// What a batch of new events adds, aggregated per window before touching the database.
/// Sums are taken here, in Rust, and written as totals: SQL arithmetic on 64-bit integers
/// is what let a large order break a window.
#[derive(Debug, Default)]
struct Delta {
    windows: BTreeMap<i64, WindowDelta>,
    event_types: BTreeMap<(i64, String), i64>,
    window_users: BTreeMap<i64, BTreeSet<Uuid>>,
    users: BTreeSet<String>,
    /// (window start, product) → (quantity, revenue)
    products: BTreeMap<(i64, String), (i64, Revenue)>,
}

/// Revenue as the store keeps it: decimal text of cents (SQLite has no 128-bit integer).
fn revenue_text(r: Revenue) -> String {
    r.cents().to_string()
}

fn revenue_of(text: &str) -> Result<Revenue, StoreError> {
    text.parse::<i128>()
        .map(Revenue::from_cents)
        .map_err(|_| StoreError::CorruptRevenue(text.to_owned()))
}

impl Delta {
    fn window(&mut self, windows: Windows, e: &OrderEvent) -> (i64, &mut WindowDelta) {
        let start = windows.start_of(e.created_at);
        let window = self
            .windows
            .entry(start)
            .or_insert_with(|| WindowDelta::new(start + windows.size_ms()));
        (start, window)
    }

    fn late(&mut self, windows: Windows, e: &OrderEvent) {
        let (_, window) = self.window(windows, e);
        window.late = add_count(window.late, 1);
    }

    fn add(&mut self, windows: Windows, e: &OrderEvent) {
        let (start, window) = self.window(windows, e);
        let is_order = e.event_type == types::ORDER_CREATED;
        if is_order {
            window.orders = add_count(window.orders, 1);
            window.revenue = window.revenue.plus(e.total_amount.into());
            window.items = add_count(window.items, e.items_count);
        }
        let kind = self
            .event_types
            .entry((start, e.event_type.clone()))
            .or_insert(0);
        *kind = add_count(*kind, 1);
        if !is_order {
            return;
        }
        self.window_users
            .entry(start)
            .or_default()
            .insert(e.user_id);
        self.users.insert(e.user_id.to_string());
        for item in &e.items {
            let p = self
                .products
                .entry((start, item.product_id.to_string()))
                .or_insert((0, Revenue::ZERO));
            p.0 = add_count(p.0, item.quantity);
            p.1 = p.1.plus(Revenue::of_line(item.unit_price, item.quantity));
        }
    }

    fn write(&self, conn: &Connection) -> Result<(), StoreError> {
        let mut read_window = conn.prepare_cached(
            "SELECT order_count, revenue_cents, items_sold, late_events FROM windows WHERE window_start = ?1",
        )?;
        let mut windows = conn.prepare_cached(
            "INSERT INTO windows (window_start, window_end, order_count, revenue_cents, items_sold, late_events)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (window_start) DO UPDATE SET order_count = excluded.order_count,
                revenue_cents = excluded.revenue_cents, items_sold = excluded.items_sold,
                late_events = excluded.late_events",
        )?;
        for (start, d) in &self.windows {
            let stored = read_window
                .query_row([start], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .optional()?;
            let (orders, revenue, items, late) = match stored {
                Some((orders, revenue, items, late)) => {
                    (orders, revenue_of(&revenue)?, items, late)
                }
                None => (0, Revenue::ZERO, 0, 0),
            };
            windows.execute(params![
                start,
                d.end,
                add_count(orders, d.orders),
                revenue_text(revenue.plus(d.revenue)),
                add_count(items, d.items),
                add_count(late, d.late)
            ])?;
        }
        let mut types = conn.prepare_cached(
            "INSERT INTO window_event_types (window_start, event_type, count) VALUES (?1, ?2, ?3)
             ON CONFLICT (window_start, event_type) DO UPDATE SET count = count + excluded.count",
        )?;
        for ((start, kind), n) in &self.event_types {
            types.execute(params![start, kind, n])?;
        }
        let mut window_users = conn.prepare_cached(
            "INSERT OR IGNORE INTO window_users (window_start, user_id) VALUES (?1, ?2)",
        )?;
        let mut read_sketch =
            conn.prepare_cached("SELECT users_sketch FROM windows WHERE window_start = ?1")?;
        let mut write_sketch =
            conn.prepare_cached("UPDATE windows SET users_sketch = ?2 WHERE window_start = ?1")?;
        for (start, users) in &self.window_users {
            let stored: Option<Vec<u8>> = read_sketch.query_row([start], |r| r.get(0))?;
            let mut sketch = stored
                .as_deref()
                .and_then(UserSketch::from_bytes)
                .unwrap_or_default();
            for user in users {
                window_users.execute(params![start, user.to_string()])?;
                sketch.insert(*user);
            }
            write_sketch.execute(params![start, sketch.as_bytes()])?;
        }
        let mut users =
            conn.prepare_cached("INSERT OR IGNORE INTO users_seen (user_id) VALUES (?1)")?;
        for user in &self.users {
            users.execute([user])?;
        }
        let mut read_product = conn.prepare_cached(
            "SELECT quantity, revenue_cents FROM window_products WHERE window_start = ?1 AND product_id = ?2",
        )?;
        let mut products = conn.prepare_cached(
            "INSERT INTO window_products (window_start, product_id, quantity, revenue_cents) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (window_start, product_id) DO UPDATE SET quantity = excluded.quantity,
                revenue_cents = excluded.revenue_cents",
        )?;
        for ((start, product), (quantity, revenue)) in &self.products {
            let stored = read_product
                .query_row(params![start, product], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .optional()?;
            let (had, earned) = match stored {
                Some((had, earned)) => (had, revenue_of(&earned)?),
                None => (0, Revenue::ZERO),
            };
            products.execute(params![
                start,
                product,
                add_count(had, *quantity),
                revenue_text(earned.plus(*revenue))
            ])?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct AnalyticsStore {
    db: Db,
    windows: Windows,
    lateness: Lateness,
}

fn ts(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or(StoreError::Corrupt)
}

impl AnalyticsStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
        windows: Windows,
        lateness: Lateness,
    ) -> Result<Self, DbError> {
        let db = Db::open(url, sqlite, MIGRATIONS).await?;
        db.write(move |tx| -> Result<(), DbError> {
            // A store from before migration 3 kept the latest event time, not the watermark.
            if state(tx, WATERMARK)?.is_none()
                && let Some(w) = lateness.watermark(state(tx, LEGACY_MAX_EVENT_TIME)?)
            {
                set_state(tx, WATERMARK, w)?;
            }
            tx.execute(
                "DELETE FROM engine_state WHERE name = ?1",
                [LEGACY_MAX_EVENT_TIME],
            )?;
            // A restart gives every partition read before a fresh idle allowance: after
            // downtime the backlog of one may arrive before the others', which must still
            // hold the watermark back.
            tx.execute("UPDATE partition_progress SET seen_at_ms = ?1", [now_ms()])?;
            Ok(())
        })
        .await?;
        Ok(AnalyticsStore {
            db,
            windows,
            lateness,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn windows(&self) -> Windows {
        self.windows
    }

    /// Applies a batch in one transaction; events already applied (now or in an earlier
    /// batch) are skipped. The batch is aggregated in memory first, so the number of writes
    /// depends on the windows touched, not on the number of events.
    ///
    /// The watermark moves per batch, as in Spark's micro-batches: an event is late when its
    /// window was final before the batch began, so the outcome does not depend on the order
    /// of events inside a batch. All events count as read from one partition; a consumer of
    /// a partitioned stream uses [`Self::apply_from`].
    pub async fn apply(&self, events: &[OrderEvent]) -> Result<Applied, StoreError> {
        self.apply_from(events.iter().map(|e| (0, e.clone())).collect())
            .await
    }

    /// [`Self::apply`] for events tagged with the stream partition they were read from: the
    /// watermark then follows the slowest active partition ([`low_water_mark`]).
    pub async fn apply_from(&self, events: Vec<(u32, OrderEvent)>) -> Result<Applied, StoreError> {
        if events.is_empty() {
            return Ok(Applied::default());
        }
        let (windows, lateness) = (self.windows, self.lateness);
        self.db
            .write(move |tx| {
                let now = now_ms();
                let watermark = state(tx, WATERMARK)?;
                let mut mark =
                    tx.prepare_cached("INSERT OR IGNORE INTO processed_events (event_id, processed_at) VALUES (?1, ?2)")?;
                let mut delta = Delta::default();
                let mut applied = Applied::default();
                // Repeats count too: they are read positions all the same.
                let mut partition_max: BTreeMap<u32, i64> = BTreeMap::new();
                for (partition, e) in &events {
                    let at = e.created_at.timestamp_millis();
                    let seen = partition_max.entry(*partition).or_insert(at);
                    *seen = (*seen).max(at);
                    // Also drops a repeat of the same id inside this batch.
                    if mark.execute(params![e.event_id.to_string(), now])? != 1 {
                        continue;
                    }
                    applied.fresh += 1;
                    let end = windows.start_of(e.created_at) + windows.size_ms();
                    if is_final(end, watermark) {
                        applied.late += 1;
                        delta.late(windows, e);
                    } else {
                        delta.add(windows, e);
                    }
                }
                delta.write(tx)?;
                let mut progress = tx.prepare_cached(
                    "INSERT INTO partition_progress (partition, max_event_ms, seen_at_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (partition) DO UPDATE SET
                         max_event_ms = MAX(max_event_ms, excluded.max_event_ms),
                         seen_at_ms = excluded.seen_at_ms",
                )?;
                for (partition, max) in &partition_max {
                    progress.execute(params![partition, max, now])?;
                }
                // Forward only: `None` sorts before every watermark.
                let advanced = lateness.watermark(low_water_mark(partition_progress(tx)?, now));
                if let Some(next) = advanced.filter(|_| advanced > watermark) {
                    set_state(tx, WATERMARK, next)?;
                }
                Ok(applied)
            })
            .await
    }

    /// Windows ending at or before this are final; `None` before the first event.
    pub async fn watermark(&self) -> Result<Option<i64>, StoreError> {
        self.db.read(|conn| Ok(state(conn, WATERMARK)?)).await
    }

    /// Final windows not yet handed to the results sinks, oldest first, as mergeable partials.
    pub async fn unemitted_final(&self, limit: u32) -> Result<Vec<PartialWindow>, StoreError> {
        let Some(watermark) = self.watermark().await? else {
            return Ok(Vec::new());
        };
        self.db
            .read(move |conn| {
                let starts = conn
                    .prepare_cached(
                        "SELECT window_start FROM windows WHERE emitted_at IS NULL AND window_end <= ?1
                         ORDER BY window_start LIMIT ?2",
                    )?
                    .query_map(params![watermark, limit], |r| r.get::<_, i64>(0))?
                    .collect::<Result<BTreeSet<_>, _>>()?;
                let (Some(first), Some(last)) = (starts.first(), starts.last()) else {
                    return Ok(Vec::new());
                };
                // One read over the span; windows in it that are open or already out drop away.
                let mut out = read_partials(conn, *first, last + 1, Buyers::Ids)?;
                out.retain(|(p, _)| starts.contains(&p.window_start.timestamp_millis()));
                Ok(out.into_iter().map(|(p, _)| p).collect())
            })
            .await
    }

    /// Records that the windows starting at `starts` reached every results sink.
    pub async fn mark_emitted(&self, starts: Vec<DateTime<Utc>>) -> Result<(), StoreError> {
        self.db
            .write(move |tx| {
                let now = now_ms();
                let mut mark = tx
                    .prepare_cached("UPDATE windows SET emitted_at = ?2 WHERE window_start = ?1")?;
                for start in &starts {
                    mark.execute(params![start.timestamp_millis(), now])?;
                }
                Ok(())
            })
            .await
    }

    /// Mergeable state of the windows starting in `[from, to)`, oldest first.
    pub async fn partials_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<PartialWindow>, StoreError> {
        let (from, to) = (self.windows.start_of(from), to.timestamp_millis());
        let partials = self
            .db
            .read(move |conn| read_partials(conn, from, to, Buyers::Ids))
            .await?;
        Ok(partials.into_iter().map(|(p, _)| p).collect())
    }

    /// Forgets processed event ids older than `age`: past the stream's retention nothing that
    /// old can be redelivered. Returns how many.
    pub async fn prune_processed(&self, age: std::time::Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2);
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "DELETE FROM processed_events WHERE processed_at < ?1",
                    [cutoff],
                )?)
            })
            .await
    }

    /// Windows starting in `[from, to)`, oldest first.
    pub async fn windows_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<WindowReport>, StoreError> {
        let watermark = self.watermark().await?;
        let (from, to) = (self.windows.start_of(from), to.timestamp_millis());
        // Reports need how many buyers, not who: the API and the live feed (after every
        // batch) stay off the per-buyer rows.
        let partials = self
            .db
            .read(move |conn| read_partials(conn, from, to, Buyers::Count))
            .await?;
        Ok(partials
            .iter()
            .map(|(p, buyers)| {
                p.report_with_buyers(
                    is_final(p.window_end.timestamp_millis(), watermark),
                    *buyers,
                )
            })
            .collect())
    }

    /// The best-selling products by revenue over windows starting in `[from, to)`. Summed
    /// here rather than by SQL's `SUM`, which stops at 64 bits.
    pub async fn top_products(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ProductSales>, StoreError> {
        let (from, to) = (self.windows.start_of(from), to.timestamp_millis());
        self.db
            .read(move |conn| {
                let mut by_product: BTreeMap<String, (i64, Revenue)> = BTreeMap::new();
                let mut rows = conn.prepare_cached(
                    "SELECT product_id, quantity, revenue_cents FROM window_products
                     WHERE window_start >= ?1 AND window_start < ?2",
                )?;
                for row in rows.query_map(params![from, to], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })? {
                    let (product_id, quantity, revenue) = row?;
                    let total = by_product.entry(product_id).or_insert((0, Revenue::ZERO));
                    total.0 = add_count(total.0, quantity);
                    total.1 = total.1.plus(revenue_of(&revenue)?);
                }
                let mut top: Vec<ProductSales> = by_product
                    .into_iter()
                    .map(|(product_id, (quantity, revenue))| ProductSales {
                        product_id,
                        quantity,
                        revenue,
                    })
                    .collect();
                top.sort_by(|a, b| {
                    b.revenue
                        .cmp(&a.revenue)
                        .then_with(|| a.product_id.cmp(&b.product_id))
                });
                top.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                Ok(top)
            })
            .await
    }

    /// Totals over every window, summed here rather than by SQL's `SUM`, which stops at 64
    /// bits (one scan of the windows, as the SQL sums were).
    pub async fn summary(&self) -> Result<Summary, StoreError> {
        self.db
            .read(move |conn| {
                let (users, events) = conn.query_row(
                    "SELECT (SELECT COUNT(*) FROM users_seen), (SELECT COUNT(*) FROM processed_events)",
                    [],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )?;
                // One pass over the windows: revenue is summed here (128-bit), so the bounds
                // come from the same rows rather than a second scan.
                let (mut orders, mut revenue, mut items, mut late) = (0, Revenue::ZERO, 0, 0);
                let (mut first, mut last) = (None::<i64>, None::<i64>);
                let mut rows = conn.prepare_cached(
                    "SELECT window_start, window_end, order_count, revenue_cents, items_sold,
                            late_events
                     FROM windows",
                )?;
                for row in rows.query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                })? {
                    let (start, end, o, r, i, l) = row?;
                    first = Some(first.map_or(start, |f| f.min(start)));
                    last = Some(last.map_or(end, |e| e.max(end)));
                    orders = add_count(orders, o);
                    revenue = revenue.plus(revenue_of(&r)?);
                    items = add_count(items, i);
                    late = add_count(late, l);
                }
                let watermark = state(conn, WATERMARK)?;
                Ok(Summary {
                    order_count: orders,
                    unique_users: users,
                    total_revenue: revenue,
                    avg_order_value: average(revenue, orders),
                    items_sold: items,
                    events_processed: events,
                    late_events: late,
                    first_window_start: first.map(ts).transpose()?,
                    last_window_end: last.map(ts).transpose()?,
                    watermark: watermark.map(ts).transpose()?,
                })
            })
            .await
    }
}

fn state(conn: &Connection, name: &str) -> Result<Option<i64>, rusqlite::Error> {
    conn.prepare_cached("SELECT value FROM engine_state WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()
}

fn set_state(conn: &Connection, name: &str, value: i64) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO engine_state (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![name, value])?;
    Ok(())
}

fn partition_progress(conn: &Connection) -> Result<Vec<PartitionProgress>, rusqlite::Error> {
    conn.prepare_cached("SELECT max_event_ms, seen_at_ms FROM partition_progress")?
        .query_map([], |r| {
            Ok(PartitionProgress {
                max_event_ms: r.get(0)?,
                seen_at_ms: r.get(1)?,
            })
        })?
        .collect()
}

/// How much of a window's buyers [`read_partials`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buyers {
    /// Every buyer's id, into `PartialWindow::users` (to merge or publish).
    Ids,
    /// Only how many; `PartialWindow::users` stays empty.
    Count,
}

/// The mergeable state of the windows starting in `[from, to)` (ms), oldest first, each with
/// its number of distinct buyers.
fn read_partials(
    conn: &Connection,
    from: i64,
    to: i64,
    buyers: Buyers,
) -> Result<Vec<(PartialWindow, i64)>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT window_start, window_end, order_count, revenue_cents, items_sold, late_events, users_sketch
             FROM windows WHERE window_start >= ?1 AND window_start < ?2 ORDER BY window_start",
        )?
        .query_map([from, to], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<Vec<u8>>>(6)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut counts: BTreeMap<i64, BTreeMap<String, i64>> = BTreeMap::new();
    let mut by_type = conn.prepare_cached(
        "SELECT window_start, event_type, count FROM window_event_types WHERE window_start >= ?1 AND window_start < ?2",
    )?;
    for row in by_type.query_map([from, to], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })? {
        let (start, kind, n) = row?;
        counts.entry(start).or_default().insert(kind, n);
    }
    let mut users: BTreeMap<i64, BTreeSet<Uuid>> = BTreeMap::new();
    let mut user_counts: BTreeMap<i64, i64> = BTreeMap::new();
    if buyers == Buyers::Ids {
        let mut by_user = conn.prepare_cached(
            "SELECT window_start, user_id FROM window_users WHERE window_start >= ?1 AND window_start < ?2",
        )?;
        for row in by_user.query_map([from, to], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })? {
            let (start, user) = row?;
            let user = Uuid::parse_str(&user).map_err(|_| StoreError::Corrupt)?;
            users.entry(start).or_default().insert(user);
        }
    } else {
        let mut by_count = conn.prepare_cached(
            "SELECT window_start, COUNT(*) FROM window_users WHERE window_start >= ?1 AND window_start < ?2
             GROUP BY window_start",
        )?;
        for row in by_count.query_map([from, to], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (start, n) = row?;
            user_counts.insert(start, n);
        }
    }
    let mut products: BTreeMap<i64, Vec<ProductSales>> = BTreeMap::new();
    let mut by_product = conn.prepare_cached(
        "SELECT window_start, product_id, quantity, revenue_cents FROM window_products
         WHERE window_start >= ?1 AND window_start < ?2 ORDER BY window_start, product_id",
    )?;
    for row in by_product.query_map([from, to], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
        ))
    })? {
        let (start, product_id, quantity, revenue) = row?;
        products.entry(start).or_default().push(ProductSales {
            product_id,
            quantity,
            revenue: revenue_of(&revenue)?,
        });
    }
    rows.into_iter()
        .map(|(start, end, orders, revenue, items, late, sketch)| {
            let users = users.remove(&start).unwrap_or_default();
            let count = user_counts
                .remove(&start)
                .unwrap_or_else(|| i64::try_from(users.len()).unwrap_or(i64::MAX));
            let sketch = match sketch {
                Some(bytes) => UserSketch::from_bytes(&bytes).ok_or(StoreError::Corrupt)?,
                // Windows written before sketches existed: rebuilt from the exact set (with
                // `Buyers::Count` their estimate reads 0 until a new event rewrites the sketch).
                None => users.iter().fold(UserSketch::default(), |mut s, u| {
                    s.insert(*u);
                    s
                }),
            };
            let partial = PartialWindow {
                window_start: ts(start)?,
                window_end: ts(end)?,
                order_count: orders,
                total_revenue: revenue_of(&revenue)?,
                items_sold: items,
                late_events: late,
                event_counts: counts.remove(&start).unwrap_or_default(),
                products: products.remove(&start).unwrap_or_default(),
                users,
                users_sketch: sketch.to_hex(),
            };
            Ok((partial, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::event::OrderEventItem;
    use kit::Money;
    use uuid::Uuid;

    fn created(user: u128, cents: i64, at: &str) -> OrderEvent {
        OrderEvent {
            event_id: Uuid::now_v7(),
            event_type: types::ORDER_CREATED.into(),
            order_id: Uuid::now_v7(),
            user_id: Uuid::from_u128(user),
            total_amount: Money::from_cents(cents).unwrap(),
            currency: Some("USD".into()),
            status: "pending".into(),
            items_count: 2,
            created_at: DateTime::parse_from_rfc3339(at)
                .unwrap()
                .with_timezone(&Utc),
            occurred_at: None,
            items: vec![OrderEventItem {
                product_id: Uuid::from_u128(7),
                quantity: 2,
                unit_price: Money::from_cents(cents / 2).unwrap(),
            }],
        }
    }

    async fn open(dir: &tempfile::TempDir, name: &str, lateness_secs: i64) -> AnalyticsStore {
        AnalyticsStore::open(
            &format!("sqlite://{}/{name}.db", dir.path().display()),
            &Default::default(),
            Windows::of_secs(60).unwrap(),
            Lateness::of_secs(lateness_secs).unwrap(),
        )
        .await
        .unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Runs one statement against the store's database, behind its back.
    async fn execute(store: &AnalyticsStore, sql: &'static str, args: [i64; 2]) {
        store
            .db()
            .write(move |tx| -> Result<(), StoreError> {
                tx.execute(sql, args)?;
                Ok(())
            })
            .await
            .unwrap();
    }

    /// Makes every partition but `except` look as if it last delivered an idle period ago.
    async fn make_idle(store: &AnalyticsStore, except: Option<u32>) {
        let sql =
            "UPDATE partition_progress SET seen_at_ms = seen_at_ms - ?1 WHERE partition <> ?2";
        let except = except.map_or(-1, i64::from);
        execute(store, sql, [crate::engine::IDLE_PARTITION_MS, except]).await;
    }

    #[tokio::test]
    async fn a_partition_behind_the_others_holds_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, "partitions", 30).await;
        let minute = |m: i64| at("2026-11-24T10:00:00Z").timestamp_millis() + m * 60_000;
        store
            .apply_from(vec![
                (0, created(1, 100, "2026-11-24T10:00:00Z")),
                (1, created(2, 100, "2026-11-24T10:00:00Z")),
            ])
            .await
            .unwrap();
        // Partition 0's backlog arrives first, up to 10:16; partition 1 is still at 10:00.
        store
            .apply_from(vec![(0, created(3, 100, "2026-11-24T10:16:00Z"))])
            .await
            .unwrap();
        assert_eq!(store.watermark().await.unwrap(), Some(minute(0) - 30_000));
        // So partition 1's 10:05 is on time, and its progress moves the watermark.
        assert_eq!(
            store
                .apply_from(vec![(1, created(4, 100, "2026-11-24T10:05:00Z"))])
                .await
                .unwrap(),
            Applied { fresh: 1, late: 0 }
        );
        assert_eq!(store.watermark().await.unwrap(), Some(minute(5) - 30_000));
        // The watermark never moves back, whatever a partition delivers.
        store
            .apply_from(vec![(2, created(5, 100, "2026-11-24T10:01:00Z"))])
            .await
            .unwrap();
        assert_eq!(store.watermark().await.unwrap(), Some(minute(5) - 30_000));

        // A partition that stops delivering (moved to another instance) stops counting.
        make_idle(&store, Some(0)).await;
        store
            .apply_from(vec![(0, created(6, 100, "2026-11-24T10:17:00Z"))])
            .await
            .unwrap();
        assert_eq!(store.watermark().await.unwrap(), Some(minute(17) - 30_000));

        // After a restart every partition read before counts again until it idles anew.
        make_idle(&store, None).await;
        drop(store);
        let store = open(&dir, "partitions", 30).await;
        store
            .apply_from(vec![(0, created(7, 100, "2026-11-24T10:30:00Z"))])
            .await
            .unwrap();
        assert_eq!(
            store.watermark().await.unwrap(),
            Some(minute(17) - 30_000),
            "partitions 1 and 2 (at 10:05 and 10:01) hold it where it was"
        );
    }

    #[tokio::test]
    async fn a_store_from_before_partition_progress_keeps_its_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, "legacy", 30).await;
        let ten_oh_one = at("2026-11-24T10:01:00Z").timestamp_millis();
        // What such a store holds: the latest event time, no watermark.
        let sql = "INSERT INTO engine_state (name, value) VALUES ('max_event_time_ms', ?1 + ?2)";
        execute(&store, sql, [ten_oh_one, 30_000]).await;
        drop(store);
        let store = open(&dir, "legacy", 30).await;
        assert_eq!(store.watermark().await.unwrap(), Some(ten_oh_one));
        // The first batch on it keeps that watermark (its window [10:00, 10:01) stays final)
        // even though its one partition is behind it.
        assert_eq!(
            store
                .apply_from(vec![(0, created(1, 100, "2026-11-24T10:00:30Z"))])
                .await
                .unwrap(),
            Applied { fresh: 1, late: 1 }
        );
        assert_eq!(store.watermark().await.unwrap(), Some(ten_oh_one));
    }

    #[tokio::test]
    async fn events_after_the_watermark_are_late_and_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, "late", 30).await;
        assert_eq!(store.watermark().await.unwrap(), None);
        // Batch 1: out of order inside the allowed lateness: nothing is late.
        let on_time = store
            .apply(&[
                created(1, 1_000, "2026-11-24T10:00:50Z"),
                created(2, 2_000, "2026-11-24T10:01:20Z"),
                created(3, 300, "2026-11-24T10:00:55Z"),
            ])
            .await
            .unwrap();
        assert_eq!(on_time, Applied { fresh: 3, late: 0 });
        // Watermark 10:00:50: [10:00, 10:01) is still open, so these are on time too.
        assert_eq!(
            store
                .apply(&[created(4, 50, "2026-11-24T10:00:01Z")])
                .await
                .unwrap(),
            Applied { fresh: 1, late: 0 }
        );
        // An event at 10:01:30 moves the watermark to 10:01:00: the first window is final.
        store
            .apply(&[created(5, 7, "2026-11-24T10:01:30Z")])
            .await
            .unwrap();
        assert_eq!(
            store.watermark().await.unwrap(),
            Some(at("2026-11-24T10:01:00Z").timestamp_millis())
        );
        let late = created(6, 99_999, "2026-11-24T10:00:59Z");
        assert_eq!(
            store.apply(std::slice::from_ref(&late)).await.unwrap(),
            Applied { fresh: 1, late: 1 }
        );
        assert_eq!(
            store.apply(&[late]).await.unwrap(),
            Applied::default(),
            "a redelivered late event is neither counted nor late twice"
        );
        let windows = store
            .windows_between(at("2026-11-24T10:00:00Z"), at("2026-11-24T10:05:00Z"))
            .await
            .unwrap();
        assert_eq!(windows.len(), 2);
        let first = &windows[0];
        assert_eq!(
            (first.order_count, first.late_events, first.is_final),
            (3, 1, true)
        );
        assert_eq!(
            first.total_revenue.to_string(),
            "13.50",
            "the late 999.99 is not in it"
        );
        assert_eq!((windows[1].order_count, windows[1].is_final), (2, false));
        let summary = store.summary().await.unwrap();
        assert_eq!(
            (
                summary.late_events,
                summary.order_count,
                summary.events_processed
            ),
            (1, 5, 6)
        );
        assert_eq!(summary.watermark, Some(at("2026-11-24T10:01:00Z")));
    }

    #[tokio::test]
    async fn final_windows_are_emitted_once_and_the_watermark_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir, "emit", 30).await;
            store
                .apply(&[
                    created(1, 100, "2026-11-24T10:00:10Z"),
                    created(2, 200, "2026-11-24T10:01:10Z"),
                    created(3, 300, "2026-11-24T10:02:40Z"),
                ])
                .await
                .unwrap();
            let ready = store.unemitted_final(100).await.unwrap();
            assert_eq!(
                ready.iter().map(|p| p.window_start).collect::<Vec<_>>(),
                [at("2026-11-24T10:00:00Z"), at("2026-11-24T10:01:00Z")],
                "watermark 10:02:10 closes two windows"
            );
            store
                .mark_emitted(vec![ready[0].window_start])
                .await
                .unwrap();
            store.db().close().await;
        }
        let store = open(&dir, "emit", 30).await;
        assert_eq!(
            store.watermark().await.unwrap(),
            Some(at("2026-11-24T10:02:10Z").timestamp_millis()),
            "the event-time high-water mark was committed with the state"
        );
        let ready = store.unemitted_final(100).await.unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].window_start, at("2026-11-24T10:01:00Z"));
        assert_eq!(ready[0].users.len(), 1);
        assert_eq!(ready[0].sketch().unwrap().estimate(), 1);
    }

    #[tokio::test]
    async fn windows_count_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnalyticsStore::open(
            &format!("sqlite://{}/a.db", dir.path().display()),
            &Default::default(),
            Windows::of_secs(60).unwrap(),
            Lateness::of_secs(3600).unwrap(),
        )
        .await
        .unwrap();
        let a = created(1, 1000, "2026-11-24T10:00:10Z");
        let b = created(1, 2001, "2026-11-24T10:00:50Z");
        let c = created(2, 500, "2026-11-24T10:01:00Z");
        assert_eq!(
            store
                .apply(&[a.clone(), b.clone(), c.clone()])
                .await
                .unwrap()
                .fresh,
            3
        );
        assert_eq!(
            store.apply(&[a.clone(), c.clone()]).await.unwrap().fresh,
            0,
            "replays are ignored"
        );
        let d = created(3, 100, "2026-11-24T10:02:00Z");
        assert_eq!(
            store.apply(&[d.clone(), d.clone()]).await.unwrap().fresh,
            1,
            "a repeat inside one batch counts once"
        );

        let from = DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let windows = store
            .windows_between(from, from + chrono::Duration::minutes(5))
            .await
            .unwrap();
        assert_eq!(windows.len(), 3);
        assert_eq!((windows[0].order_count, windows[0].unique_users), (2, 1));
        assert_eq!(windows[0].total_revenue.to_string(), "30.01");
        assert_eq!(
            windows[0].avg_order_value.to_string(),
            "15.00",
            "1500.5 cents rounds half to even"
        );
        assert_eq!((windows[1].order_count, windows[1].unique_users), (1, 1));
        assert_eq!(windows[0].event_counts.get("order.created"), Some(&2));
        let top = store
            .top_products(from, from + chrono::Duration::minutes(5), 10)
            .await
            .unwrap();
        assert_eq!(top.len(), 1);
        assert_eq!(
            (top[0].quantity, top[0].revenue.to_string()),
            (8, "36.00".to_owned())
        );
        let summary = store.summary().await.unwrap();
        assert_eq!(
            (
                summary.order_count,
                summary.unique_users,
                summary.events_processed
            ),
            (4, 3, 4)
        );
        assert_eq!(summary.total_revenue.to_string(), "36.01");
    }

    fn huge(n: u128, cents: i64, at: &str) -> OrderEvent {
        let mut e = created(n, cents, at);
        e.items[0] = OrderEventItem {
            product_id: Uuid::from_u128(7),
            quantity: 1,
            unit_price: Money::from_cents(cents).unwrap(),
        };
        e
    }

    #[tokio::test]
    async fn revenue_past_64_bit_cents_stays_exact_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, "huge", 30).await;
        let max = i64::MAX;
        store
            .apply(&[
                huge(1, max, "2026-11-24T10:00:10Z"),
                huge(2, max, "2026-11-24T10:00:20Z"),
            ])
            .await
            .unwrap();
        // A second batch adds to what is stored, past 64 bits already.
        store
            .apply(&[
                huge(3, max, "2026-11-24T10:00:30Z"),
                huge(4, 100, "2026-11-24T10:05:00Z"),
            ])
            .await
            .unwrap();
        let three = 3 * i128::from(max);
        let from = at("2026-11-24T10:00:00Z");
        let windows = store
            .windows_between(from, from + chrono::Duration::minutes(10))
            .await
            .unwrap();
        assert_eq!(windows[0].total_revenue.cents(), three);
        assert_eq!(windows[0].avg_order_value.cents(), i128::from(max));
        assert_eq!(windows[0].top_products[0].revenue.cents(), three);
        assert!(windows[0].is_final);
        let summary = store.summary().await.unwrap();
        assert_eq!(summary.total_revenue.cents(), three + 100);
        assert_eq!(summary.order_count, 4);
        let top = store
            .top_products(from, from + chrono::Duration::minutes(10), 5)
            .await
            .unwrap();
        assert_eq!((top[0].quantity, top[0].revenue.cents()), (4, three + 100));
        let ready = store.unemitted_final(10).await.unwrap();
        assert_eq!(
            ready[0].total_revenue.cents(),
            three,
            "the final window is emittable"
        );

        // Absurd item counts saturate rather than break the window.
        let mut absurd = created(5, 100, "2026-11-24T10:05:10Z");
        absurd.items_count = i64::MAX;
        store.apply(&[absurd.clone()]).await.unwrap();
        absurd.event_id = Uuid::now_v7();
        store.apply(&[absurd]).await.unwrap();
        assert_eq!(store.summary().await.unwrap().items_sold, i64::MAX);
    }

    #[tokio::test]
    async fn revenue_stored_as_64_bit_integers_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/old.db", dir.path().display());
        let old = Db::open(&url, &Default::default(), &MIGRATIONS[..3])
            .await
            .unwrap();
        let (a, b) = (
            at("2026-11-24T10:00:00Z").timestamp_millis(),
            at("2026-11-24T10:01:00Z").timestamp_millis(),
        );
        old.write(move |tx| -> Result<(), StoreError> {
            // An exact window, and one whose sum the old code let SQLite turn into a REAL.
            tx.execute(
                "INSERT INTO windows (window_start, window_end, order_count, revenue_cents, items_sold,
                                      late_events, users_sketch, emitted_at)
                 VALUES (?1, ?1 + 60000, 1, 1234, 1, 0, NULL, NULL),
                        (?2, ?2 + 60000, 2, 1.8e19, 2, 3, NULL, 77)",
                [a, b],
            )?;
            tx.execute(
                "INSERT INTO window_products (window_start, product_id, quantity, revenue_cents)
                 VALUES (?1, 'p', 1, 1234), (?2, 'p', 2, 1.8e19)",
                [a, b],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        old.close().await;
        let store = open(&dir, "old", 30).await;
        let windows = store
            .windows_between(at("2026-11-24T10:00:00Z"), at("2026-11-24T10:02:00Z"))
            .await
            .unwrap();
        assert_eq!(windows[0].total_revenue.to_string(), "12.34");
        assert_eq!(windows[0].top_products[0].revenue.to_string(), "12.34");
        assert_eq!(
            windows[1].total_revenue.to_string(),
            "180000000000000000.00",
            "a REAL keeps its nearest integer"
        );
        assert_eq!(
            store.summary().await.unwrap().total_revenue.to_string(),
            "180000000000000012.34"
        );
        drop(store);

        let raw = Connection::open(dir.path().join("old.db")).unwrap();
        let columns: Vec<String> = raw
            .prepare("SELECT name FROM pragma_table_info('windows') ORDER BY cid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let position = |name: &str| columns.iter().position(|c| c == name).unwrap();
        assert!(
            position("revenue_cents") < position("users_sketch"),
            "revenue stays ahead of the sketch blob: {columns:?}"
        );
        let carried: (i64, i64, i64) = raw
            .query_row(
                "SELECT items_sold, late_events, emitted_at FROM windows WHERE window_start = ?1",
                [b],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(carried, (2, 3, 77), "the rebuild carries every column over");
        let unemitted_index: i64 = raw
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'windows_unemitted'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(unemitted_index, 1);
    }
}
