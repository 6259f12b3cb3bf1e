//! Orders, their lines, the outbox and processed-event ids: the [`OrderStore`] contract and
//! its SQLite implementation (PostgreSQL is in `crate::pg`, feature `postgres`).
//!
//! Every state change and the event announcing it are written in one transaction, so an
//! event is published if and only if the change happened.

use std::sync::Arc;

use async_trait::async_trait;

use bus::Event;
use bus::event::{OrderEvent, OrderEventItem};
use bus::names::{ORDER_EVENTS_QUEUE, ORDERS_TOPIC};
use bus::outbox::{self, Destination};
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, corrupt, now_ms};
use kit::page::{BadCursor, Cursor, Page, PageRequest};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::domain::OrderStatus;

pub static MIGRATIONS: &[Step] = &[
    (
        1,
        "orders",
        "CREATE TABLE orders (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            status TEXT NOT NULL,
            total_cents INTEGER NOT NULL CHECK (total_cents >= 0),
            currency TEXT NOT NULL,
            shipping_address TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        );
        CREATE INDEX orders_user ON orders (user_id, created_at);
        CREATE INDEX orders_expiry ON orders (status, expires_at);
        CREATE TABLE order_items (
            order_id TEXT NOT NULL REFERENCES orders (id),
            product_id TEXT NOT NULL,
            quantity INTEGER NOT NULL CHECK (quantity > 0),
            unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0),
            PRIMARY KEY (order_id, product_id)
        ) WITHOUT ROWID;
        CREATE TABLE processed_events (
            event_id TEXT PRIMARY KEY,
            processed_at INTEGER NOT NULL
        ) WITHOUT ROWID;",
    ),
    (2, "outbox", outbox::MIGRATION),
    (3, "idempotency keys", kit::idempotency::MIGRATION),
    (
        4,
        "payment versions",
        // The newest version of each payment the saga has seen: an event carrying an older
        // one arrived out of order and is stale.
        "CREATE TABLE payment_versions (
            payment_id TEXT PRIMARY KEY,
            order_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            seen_at INTEGER NOT NULL
        ) WITHOUT ROWID;",
    ),
    (
        5,
        "dead letters",
        // Events the saga gave up on after repeated transient failures: kept for an operator
        // (and a replay), so the partition behind them moves on.
        "CREATE TABLE dead_letters (
            topic TEXT NOT NULL,
            partition INTEGER NOT NULL,
            record_offset INTEGER NOT NULL,
            key TEXT NOT NULL,
            payload TEXT NOT NULL,
            reason TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            dead_at INTEGER NOT NULL,
            PRIMARY KEY (topic, partition, record_offset)
        ) WITHOUT ROWID;",
    ),
];

/// A stream record the saga gave up on: where it was, what it said, and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub key: String,
    /// The record's body as text (lossy for bytes that are not UTF-8).
    pub payload: String,
    pub reason: String,
    pub attempts: u32,
}

/// The default platform currency (the `currency` setting decides; tests use this).
pub const CURRENCY: &str = "INR";
const SOURCE: &str = "mercato/orders";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price: Money,
    pub line_total: Money,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Order {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: OrderStatus,
    pub items: Vec<OrderLine>,
    pub total_amount: Money,
    pub currency: String,
    /// Free text, or the seed's structured address as JSON (answered as an object).
    #[serde(with = "crate::domain::address_json")]
    pub shipping_address: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl Order {
    pub fn items_count(&self) -> i64 {
        self.items.iter().map(|l| l.quantity).sum()
    }

    /// The seed-shaped event announcing this order's current state.
    pub fn event(&self, event_type: &str) -> Result<Event, serde_json::Error> {
        self.event_with_id(Uuid::now_v7(), event_type)
    }

    /// As [`Order::event`], under an id the caller chose (so a repeated announcement is one event).
    pub fn event_with_id(&self, id: Uuid, event_type: &str) -> Result<Event, serde_json::Error> {
        let payload = OrderEvent {
            event_id: id,
            event_type: event_type.to_owned(),
            order_id: self.id,
            user_id: self.user_id,
            total_amount: self.total_amount,
            currency: Some(self.currency.clone()),
            status: self.status.as_str().to_owned(),
            items_count: self.items_count(),
            created_at: self.created_at,
            occurred_at: Some(self.updated_at),
            items: self
                .items
                .iter()
                .map(|l| OrderEventItem {
                    product_id: l.product_id,
                    quantity: l.quantity,
                    unit_price: l.unit_price,
                })
                .collect(),
        };
        Event::new(id, event_type, SOURCE, self.id.to_string(), &payload)
    }
}

/// Where the page after `order` starts: the same on every backend.
pub fn order_cursor(order: &Order) -> Cursor {
    Cursor::after_row(order.created_at.timestamp_millis(), order.id)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("order not found")]
    NotFound,
    #[error("an order with this id already exists")]
    Duplicate,
    #[error(transparent)]
    BadCursor(#[from] BadCursor),
    #[error("an order cannot go from {from} to {to}")]
    IllegalTransition { from: OrderStatus, to: OrderStatus },
    #[error("an order total overflowed")]
    Overflow,
    #[error("stored value is corrupt")]
    Corrupt,
    #[error("event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
    /// DynamoDB failed, answered something unreadable, or kept refusing a contended write.
    #[cfg(feature = "dynamodb")]
    #[error("dynamodb: {0}")]
    Dynamo(String),
}

/// The outcome of a status change: the order as it is now, and whether this call changed it.
#[derive(Debug, Clone)]
pub struct Transition {
    pub order: Order,
    pub changed: bool,
}

pub const DESTINATIONS: &[Destination] = &[
    Destination::Stream(ORDERS_TOPIC),
    Destination::Queue(ORDER_EVENTS_QUEUE),
];

/// Where orders live. Implementations keep the same guarantees: a change and its outbox rows
/// commit together, a transition applies only from a status that may become the target (so
/// of concurrent attempts exactly one changes the order), and an event id is applied once.
#[async_trait]
pub trait OrderStore: Send + Sync + std::fmt::Debug {
    /// Writes the order, its lines and its `order.created` outbox rows in one transaction;
    /// [`StoreError::Duplicate`] when the id exists.
    async fn insert(&self, order: &Order) -> Result<(), StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError>;

    /// A page of a user's orders, oldest first, ties by id (the cursor is the last order's
    /// `(created_at, id)` on every backend).
    async fn list_by_user(
        &self,
        user_id: Uuid,
        page: &PageRequest,
    ) -> Result<Page<Order>, StoreError>;

    /// Moves an order to `to` if legal, publishing `order.<to>` in the same transaction.
    /// Moving to the current status is a no-op (`changed: false`), so retries are safe.
    /// With `event_id`, a redelivered event is recognised and ignored.
    async fn transition(
        &self,
        id: Uuid,
        to: OrderStatus,
        event_id: Option<Uuid>,
    ) -> Result<Transition, StoreError>;

    /// Publishes `event_type` for the order as it is, without changing it, under `event_id`:
    /// once per id (`false` when that id was announced or processed before), so a caller
    /// that retries announces once.
    async fn announce(
        &self,
        id: Uuid,
        event_type: &str,
        event_id: Uuid,
    ) -> Result<bool, StoreError>;

    /// A user's pending orders placed since `since`: how many, and how many units they hold
    /// in all. The window keeps the read to the user's recent orders (an order pending longer
    /// than its TTL is being cancelled), however long their history.
    async fn pending_of_user(
        &self,
        user_id: Uuid,
        since: DateTime<Utc>,
    ) -> Result<(i64, i64), StoreError>;

    /// Keeps a record the saga gave up on; storing the same record again changes nothing.
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError>;

    /// The records given up on, at most `limit`, oldest first.
    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError>;

    /// Pending orders whose payment window has closed, soonest expired first.
    async fn expired_pending(&self, limit: u32) -> Result<Vec<Uuid>, StoreError>;

    /// Notes that version `version` of payment `payment_id` (of order `order_id`) has been
    /// seen. `false` when a newer version of that payment was seen before: an event carrying
    /// this one is stale. Seeing the same version again is `true` (a redelivery, or a retry
    /// of an event whose handling failed halfway).
    async fn observe_payment_version(
        &self,
        order_id: Uuid,
        payment_id: Uuid,
        version: u64,
    ) -> Result<bool, StoreError>;

    /// Forgets processed event ids (and payment versions) older than `age`: past the stream's
    /// retention nothing that old can be redelivered. Returns how many.
    async fn prune_processed(&self, age: std::time::Duration) -> Result<usize, StoreError>;

    async fn count(&self) -> Result<i64, StoreError>;

    /// Readiness: the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Flushes and closes the database at shutdown.
    async fn close(&self);
}

/// Builds a pending order from reserved lines (catalog prices), never a client's prices.
pub fn new_order(
    id: Uuid,
    user_id: Uuid,
    lines: &[(Uuid, i64, Money)],
    shipping_address: String,
    currency: &str,
    ttl: chrono::Duration,
) -> Result<Order, StoreError> {
    let mut total = Money::ZERO;
    let mut items = Vec::with_capacity(lines.len());
    for (product_id, quantity, unit_price) in lines {
        let line_total = unit_price
            .checked_mul(*quantity)
            .ok_or(StoreError::Overflow)?;
        total = total.checked_add(line_total).ok_or(StoreError::Overflow)?;
        items.push(OrderLine {
            product_id: *product_id,
            quantity: *quantity,
            unit_price: *unit_price,
            line_total,
        });
    }
    let now = DateTime::from_timestamp_millis(now_ms()).unwrap_or_default();
    Ok(Order {
        id,
        user_id,
        status: OrderStatus::Pending,
        items,
        total_amount: total,
        currency: currency.to_owned(),
        shipping_address,
        created_at: now,
        updated_at: now,
        expires_at: now + ttl,
    })
}

#[derive(Debug, Clone)]
pub struct SqliteOrderStore {
    db: Db,
    wake_relay: Arc<Notify>,
}

impl SqliteOrderStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<SqliteOrderStore, DbError> {
        Ok(SqliteOrderStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
            wake_relay: Arc::new(Notify::new()),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Lets the outbox relay know, right after commit, that events are waiting.
    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> SqliteOrderStore {
        self.wake_relay = wake;
        self
    }
}

#[async_trait]
impl OrderStore for SqliteOrderStore {
    /// Writes the order, its lines and its `order.created` outbox rows in one transaction.
    async fn insert(&self, order: &Order) -> Result<(), StoreError> {
        let event = order.event(bus::event::types::ORDER_CREATED)?;
        let order = order.clone();
        self.db
            .write(move |tx| {
                let id = order.id.to_string();
                tx.prepare_cached(
                    "INSERT INTO orders (id, user_id, status, total_cents, currency, shipping_address, created_at, updated_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    id,
                    order.user_id.to_string(),
                    order.status.as_str(),
                    order.total_amount.cents(),
                    order.currency,
                    order.shipping_address,
                    order.created_at.timestamp_millis(),
                    order.updated_at.timestamp_millis(),
                    order.expires_at.timestamp_millis()
                ])
                .map_err(|e| if kit::db::is_unique_violation(&e) { StoreError::Duplicate } else { StoreError::Sqlite(e) })?;
                let mut line = tx.prepare_cached(
                    "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for item in &order.items {
                    line.execute(params![id, item.product_id.to_string(), item.quantity, item.unit_price.cents()])?;
                }
                outbox::enqueue(tx, &event, DESTINATIONS)?;
                Ok::<_, StoreError>(())
            })
            .await?;
        self.wake_relay.notify_one();
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        self.db.read(move |conn| load(conn, id)).await
    }

    async fn list_by_user(
        &self,
        user_id: Uuid,
        page: &PageRequest,
    ) -> Result<Page<Order>, StoreError> {
        let ((after_at, after_id), skip) = page.row_start()?;
        let limit = page.limit;
        let rows = self
            .db
            .read(move |conn| {
                let ids: Vec<String> = conn
                    .prepare_cached(
                        "SELECT id FROM orders WHERE user_id = ?1 AND (created_at, id) > (?2, ?3)
                         ORDER BY created_at, id LIMIT ?4 OFFSET ?5",
                    )?
                    .query_map(
                        params![
                            user_id.to_string(),
                            after_at,
                            after_id.to_string(),
                            limit + 1,
                            skip
                        ],
                        |r| r.get(0),
                    )?
                    .collect::<Result<_, _>>()?;
                let mut orders = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(order) = load(conn, id.parse().map_err(|_| StoreError::Corrupt)?)? {
                        orders.push(order);
                    }
                }
                Ok::<_, StoreError>(orders)
            })
            .await?;
        Ok(Page::from_rows(rows, limit, order_cursor))
    }

    /// Moves an order to `to` if legal, publishing `order.<to>` in the same transaction.
    /// Moving to the current status is a no-op (`changed: false`), so retries are safe.
    /// With `event_id`, a redelivered event is recognised and ignored.
    async fn transition(
        &self,
        id: Uuid,
        to: OrderStatus,
        event_id: Option<Uuid>,
    ) -> Result<Transition, StoreError> {
        let transition = self
            .db
            .write(move |tx| {
                if let Some(event_id) = event_id
                    && !mark_processed(tx, event_id)?
                {
                    let order = load(tx, id)?.ok_or(StoreError::NotFound)?;
                    return Ok(Transition {
                        order,
                        changed: false,
                    });
                }
                let mut order = load(tx, id)?.ok_or(StoreError::NotFound)?;
                if order.status == to {
                    return Ok(Transition {
                        order,
                        changed: false,
                    });
                }
                if !order.status.can_become(to) {
                    return Err(StoreError::IllegalTransition {
                        from: order.status,
                        to,
                    });
                }
                let now = now_ms();
                tx.execute(
                    "UPDATE orders SET status = ?1, updated_at = ?2 WHERE id = ?3",
                    params![to.as_str(), now, id.to_string()],
                )?;
                order.status = to;
                order.updated_at = DateTime::from_timestamp_millis(now).unwrap_or_default();
                outbox::enqueue(tx, &order.event(&to.event_type())?, DESTINATIONS)?;
                Ok(Transition {
                    order,
                    changed: true,
                })
            })
            .await?;
        if transition.changed {
            self.wake_relay.notify_one();
        }
        Ok(transition)
    }

    async fn announce(
        &self,
        id: Uuid,
        event_type: &str,
        event_id: Uuid,
    ) -> Result<bool, StoreError> {
        let event_type = event_type.to_owned();
        let announced = self
            .db
            .write(move |tx| {
                if !mark_processed(tx, event_id)? {
                    return Ok(false);
                }
                let order = load(tx, id)?.ok_or(StoreError::NotFound)?;
                outbox::enqueue(
                    tx,
                    &order.event_with_id(event_id, &event_type)?,
                    DESTINATIONS,
                )?;
                Ok::<_, StoreError>(true)
            })
            .await?;
        if announced {
            self.wake_relay.notify_one();
        }
        Ok(announced)
    }

    async fn pending_of_user(
        &self,
        user_id: Uuid,
        since: DateTime<Utc>,
    ) -> Result<(i64, i64), StoreError> {
        self.db
            .read(move |conn| {
                Ok::<_, StoreError>(
                    conn.prepare_cached(
                        "SELECT COUNT(DISTINCT o.id), COALESCE(SUM(i.quantity), 0)
                         FROM orders o JOIN order_items i ON i.order_id = o.id
                         WHERE o.user_id = ?1 AND o.created_at >= ?2 AND o.status = 'pending'",
                    )?
                    .query_row(
                        params![user_id.to_string(), since.timestamp_millis()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?,
                )
            })
            .await
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let l = letter.clone();
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT OR IGNORE INTO dead_letters
                     (topic, partition, record_offset, key, payload, reason, attempts, dead_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        l.topic,
                        l.partition,
                        l.offset,
                        l.key,
                        l.payload,
                        l.reason,
                        l.attempts,
                        now_ms()
                    ],
                )?;
                Ok::<_, StoreError>(())
            })
            .await
    }

    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        self.db
            .read(move |conn| {
                let letters = conn
                    .prepare_cached(
                        "SELECT topic, partition, record_offset, key, payload, reason, attempts
                         FROM dead_letters ORDER BY dead_at, topic, partition, record_offset LIMIT ?1",
                    )?
                    .query_map([limit], |r| {
                        Ok(DeadLetter {
                            topic: r.get(0)?,
                            partition: r.get(1)?,
                            offset: r.get(2)?,
                            key: r.get(3)?,
                            payload: r.get(4)?,
                            reason: r.get(5)?,
                            attempts: r.get(6)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                Ok::<_, StoreError>(letters)
            })
            .await
    }

    /// Pending orders whose payment window has closed.
    async fn expired_pending(&self, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        self.db
            .read(move |conn| {
                let ids: Vec<String> = conn
                    .prepare_cached(
                        "SELECT id FROM orders WHERE status = 'pending' AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2",
                    )?
                    .query_map(params![now_ms(), limit], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                ids.iter().map(|s| s.parse().map_err(|_| StoreError::Corrupt)).collect()
            })
            .await
    }

    async fn observe_payment_version(
        &self,
        order_id: Uuid,
        payment_id: Uuid,
        version: u64,
    ) -> Result<bool, StoreError> {
        let version = i64::try_from(version).map_err(|_| StoreError::Corrupt)?;
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "INSERT INTO payment_versions (payment_id, order_id, version, seen_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (payment_id) DO UPDATE SET version = excluded.version, seen_at = excluded.seen_at
                     WHERE excluded.version >= payment_versions.version",
                    params![payment_id.to_string(), order_id.to_string(), version, now_ms()],
                )? == 1)
            })
            .await
    }

    /// Forgets processed event ids (and payment versions) older than `age`: past the stream's
    /// retention nothing that old can be redelivered. Returns how many.
    async fn prune_processed(&self, age: std::time::Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2);
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "DELETE FROM processed_events WHERE processed_at < ?1",
                    [cutoff],
                )? + tx.execute("DELETE FROM payment_versions WHERE seen_at < ?1", [cutoff])?)
            })
            .await
    }

    async fn count(&self) -> Result<i64, StoreError> {
        self.db
            .read(|conn| Ok(conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    async fn close(&self) {
        self.db.close().await;
    }
}

/// Marks `event_id` processed in the write transaction; `false` when it was already.
fn mark_processed(tx: &Connection, event_id: Uuid) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "INSERT OR IGNORE INTO processed_events (event_id, processed_at) VALUES (?1, ?2)",
        params![event_id.to_string(), now_ms()],
    )? == 1)
}

fn load(conn: &Connection, id: Uuid) -> Result<Option<Order>, StoreError> {
    let key = id.to_string();
    let row = conn
        .prepare_cached(
            "SELECT user_id, status, total_cents, currency, shipping_address, created_at, updated_at, expires_at
             FROM orders WHERE id = ?1",
        )?
        .query_row([&key], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })
        .optional()?;
    let Some((user_id, status, total, currency, shipping_address, created, updated, expires)) = row
    else {
        return Ok(None);
    };
    let items = conn
        .prepare_cached(
            "SELECT product_id, quantity, unit_price_cents FROM order_items WHERE order_id = ?1 ORDER BY product_id",
        )?
        .query_map([&key], |r| {
            let product: String = r.get(0)?;
            let quantity: i64 = r.get(1)?;
            let unit_price = Money::from_cents(r.get(2)?).map_err(corrupt(2))?;
            Ok(OrderLine {
                product_id: product.parse().map_err(corrupt(0))?,
                quantity,
                unit_price,
                line_total: unit_price.checked_mul(quantity).unwrap_or(Money::ZERO),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let time = |ms: i64| DateTime::from_timestamp_millis(ms).ok_or(StoreError::Corrupt);
    Ok(Some(Order {
        id,
        user_id: user_id.parse().map_err(|_| StoreError::Corrupt)?,
        status: status.parse().map_err(|()| StoreError::Corrupt)?,
        items,
        total_amount: Money::from_cents(total).map_err(|_| StoreError::Corrupt)?,
        currency,
        shipping_address,
        created_at: time(created)?,
        updated_at: time(updated)?,
        expires_at: time(expires)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, SqliteOrderStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/orders.db", dir.path().display());
        let store = SqliteOrderStore::open(&url, &kit::config::SqliteSettings::default())
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn order_and_its_event_commit_together() {
        let (_dir, store) = store().await;
        let price = Money::from_cents(199_999).unwrap();
        let order = new_order(
            Uuid::now_v7(),
            Uuid::now_v7(),
            &[(Uuid::now_v7(), 2, price)],
            "1 Main St".into(),
            CURRENCY,
            chrono::Duration::minutes(15),
        )
        .unwrap();
        assert_eq!(order.total_amount.to_string(), "3999.98");
        store.insert(&order).await.unwrap();
        let outbox: i64 = store
            .db()
            .read(|c| {
                Ok::<_, StoreError>(c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)
            })
            .await
            .unwrap();
        assert_eq!(outbox, 2, "one row per destination");
        assert_eq!(store.get(order.id).await.unwrap().unwrap(), order);

        let paid = store
            .transition(order.id, OrderStatus::Paid, None)
            .await
            .unwrap();
        assert!(paid.changed);
        assert!(
            !store
                .transition(order.id, OrderStatus::Paid, None)
                .await
                .unwrap()
                .changed
        );
        assert!(matches!(
            store
                .transition(order.id, OrderStatus::Cancelled, None)
                .await,
            Err(StoreError::IllegalTransition {
                from: OrderStatus::Paid,
                to: OrderStatus::Cancelled
            })
        ));
        let event = Uuid::now_v7();
        assert!(
            store
                .transition(order.id, OrderStatus::Refunded, Some(event))
                .await
                .unwrap()
                .changed
        );
        // The same event again is recognised, even though paid -> refunded is no longer possible.
        assert!(
            !store
                .transition(order.id, OrderStatus::Refunded, Some(event))
                .await
                .unwrap()
                .changed
        );
        let outbox: i64 = store
            .db()
            .read(|c| {
                Ok::<_, StoreError>(c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)
            })
            .await
            .unwrap();
        assert_eq!(outbox, 6, "created, paid, refunded: two rows each");
    }
}
