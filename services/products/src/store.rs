//! Products, stock and reservations: the [`ProductStore`] trait the API, the demo seeding and
//! the reservation sweeper use, and its SQLite implementation ([`crate::pg`] has the
//! PostgreSQL one, feature `postgres`).
//!
//! In SQLite, //! stock is taken with a conditional `UPDATE ... WHERE stock >= ?` inside a write
//! transaction, never read-then-write, and a CHECK constraint keeps it from ever going
//! negative. A reservation and its stock changes commit together, so a reservation either
//! holds all of its lines or does not exist.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, corrupt, is_unique_violation, now_ms};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::ReservationLines;

pub static MIGRATIONS: &[Step] = &[
    (
    1,
    "catalog and reservations",
    "CREATE TABLE products (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        price_cents INTEGER NOT NULL CHECK (price_cents > 0),
        stock INTEGER NOT NULL CHECK (stock >= 0),
        sku TEXT NOT NULL UNIQUE,
        category TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX products_category ON products (category, created_at);
    CREATE INDEX products_created ON products (created_at, id);
    CREATE TABLE reservations (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('held', 'released', 'committed')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE reservation_items (
        order_id TEXT NOT NULL REFERENCES reservations (order_id),
        product_id TEXT NOT NULL,
        quantity INTEGER NOT NULL CHECK (quantity > 0),
        unit_price_cents INTEGER NOT NULL,
        PRIMARY KEY (order_id, product_id)
    ) WITHOUT ROWID;
    CREATE INDEX reservation_items_product ON reservation_items (product_id);",
    ),
    (
        2,
        "reservation expiry",
        // Reservations made before this step never expire on their own.
        "ALTER TABLE reservations ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 9223372036854775807;
        CREATE INDEX reservations_expiry ON reservations (status, expires_at);",
    ),
];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Product {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub price: Money,
    pub stock: i64,
    pub sku: String,
    pub category: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewProduct {
    pub name: String,
    pub description: String,
    pub price: Money,
    pub stock: i64,
    pub sku: String,
    pub category: String,
}

#[derive(Debug, Clone, Default)]
pub struct ProductChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price: Option<Money>,
    pub stock: Option<i64>,
    pub sku: Option<String>,
    pub category: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StockLevel {
    pub product_id: Uuid,
    pub sku: String,
    /// Units that can still be ordered.
    pub stock: i64,
    /// Units held by reservations of unpaid orders.
    pub reserved: i64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Held,
    Released,
    Committed,
}

impl ReservationStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Held => "held",
            ReservationStatus::Released => "released",
            ReservationStatus::Committed => "committed",
        }
    }

    pub(crate) fn parse(s: &str) -> ReservationStatus {
        match s {
            "released" => ReservationStatus::Released,
            "committed" => ReservationStatus::Committed,
            _ => ReservationStatus::Held,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReservedLine {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price: Money,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reservation {
    pub order_id: Uuid,
    pub status: ReservationStatus,
    pub items: Vec<ReservedLine>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a product with this sku already exists")]
    DuplicateSku,
    #[error("product {0} does not exist")]
    UnknownProduct(Uuid),
    #[error("product {product_id} has {available} in stock, {requested} requested")]
    InsufficientStock {
        product_id: Uuid,
        requested: i64,
        available: i64,
    },
    #[error("reservation is {0:?}")]
    WrongState(ReservationStatus),
    #[error("stored value is corrupt")]
    Corrupt,
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
}

impl StoreError {
    /// True when the database could not be reached in time (pool exhausted, connection lost):
    /// a 503 the client may retry, rather than a fault of ours.
    pub fn is_unavailable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            StoreError::Postgres(e) => matches!(
                e,
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
            ),
            _ => false,
        }
    }
}

/// The catalog, its stock and reservations, whatever the database.
///
/// The contract (checked for every backend by `tests/store_contract.rs`): skus are unique
/// ([`StoreError::DuplicateSku`]); listing is ordered by creation time, then id; stock never
/// goes negative and is never sold twice under any concurrency; a reservation takes every line
/// or none and exists at most once per order, so a retried `reserve` takes nothing again;
/// release gives stock back exactly once, commit keeps it taken, and neither undoes the other.
#[async_trait]
pub trait ProductStore: Send + Sync {
    async fn count(&self) -> Result<i64, StoreError>;

    async fn create(&self, new: NewProduct) -> Result<Product, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Product>, StoreError>;

    async fn list(
        &self,
        skip: u32,
        limit: u32,
        category: Option<String>,
    ) -> Result<Vec<Product>, StoreError>;

    /// Applies the given changes; `None` when the product does not exist.
    async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<Option<Product>, StoreError>;

    /// True when a product was deleted.
    async fn delete(&self, id: Uuid) -> Result<bool, StoreError>;

    async fn stock(&self, id: Uuid) -> Result<Option<StockLevel>, StoreError>;

    /// Reserves every line for `order_id`, or nothing. Returns the reservation and whether it
    /// was made now (`true`) or already existed (a retry: nothing is taken twice).
    /// A held reservation whose order never settles is released at `hold_until_ms`.
    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &ReservationLines,
        hold_until_ms: i64,
    ) -> Result<(Reservation, bool), StoreError>;

    /// Releases up to `limit` held reservations past their hold (their order was never
    /// created, or never settled); returns how many.
    async fn release_expired(&self, limit: u32) -> Result<usize, StoreError>;

    /// Gives a held reservation's stock back, exactly once. `None` if there is no reservation.
    async fn release(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError>;

    /// Marks a held reservation as sold (its order was paid): the stock stays taken for good.
    async fn commit(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError>;

    /// Readiness: the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the database at shutdown, after the last request.
    async fn close(&self);
}

const COLUMNS: &str =
    "id, name, description, price_cents, stock, sku, category, created_at, updated_at";

fn to_product(row: &Row<'_>) -> rusqlite::Result<Product> {
    let id: String = row.get(0)?;
    let time = |i: usize| -> rusqlite::Result<DateTime<Utc>> {
        Ok(DateTime::from_timestamp_millis(row.get(i)?).unwrap_or_default())
    };
    Ok(Product {
        id: id.parse().map_err(corrupt(0))?,
        name: row.get(1)?,
        description: row.get(2)?,
        price: Money::from_cents(row.get(3)?).map_err(corrupt(3))?,
        stock: row.get(4)?,
        sku: row.get(5)?,
        category: row.get(6)?,
        created_at: time(7)?,
        updated_at: time(8)?,
    })
}

fn unique_sku(e: rusqlite::Error) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::DuplicateSku
    } else {
        StoreError::Sqlite(e)
    }
}

#[derive(Debug, Clone)]
pub struct SqliteProductStore {
    db: Db,
}

impl SqliteProductStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<SqliteProductStore, DbError> {
        Ok(SqliteProductStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    async fn transition(
        &self,
        order_id: Uuid,
        to: ReservationStatus,
    ) -> Result<Option<Reservation>, StoreError> {
        self.db
            .write(move |tx| {
                let Some(mut reservation) = load_reservation(tx, order_id)? else {
                    return Ok(None);
                };
                if reservation.status == to {
                    return Ok(Some(reservation));
                }
                if reservation.status != ReservationStatus::Held {
                    return Err(StoreError::WrongState(reservation.status));
                }
                let now = now_ms();
                if to == ReservationStatus::Released {
                    let mut give_back = tx.prepare_cached(
                        "UPDATE products SET stock = stock + ?1, updated_at = ?2 WHERE id = ?3",
                    )?;
                    for line in &reservation.items {
                        give_back.execute(params![
                            line.quantity,
                            now,
                            line.product_id.to_string()
                        ])?;
                    }
                }
                tx.execute(
                    "UPDATE reservations SET status = ?1, updated_at = ?2 WHERE order_id = ?3",
                    params![to.as_str(), now, order_id.to_string()],
                )?;
                reservation.status = to;
                Ok(Some(reservation))
            })
            .await
    }
}

#[async_trait]
impl ProductStore for SqliteProductStore {
    async fn count(&self) -> Result<i64, StoreError> {
        self.db
            .read(|conn| Ok(conn.query_row("SELECT COUNT(*) FROM products", [], |r| r.get(0))?))
            .await
    }

    async fn create(&self, new: NewProduct) -> Result<Product, StoreError> {
        self.db
            .write(move |tx| {
                let now = now_ms();
                tx.query_row(
                    &format!(
                        "INSERT INTO products (id, name, description, price_cents, stock, sku, category, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) RETURNING {COLUMNS}"
                    ),
                    params![
                        Uuid::now_v7().to_string(),
                        new.name,
                        new.description,
                        new.price.cents(),
                        new.stock,
                        new.sku,
                        new.category,
                        now
                    ],
                    to_product,
                )
                .map_err(unique_sku)
            })
            .await
    }

    async fn get(&self, id: Uuid) -> Result<Option<Product>, StoreError> {
        self.db
            .read(move |conn| {
                let mut q =
                    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM products WHERE id = ?1"))?;
                Ok(q.query_row([id.to_string()], to_product).optional()?)
            })
            .await
    }

    async fn list(
        &self,
        skip: u32,
        limit: u32,
        category: Option<String>,
    ) -> Result<Vec<Product>, StoreError> {
        self.db
            .read(move |conn| {
                let mut q = conn.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM products WHERE (?1 IS NULL OR category = ?1)
                     ORDER BY created_at, id LIMIT ?2 OFFSET ?3"
                ))?;
                let products = q
                    .query_map(params![category, limit, skip], to_product)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(products)
            })
            .await
    }

    async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<Option<Product>, StoreError> {
        self.db
            .write(move |tx| {
                tx.query_row(
                    &format!(
                        "UPDATE products SET
                            name = COALESCE(?1, name),
                            description = COALESCE(?2, description),
                            price_cents = COALESCE(?3, price_cents),
                            stock = COALESCE(?4, stock),
                            sku = COALESCE(?5, sku),
                            category = COALESCE(?6, category),
                            updated_at = ?7
                         WHERE id = ?8 RETURNING {COLUMNS}"
                    ),
                    params![
                        changes.name,
                        changes.description,
                        changes.price.map(Money::cents),
                        changes.stock,
                        changes.sku,
                        changes.category,
                        now_ms(),
                        id.to_string()
                    ],
                    to_product,
                )
                .optional()
                .map_err(unique_sku)
            })
            .await
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        self.db
            .write(move |tx| {
                Ok(tx.execute("DELETE FROM products WHERE id = ?1", [id.to_string()])? > 0)
            })
            .await
    }

    async fn stock(&self, id: Uuid) -> Result<Option<StockLevel>, StoreError> {
        self.db
            .read(move |conn| {
                let mut q = conn.prepare_cached(
                    "SELECT p.id, p.sku, p.stock,
                            COALESCE((SELECT SUM(ri.quantity) FROM reservation_items ri
                                      JOIN reservations r ON r.order_id = ri.order_id
                                      WHERE ri.product_id = p.id AND r.status = 'held'), 0)
                     FROM products p WHERE p.id = ?1",
                )?;
                let level = q
                    .query_row([id.to_string()], |row| {
                        let id: String = row.get(0)?;
                        Ok(StockLevel {
                            product_id: id.parse().map_err(corrupt(0))?,
                            sku: row.get(1)?,
                            stock: row.get(2)?,
                            reserved: row.get(3)?,
                        })
                    })
                    .optional()?;
                Ok(level)
            })
            .await
    }

    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &ReservationLines,
        hold_until_ms: i64,
    ) -> Result<(Reservation, bool), StoreError> {
        let lines = lines.clone();
        self.db
            .write(move |tx| {
                let now = now_ms();
                let order = order_id.to_string();
                let claimed = tx.execute(
                    "INSERT INTO reservations (order_id, status, created_at, updated_at, expires_at)
                     VALUES (?1, 'held', ?2, ?2, ?3) ON CONFLICT (order_id) DO NOTHING",
                    params![order, now, hold_until_ms],
                )?;
                if claimed == 0 {
                    let existing = load_reservation(tx, order_id)?.ok_or(StoreError::Corrupt)?;
                    return Ok((existing, false));
                }
                let mut take = tx.prepare_cached(
                    "UPDATE products SET stock = stock - ?1, updated_at = ?2 WHERE id = ?3 AND stock >= ?1 RETURNING price_cents",
                )?;
                let mut record = tx.prepare_cached(
                    "INSERT INTO reservation_items (order_id, product_id, quantity, unit_price_cents) VALUES (?1, ?2, ?3, ?4)",
                )?;
                let mut reserved = Vec::with_capacity(lines.lines().len());
                for (product_id, quantity) in lines.lines() {
                    let product = product_id.to_string();
                    let price: Option<i64> =
                        take.query_row(params![quantity, now, product], |r| r.get(0)).optional()?;
                    let Some(price) = price else {
                        // Returning an error rolls back the reservation and every line taken so far.
                        let available: Option<i64> = tx
                            .query_row("SELECT stock FROM products WHERE id = ?1", [&product], |r| r.get(0))
                            .optional()?;
                        return Err(match available {
                            None => StoreError::UnknownProduct(*product_id),
                            Some(available) => StoreError::InsufficientStock {
                                product_id: *product_id,
                                requested: *quantity,
                                available,
                            },
                        });
                    };
                    record.execute(params![order, product, quantity, price])?;
                    reserved.push(ReservedLine {
                        product_id: *product_id,
                        quantity: *quantity,
                        unit_price: Money::from_cents(price).map_err(|_| StoreError::Corrupt)?,
                    });
                }
                Ok((Reservation { order_id, status: ReservationStatus::Held, items: reserved }, true))
            })
            .await
    }

    async fn release_expired(&self, limit: u32) -> Result<usize, StoreError> {
        let due: Vec<String> = self
            .db
            .read(move |conn| {
                Ok::<_, StoreError>(
                    conn.prepare_cached(
                        "SELECT order_id FROM reservations WHERE status = 'held' AND expires_at <= ?1 LIMIT ?2",
                    )?
                    .query_map(params![now_ms(), limit], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?,
                )
            })
            .await?;
        let mut released = 0;
        for order in due {
            let Ok(order_id) = order.parse::<Uuid>() else {
                continue;
            };
            match self.release(order_id).await {
                Ok(Some(_)) => released += 1,
                Ok(None) | Err(StoreError::WrongState(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(released)
    }

    async fn release(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError> {
        self.transition(order_id, ReservationStatus::Released).await
    }

    async fn commit(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError> {
        self.transition(order_id, ReservationStatus::Committed)
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    async fn close(&self) {
        self.db.close().await;
    }
}

fn load_reservation(conn: &Connection, order_id: Uuid) -> Result<Option<Reservation>, StoreError> {
    let order = order_id.to_string();
    let status: Option<String> = conn
        .prepare_cached("SELECT status FROM reservations WHERE order_id = ?1")?
        .query_row([&order], |r| r.get(0))
        .optional()?;
    let Some(status) = status else {
        return Ok(None);
    };
    let mut q = conn.prepare_cached(
        "SELECT product_id, quantity, unit_price_cents FROM reservation_items WHERE order_id = ?1 ORDER BY product_id",
    )?;
    let items = q
        .query_map([&order], |row| {
            let product: String = row.get(0)?;
            Ok(ReservedLine {
                product_id: product.parse().map_err(corrupt(0))?,
                quantity: row.get(1)?,
                unit_price: Money::from_cents(row.get(2)?).map_err(corrupt(2))?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Reservation {
        order_id,
        status: ReservationStatus::parse(&status),
        items,
    }))
}
