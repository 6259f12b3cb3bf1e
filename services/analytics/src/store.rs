//! Window state in SQLite, applied exactly once per event id.

use bus::event::{OrderEvent, types};
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, now_ms};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, params};

use crate::engine::{ProductSales, WindowReport, Windows, average};

pub static MIGRATIONS: &[Step] = &[(
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
)];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("stored value is corrupt")]
    Corrupt,
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
    pub total_revenue: Money,
    pub avg_order_value: Money,
    pub items_sold: i64,
    pub events_processed: i64,
    pub first_window_start: Option<DateTime<Utc>>,
    pub last_window_end: Option<DateTime<Utc>>,
}

/// What a batch of new events adds, aggregated per window before touching the database.
#[derive(Debug, Default)]
struct Delta {
    /// window start → (window end, orders, revenue cents, items)
    windows: BTreeMap<i64, (i64, i64, i64, i64)>,
    event_types: BTreeMap<(i64, String), i64>,
    window_users: BTreeSet<(i64, String)>,
    users: BTreeSet<String>,
    /// (window start, product) → (quantity, revenue cents)
    products: BTreeMap<(i64, String), (i64, i64)>,
}

impl Delta {
    fn add(&mut self, windows: Windows, e: &OrderEvent) {
        let start = windows.start_of(e.created_at);
        let window = self
            .windows
            .entry(start)
            .or_insert((start + windows.size_ms(), 0, 0, 0));
        *self
            .event_types
            .entry((start, e.event_type.clone()))
            .or_insert(0) += 1;
        if e.event_type != types::ORDER_CREATED {
            return;
        }
        window.1 += 1;
        window.2 += e.total_amount.cents();
        window.3 += e.items_count;
        let user = e.user_id.to_string();
        self.window_users.insert((start, user.clone()));
        self.users.insert(user);
        for item in &e.items {
            let revenue = item
                .unit_price
                .checked_mul(item.quantity)
                .unwrap_or(Money::ZERO)
                .cents();
            let p = self
                .products
                .entry((start, item.product_id.to_string()))
                .or_insert((0, 0));
            p.0 += item.quantity;
            p.1 += revenue;
        }
    }

    fn write(&self, conn: &Connection) -> Result<(), rusqlite::Error> {
        let mut windows = conn.prepare_cached(
            "INSERT INTO windows (window_start, window_end, order_count, revenue_cents, items_sold) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (window_start) DO UPDATE SET order_count = order_count + excluded.order_count,
                revenue_cents = revenue_cents + excluded.revenue_cents, items_sold = items_sold + excluded.items_sold",
        )?;
        for (start, (end, orders, revenue, items)) in &self.windows {
            windows.execute(params![start, end, orders, revenue, items])?;
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
        for (start, user) in &self.window_users {
            window_users.execute(params![start, user])?;
        }
        let mut users =
            conn.prepare_cached("INSERT OR IGNORE INTO users_seen (user_id) VALUES (?1)")?;
        for user in &self.users {
            users.execute([user])?;
        }
        let mut products = conn.prepare_cached(
            "INSERT INTO window_products (window_start, product_id, quantity, revenue_cents) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (window_start, product_id) DO UPDATE SET quantity = quantity + excluded.quantity,
                revenue_cents = revenue_cents + excluded.revenue_cents",
        )?;
        for ((start, product), (quantity, revenue)) in &self.products {
            products.execute(params![start, product, quantity, revenue])?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct AnalyticsStore {
    db: Db,
    windows: Windows,
}

fn ts(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or(StoreError::Corrupt)
}

impl AnalyticsStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
        windows: Windows,
    ) -> Result<Self, DbError> {
        Ok(AnalyticsStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
            windows,
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
    /// depends on the windows touched, not on the number of events. Returns how many were new.
    pub async fn apply(&self, events: &[OrderEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let events = events.to_vec();
        let windows = self.windows;
        self.db
            .write(move |tx| {
                let now = now_ms();
                let mut mark =
                    tx.prepare_cached("INSERT OR IGNORE INTO processed_events (event_id, processed_at) VALUES (?1, ?2)")?;
                let mut delta = Delta::default();
                let mut fresh = 0;
                for e in &events {
                    // Also drops a repeat of the same id inside this batch.
                    if mark.execute(params![e.event_id.to_string(), now])? == 1 {
                        fresh += 1;
                        delta.add(windows, e);
                    }
                }
                delta.write(tx)?;
                Ok(fresh)
            })
            .await
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
        let (from, to) = (self.windows.start_of(from), to.timestamp_millis());
        self.db
            .read(move |conn| {
                let rows = conn
                    .prepare_cached(
                        "SELECT w.window_start, w.window_end, w.order_count, w.revenue_cents, w.items_sold,
                                (SELECT COUNT(*) FROM window_users u WHERE u.window_start = w.window_start)
                         FROM windows w WHERE w.window_start >= ?1 AND w.window_start < ?2 ORDER BY w.window_start",
                    )?
                    .query_map([from, to], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, i64>(5)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut counts: BTreeMap<i64, BTreeMap<String, i64>> = BTreeMap::new();
                let mut by_type = conn.prepare_cached(
                    "SELECT window_start, event_type, count FROM window_event_types WHERE window_start >= ?1 AND window_start < ?2",
                )?;
                for row in by_type.query_map([from, to], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))? {
                    let (start, kind, n) = row?;
                    counts.entry(start).or_default().insert(kind, n);
                }
                rows.into_iter()
                    .map(|(start, end, orders, revenue, items, users)| {
                        let revenue = Money::from_cents(revenue).map_err(|_| StoreError::Corrupt)?;
                        Ok(WindowReport {
                            window_start: ts(start)?,
                            window_end: ts(end)?,
                            order_count: orders,
                            unique_users: users,
                            total_revenue: revenue,
                            avg_order_value: average(revenue, orders),
                            items_sold: items,
                            event_counts: counts.remove(&start).unwrap_or_default(),
                        })
                    })
                    .collect()
            })
            .await
    }

    /// The best-selling products by revenue over windows starting in `[from, to)`.
    pub async fn top_products(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ProductSales>, StoreError> {
        let (from, to) = (self.windows.start_of(from), to.timestamp_millis());
        self.db
            .read(move |conn| {
                let rows = conn
                    .prepare_cached(
                        "SELECT product_id, SUM(quantity), SUM(revenue_cents) AS revenue FROM window_products
                         WHERE window_start >= ?1 AND window_start < ?2
                         GROUP BY product_id ORDER BY revenue DESC, product_id LIMIT ?3",
                    )?
                    .query_map(params![from, to, limit], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                rows.into_iter()
                    .map(|(product_id, quantity, revenue)| {
                        Ok(ProductSales {
                            product_id,
                            quantity,
                            revenue: Money::from_cents(revenue).map_err(|_| StoreError::Corrupt)?,
                        })
                    })
                    .collect()
            })
            .await
    }

    pub async fn summary(&self) -> Result<Summary, StoreError> {
        self.db
            .read(|conn| {
                let (orders, revenue, items, first, last, users, events) = conn.query_row(
                    "SELECT COALESCE(SUM(order_count), 0), COALESCE(SUM(revenue_cents), 0), COALESCE(SUM(items_sold), 0),
                            MIN(window_start), MAX(window_end),
                            (SELECT COUNT(*) FROM users_seen), (SELECT COUNT(*) FROM processed_events)
                     FROM windows",
                    [],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, Option<i64>>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                        ))
                    },
                )?;
                let revenue = Money::from_cents(revenue).map_err(|_| StoreError::Corrupt)?;
                Ok(Summary {
                    order_count: orders,
                    unique_users: users,
                    total_revenue: revenue,
                    avg_order_value: average(revenue, orders),
                    items_sold: items,
                    events_processed: events,
                    first_window_start: first.map(ts).transpose()?,
                    last_window_end: last.map(ts).transpose()?,
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::event::OrderEventItem;
    use uuid::Uuid;

    fn created(user: u128, cents: i64, at: &str) -> OrderEvent {
        OrderEvent {
            event_id: Uuid::now_v7(),
            event_type: types::ORDER_CREATED.into(),
            order_id: Uuid::now_v7(),
            user_id: Uuid::from_u128(user),
            total_amount: Money::from_cents(cents).unwrap(),
            currency: "USD".into(),
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

    #[tokio::test]
    async fn windows_count_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnalyticsStore::open(
            &format!("sqlite://{}/a.db", dir.path().display()),
            &Default::default(),
            Windows::of_secs(60).unwrap(),
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
                .unwrap(),
            3
        );
        assert_eq!(
            store.apply(&[a.clone(), c.clone()]).await.unwrap(),
            0,
            "replays are ignored"
        );
        let d = created(3, 100, "2026-11-24T10:02:00Z");
        assert_eq!(
            store.apply(&[d.clone(), d.clone()]).await.unwrap(),
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
}
