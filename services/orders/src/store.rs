//! Orders, their lines, the outbox and processed-event ids, in SQLite.
//!
//! Every state change and the event announcing it are written in one transaction, so an
//! event is published if and only if the change happened.

use std::sync::Arc;

use bus::Event;
use bus::event::{OrderEvent, OrderEventItem};
use bus::names::{ORDER_EVENTS_QUEUE, ORDERS_TOPIC};
use bus::outbox::{self, Destination};
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, now_ms};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
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
];

pub const CURRENCY: &str = "USD";
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
        let id = Uuid::now_v7();
        let payload = OrderEvent {
            event_id: id,
            event_type: event_type.to_owned(),
            order_id: self.id,
            user_id: self.user_id,
            total_amount: self.total_amount,
            currency: self.currency.clone(),
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("order not found")]
    NotFound,
    #[error("an order cannot go from {from} to {to}")]
    IllegalTransition { from: OrderStatus, to: OrderStatus },
    #[error("an order total overflowed")]
    Overflow,
    #[error("stored value is corrupt")]
    Corrupt,
    #[error("event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
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

#[derive(Debug, Clone)]
pub struct OrderStore {
    db: Db,
    wake_relay: Arc<Notify>,
}

fn uuid_of(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let s: String = row.try_get(column)?;
    s.parse().map_err(|_| StoreError::Corrupt)
}

fn time_of(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(row.try_get(column)?).ok_or(StoreError::Corrupt)
}

fn money_of(row: &SqliteRow, column: &str) -> Result<Money, StoreError> {
    Money::from_cents(row.try_get(column)?).map_err(|_| StoreError::Corrupt)
}

impl OrderStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<OrderStore, DbError> {
        Ok(OrderStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
            wake_relay: Arc::new(Notify::new()),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Lets the outbox relay know, right after commit, that events are waiting.
    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> OrderStore {
        self.wake_relay = wake;
        self
    }

    /// Builds a pending order from reserved lines (catalog prices), never a client's prices.
    pub fn new_order(
        id: Uuid,
        user_id: Uuid,
        lines: &[(Uuid, i64, Money)],
        shipping_address: String,
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
            currency: CURRENCY.to_owned(),
            shipping_address,
            created_at: now,
            updated_at: now,
            expires_at: now + ttl,
        })
    }

    /// Writes the order, its lines and its `order.created` outbox rows in one transaction.
    pub async fn insert(&self, order: &Order) -> Result<(), StoreError> {
        let event = order.event(bus::event::types::ORDER_CREATED)?;
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO orders (id, user_id, status, total_cents, currency, shipping_address, created_at, updated_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(order.id.to_string())
        .bind(order.user_id.to_string())
        .bind(order.status.as_str())
        .bind(order.total_amount.cents())
        .bind(&order.currency)
        .bind(&order.shipping_address)
        .bind(order.created_at.timestamp_millis())
        .bind(order.updated_at.timestamp_millis())
        .bind(order.expires_at.timestamp_millis())
        .execute(&mut *tx)
        .await?;
        let id = order.id.to_string();
        let mut items = QueryBuilder::<Sqlite>::new(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents) ",
        );
        items.push_values(&order.items, |mut row, line| {
            row.push_bind(&id)
                .push_bind(line.product_id.to_string())
                .push_bind(line.quantity)
                .push_bind(line.unit_price.cents());
        });
        items.build().execute(&mut *tx).await?;
        outbox::enqueue(&mut tx, &event, DESTINATIONS).await?;
        tx.commit().await?;
        self.wake_relay.notify_one();
        Ok(())
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        let mut conn = self.db.read.acquire().await?;
        load(&mut conn, id).await
    }

    pub async fn list_by_user(
        &self,
        user_id: Uuid,
        skip: u32,
        limit: u32,
    ) -> Result<Vec<Order>, StoreError> {
        let mut conn = self.db.read.acquire().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM orders WHERE user_id = ? ORDER BY created_at, id LIMIT ? OFFSET ?",
        )
        .bind(user_id.to_string())
        .bind(limit)
        .bind(skip)
        .fetch_all(&mut *conn)
        .await?;
        let mut orders = Vec::with_capacity(ids.len());
        for id in ids {
            let id = id.parse().map_err(|_| StoreError::Corrupt)?;
            if let Some(order) = load(&mut conn, id).await? {
                orders.push(order);
            }
        }
        Ok(orders)
    }

    /// Moves an order to `to` if legal, publishing `order.<to>` in the same transaction.
    /// Moving to the current status is a no-op (`changed: false`), so retries are safe.
    /// With `event_id`, a redelivered event is recognised and ignored.
    pub async fn transition(
        &self,
        id: Uuid,
        to: OrderStatus,
        event_id: Option<Uuid>,
    ) -> Result<Transition, StoreError> {
        let mut tx = self.db.begin().await?;
        if let Some(event_id) = event_id {
            let fresh = sqlx::query(
                "INSERT OR IGNORE INTO processed_events (event_id, processed_at) VALUES (?, ?)",
            )
            .bind(event_id.to_string())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !fresh {
                let order = load(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
                return Ok(Transition {
                    order,
                    changed: false,
                });
            }
        }
        let mut order = load(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if order.status == to {
            tx.commit().await?;
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
        sqlx::query("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?")
            .bind(to.as_str())
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        order.status = to;
        order.updated_at = DateTime::from_timestamp_millis(now).unwrap_or_default();
        outbox::enqueue(&mut tx, &order.event(&to.event_type())?, DESTINATIONS).await?;
        tx.commit().await?;
        self.wake_relay.notify_one();
        Ok(Transition {
            order,
            changed: true,
        })
    }

    /// Pending orders whose payment window has closed.
    pub async fn expired_pending(&self, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM orders WHERE status = 'pending' AND expires_at <= ? ORDER BY expires_at LIMIT ?")
                .bind(now_ms())
                .bind(limit)
                .fetch_all(&self.db.read)
                .await?;
        ids.iter()
            .map(|s| s.parse().map_err(|_| StoreError::Corrupt))
            .collect()
    }

    pub async fn count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM orders")
            .fetch_one(&self.db.read)
            .await?)
    }
}

async fn load(conn: &mut SqliteConnection, id: Uuid) -> Result<Option<Order>, StoreError> {
    let Some(row) = sqlx::query("SELECT * FROM orders WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let lines = sqlx::query(
        "SELECT product_id, quantity, unit_price_cents FROM order_items WHERE order_id = ? ORDER BY product_id",
    )
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let mut items = Vec::with_capacity(lines.len());
    for line in &lines {
        let quantity: i64 = line.try_get("quantity")?;
        let unit_price = money_of(line, "unit_price_cents")?;
        items.push(OrderLine {
            product_id: uuid_of(line, "product_id")?,
            quantity,
            unit_price,
            line_total: unit_price
                .checked_mul(quantity)
                .ok_or(StoreError::Corrupt)?,
        });
    }
    let status: String = row.try_get("status")?;
    Ok(Some(Order {
        id,
        user_id: uuid_of(&row, "user_id")?,
        status: status.parse().map_err(|()| StoreError::Corrupt)?,
        items,
        total_amount: money_of(&row, "total_cents")?,
        currency: row.try_get("currency")?,
        shipping_address: row.try_get("shipping_address")?,
        created_at: time_of(&row, "created_at")?,
        updated_at: time_of(&row, "updated_at")?,
        expires_at: time_of(&row, "expires_at")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, OrderStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/orders.db", dir.path().display());
        let store = OrderStore::open(&url, &kit::config::SqliteSettings::default())
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn order_and_its_event_commit_together() {
        let (_dir, store) = store().await;
        let price = Money::from_cents(199_999).unwrap();
        let order = OrderStore::new_order(
            Uuid::now_v7(),
            Uuid::now_v7(),
            &[(Uuid::now_v7(), 2, price)],
            "1 Main St".into(),
            chrono::Duration::minutes(15),
        )
        .unwrap();
        assert_eq!(order.total_amount.to_string(), "3999.98");
        store.insert(&order).await.unwrap();
        let outbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&store.db().read)
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
        let outbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&store.db().read)
            .await
            .unwrap();
        assert_eq!(outbox, 6, "created, paid, refunded: two rows each");
    }
}
