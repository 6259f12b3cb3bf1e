//! Products, stock and reservations: the [`ProductStore`] trait the API, the demo seeding and
//! the reservation sweeper use, and its SQLite implementation ([`crate::pg`] has the
//! PostgreSQL one, feature `postgres`).
//!
//! Stock is two figures per product: `on_hand` (on the shelf, what an operator counts) and
//! `reserved` (held for unpaid orders); what can be sold is their difference. Reserving adds to
//! `reserved` with a conditional `UPDATE ... WHERE on_hand - reserved >= ?` inside a write
//! transaction, never read-then-write, and `CHECK (0 <= reserved <= on_hand)` is the backstop.
//! A reservation and its stock changes commit together, so a reservation either holds all of
//! its lines or does not exist.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, corrupt, is_unique_violation, now_ms};
use kit::page::{BadCursor, Cursor, Page, PageRequest};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use serde::ser::SerializeStruct as _;
use uuid::Uuid;

use crate::domain::{MAX_STOCK, ReservationLines};

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
    (
        3,
        "stock on hand and reserved; the attempt holding a reservation",
        // `stock` was what could still be sold, held units already taken out of it: on hand is
        // that plus what held reservations have. SQLite cannot add a table CHECK to an existing
        // table, hence the rebuild.
        "CREATE TABLE products_v3 (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            description TEXT NOT NULL,
            price_cents INTEGER NOT NULL CHECK (price_cents > 0),
            on_hand INTEGER NOT NULL CHECK (on_hand >= 0),
            reserved INTEGER NOT NULL CHECK (reserved >= 0 AND reserved <= on_hand),
            sku TEXT NOT NULL UNIQUE,
            category TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        INSERT INTO products_v3
            SELECT p.id, p.name, p.description, p.price_cents, p.stock + COALESCE(h.held, 0),
                   COALESCE(h.held, 0), p.sku, p.category, p.created_at, p.updated_at
            FROM products p LEFT JOIN
                (SELECT ri.product_id AS id, SUM(ri.quantity) AS held FROM reservation_items ri
                 JOIN reservations r ON r.order_id = ri.order_id
                 WHERE r.status = 'held' GROUP BY ri.product_id) h ON h.id = p.id;
        DROP TABLE products;
        ALTER TABLE products_v3 RENAME TO products;
        CREATE INDEX products_category ON products (category, created_at);
        CREATE INDEX products_created ON products (created_at, id);
        ALTER TABLE reservations ADD COLUMN attempt TEXT;",
    ),
    (
        4,
        "settled reservations found by age, to be pruned",
        "CREATE INDEX reservations_settled ON reservations (status, updated_at);",
    ),
];

/// A product's stock: on the shelf, and held for unpaid orders. Answered with `stock` and
/// `available` (what can still be ordered; `stock` is the seed's name for it) besides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stock {
    pub on_hand: i64,
    pub reserved: i64,
}

impl Stock {
    pub fn available(self) -> i64 {
        self.on_hand - self.reserved
    }
}

impl Serialize for Stock {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Stock", 4)?;
        s.serialize_field("stock", &self.available())?;
        s.serialize_field("on_hand", &self.on_hand)?;
        s.serialize_field("reserved", &self.reserved)?;
        s.serialize_field("available", &self.available())?;
        s.end()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Product {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub price: Money,
    #[serde(flatten)]
    pub stock: Stock,
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
    pub on_hand: i64,
    pub sku: String,
    pub category: String,
}

/// Which products a catalog page lists: one category, and those whose name, SKU or
/// description contain a text (case-insensitive for ASCII letters, as SQLite's `lower`).
#[derive(Debug, Clone, Default)]
pub struct CatalogFilter {
    pub category: Option<String>,
    pub search: Option<String>,
}

impl CatalogFilter {
    /// The search text as the stores compare it: lower-cased; `None` when there is none.
    pub fn search_text(&self) -> Option<String> {
        self.search
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_ascii_lowercase)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ProductChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price: Option<Money>,
    /// The physical count; refused below what is reserved ([`StoreError::BelowReserved`]).
    pub on_hand: Option<i64>,
    pub sku: Option<String>,
    pub category: Option<String>,
}

/// How an operator changes a product's stock on hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockChange {
    /// The shelf was counted: this many.
    Set(i64),
    /// Goods came in (positive) or left other than by sale (negative).
    Adjust(i64),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StockLevel {
    pub product_id: Uuid,
    pub sku: String,
    #[serde(flatten)]
    pub stock: Stock,
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
    /// When a held reservation is given back if its order never settles; `None`: never.
    pub expires_at: Option<DateTime<Utc>>,
    pub items: Vec<ReservedLine>,
}

/// What a reservation request asks besides its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// Held stock goes back at this time (ms since the epoch) unless settled before.
    pub until_ms: i64,
    /// Names the caller's attempt, so that its own clean-up ([`ProductStore::release`] with
    /// this attempt) cannot release the reservation once a later attempt holds it.
    pub attempt: Option<Uuid>,
    /// The caller has no order for this id yet and will create one on this reservation: a held
    /// one passes to this attempt (its deadline extended to `until_ms`), a released one is
    /// taken again, all or nothing. Without it, an existing reservation is returned as it is.
    pub renew: bool,
}

impl Hold {
    /// A hold until `until_ms`, no attempt named, existing reservations returned as they are.
    pub fn until(until_ms: i64) -> Hold {
        Hold {
            until_ms,
            attempt: None,
            renew: false,
        }
    }
}

/// Which reservations a release applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseIf {
    /// Any held reservation (its order was cancelled).
    Held,
    /// Only while the given attempt holds it (that attempt failed and cleans up after itself).
    HeldBy(Uuid),
    /// Only while its deadline is at or before this time (the sweeper).
    ExpiredBy(i64),
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
    #[error(
        "product {product_id} has {reserved} held for unpaid orders; on hand cannot be {on_hand}"
    )]
    BelowReserved {
        product_id: Uuid,
        reserved: i64,
        on_hand: i64,
    },
    #[error("stock on hand must stay between 0 and {MAX_STOCK}")]
    StockOutOfRange,
    #[error("reservation is {0:?}")]
    WrongState(ReservationStatus),
    #[error(transparent)]
    BadCursor(#[from] BadCursor),
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
            StoreError::Postgres(e) => kit::pg::is_out_of_reach(e),
            _ => false,
        }
    }
}

/// The on-hand figure a change of `product_id`'s stock leads to, if it stays in range and
/// covers what is reserved.
pub(crate) fn changed_on_hand(
    product_id: Uuid,
    current: Stock,
    change: StockChange,
) -> Result<i64, StoreError> {
    let on_hand = match change {
        StockChange::Set(n) => n,
        StockChange::Adjust(d) => current
            .on_hand
            .checked_add(d)
            .ok_or(StoreError::StockOutOfRange)?,
    };
    if !(0..=MAX_STOCK).contains(&on_hand) {
        return Err(StoreError::StockOutOfRange);
    }
    if on_hand < current.reserved {
        return Err(StoreError::BelowReserved {
            product_id,
            reserved: current.reserved,
            on_hand,
        });
    }
    Ok(on_hand)
}

pub(crate) fn expiry(ms: i64) -> Option<DateTime<Utc>> {
    if ms == i64::MAX {
        None
    } else {
        DateTime::from_timestamp_millis(ms)
    }
}

/// The catalog, its stock and reservations, whatever the database.
///
/// The contract (checked for every backend by `tests/store_contract.rs`): skus are unique
/// ([`StoreError::DuplicateSku`]); listing is ordered by creation time, then id; available
/// stock never goes negative and is never sold twice under any concurrency; on hand never goes
/// below what is reserved; a reservation takes every line or none and exists at most once per
/// order, so a retried `reserve` takes nothing again (unless it renews a released one); release
/// gives stock back exactly once, commit takes it off the shelf, and neither undoes the other.
#[async_trait]
pub trait ProductStore: Send + Sync {
    async fn count(&self) -> Result<i64, StoreError>;

    /// Reservations held now, and the units they hold (the sum of every product's `reserved`).
    async fn held(&self) -> Result<(i64, i64), StoreError>;

    async fn create(&self, new: NewProduct) -> Result<Product, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Product>, StoreError>;

    /// A page of the catalog (of one category, matching a search), oldest first, ties by id.
    async fn list(
        &self,
        page: &PageRequest,
        filter: &CatalogFilter,
    ) -> Result<Page<Product>, StoreError>;

    /// Applies the given changes; `None` when the product does not exist.
    async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<Option<Product>, StoreError>;

    /// True when a product was deleted.
    async fn delete(&self, id: Uuid) -> Result<bool, StoreError>;

    async fn stock(&self, id: Uuid) -> Result<Option<StockLevel>, StoreError>;

    /// Sets or adjusts stock on hand; `None` when the product does not exist.
    async fn change_stock(
        &self,
        id: Uuid,
        change: StockChange,
    ) -> Result<Option<StockLevel>, StoreError>;

    /// Reserves every line for `order_id`, or nothing. Returns the reservation and whether
    /// stock was taken now (`true`: made now, or renewed from released) or not (a retry).
    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &ReservationLines,
        hold: Hold,
    ) -> Result<(Reservation, bool), StoreError>;

    /// Releases up to `limit` held reservations past their hold (their order was never
    /// created, or never settled); returns how many.
    async fn release_expired(&self, limit: u32) -> Result<usize, StoreError>;

    /// Gives a held reservation's stock back, exactly once, if `only` allows; otherwise
    /// returns it unchanged. `None` if there is no reservation.
    async fn release(
        &self,
        order_id: Uuid,
        only: ReleaseIf,
    ) -> Result<Option<Reservation>, StoreError>;

    /// Marks a held reservation as sold (its order was paid): the units leave the shelf.
    async fn commit(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError>;

    /// Deletes up to `limit` reservations that settled (sold or released) before
    /// `settled_before_ms`, with their lines; returns how many. Stock is untouched: a settled
    /// reservation no longer counts in it.
    async fn prune_settled(&self, settled_before_ms: i64, limit: u32) -> Result<usize, StoreError>;

    /// Readiness: the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the database at shutdown, after the last request.
    async fn close(&self);
}

/// Reservations released per call while draining.
const RELEASE_BATCH: u32 = 500;

/// Releases every reservation that is due, in batches, until none is left or `within` has
/// passed (the sweep interval: the next sweep goes on). A backlog of any size drains, rather
/// than a fixed number per sweep falling behind a flood of abandoned orders.
pub async fn release_all_due(
    store: &dyn ProductStore,
    within: std::time::Duration,
) -> Result<usize, StoreError> {
    let deadline = std::time::Instant::now() + within;
    let mut released = 0;
    loop {
        let n = store.release_expired(RELEASE_BATCH).await?;
        released += n;
        // A short batch means nothing more was due (a reservation settled meanwhile is left
        // to the next sweep, which finds it no longer held).
        if n < RELEASE_BATCH as usize || std::time::Instant::now() >= deadline {
            return Ok(released);
        }
    }
}

/// Deletes every reservation that settled before `settled_before_ms`, in batches, until none is
/// left or `within` has passed.
pub async fn prune_all_settled(
    store: &dyn ProductStore,
    settled_before_ms: i64,
    within: std::time::Duration,
) -> Result<usize, StoreError> {
    let deadline = std::time::Instant::now() + within;
    let mut pruned = 0;
    loop {
        let n = store
            .prune_settled(settled_before_ms, RELEASE_BATCH)
            .await?;
        pruned += n;
        if n < RELEASE_BATCH as usize || std::time::Instant::now() >= deadline {
            return Ok(pruned);
        }
    }
}

const COLUMNS: &str =
    "id, name, description, price_cents, on_hand, reserved, sku, category, created_at, updated_at";

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
        stock: Stock {
            on_hand: row.get(4)?,
            reserved: row.get(5)?,
        },
        sku: row.get(6)?,
        category: row.get(7)?,
        created_at: time(8)?,
        updated_at: time(9)?,
    })
}

fn unique_sku(e: rusqlite::Error) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::DuplicateSku
    } else {
        StoreError::Sqlite(e)
    }
}

fn stock_of(conn: &Connection, id: Uuid) -> Result<Option<StockLevel>, StoreError> {
    let mut q =
        conn.prepare_cached("SELECT id, sku, on_hand, reserved FROM products WHERE id = ?1")?;
    let level = q
        .query_row([id.to_string()], |row| {
            let id: String = row.get(0)?;
            Ok(StockLevel {
                product_id: id.parse().map_err(corrupt(0))?,
                sku: row.get(1)?,
                stock: Stock {
                    on_hand: row.get(2)?,
                    reserved: row.get(3)?,
                },
            })
        })
        .optional()?;
    Ok(level)
}

/// Takes every line for `order` (whose reservation row exists) at the current price, in the
/// lines' product id order; an error leaves the caller's transaction to roll back.
fn take_lines(
    tx: &Connection,
    order: &str,
    lines: &ReservationLines,
    now: i64,
) -> Result<Vec<ReservedLine>, StoreError> {
    let mut take = tx.prepare_cached(
        "UPDATE products SET reserved = reserved + ?1, updated_at = ?2
         WHERE id = ?3 AND on_hand - reserved >= ?1 RETURNING price_cents",
    )?;
    let mut record = tx.prepare_cached(
        "INSERT INTO reservation_items (order_id, product_id, quantity, unit_price_cents) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut reserved = Vec::with_capacity(lines.lines().len());
    for (product_id, quantity) in lines.lines() {
        let product = product_id.to_string();
        let price: Option<i64> = take
            .query_row(params![quantity, now, product], |r| r.get(0))
            .optional()?;
        let Some(price) = price else {
            let available: Option<i64> = tx
                .query_row(
                    "SELECT on_hand - reserved FROM products WHERE id = ?1",
                    [&product],
                    |r| r.get(0),
                )
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
    Ok(reserved)
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

    /// Moves a held reservation to `to` when `only` allows: (the reservation, whether it moved).
    async fn transition(
        &self,
        order_id: Uuid,
        to: ReservationStatus,
        only: ReleaseIf,
    ) -> Result<Option<(Reservation, bool)>, StoreError> {
        self.db
            .write(move |tx| {
                let Some((mut reservation, attempt, expires_at)) = load_reservation(tx, order_id)?
                else {
                    return Ok(None);
                };
                if reservation.status == to {
                    return Ok(Some((reservation, false)));
                }
                if reservation.status != ReservationStatus::Held {
                    return Err(StoreError::WrongState(reservation.status));
                }
                let applies = match only {
                    ReleaseIf::Held => true,
                    ReleaseIf::HeldBy(a) => attempt == Some(a),
                    ReleaseIf::ExpiredBy(now) => expires_at <= now,
                };
                if !applies {
                    return Ok(Some((reservation, false)));
                }
                let now = now_ms();
                // Released units go back to what can be sold; sold ones leave the shelf too.
                let settle = if to == ReservationStatus::Released {
                    "UPDATE products SET reserved = reserved - ?1, updated_at = ?2 WHERE id = ?3"
                } else {
                    "UPDATE products SET reserved = reserved - ?1, on_hand = on_hand - ?1,
                     updated_at = ?2 WHERE id = ?3"
                };
                let mut settle = tx.prepare_cached(settle)?;
                for line in &reservation.items {
                    settle.execute(params![line.quantity, now, line.product_id.to_string()])?;
                }
                tx.execute(
                    "UPDATE reservations SET status = ?1, updated_at = ?2 WHERE order_id = ?3",
                    params![to.as_str(), now, order_id.to_string()],
                )?;
                reservation.status = to;
                Ok(Some((reservation, true)))
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

    async fn held(&self) -> Result<(i64, i64), StoreError> {
        self.db
            .read(|conn| {
                let reservations = conn.query_row(
                    "SELECT COUNT(*) FROM reservations WHERE status = 'held'",
                    [],
                    |r| r.get(0),
                )?;
                let units =
                    conn.query_row("SELECT COALESCE(SUM(reserved), 0) FROM products", [], |r| {
                        r.get(0)
                    })?;
                Ok((reservations, units))
            })
            .await
    }

    async fn create(&self, new: NewProduct) -> Result<Product, StoreError> {
        self.db
            .write(move |tx| {
                let now = now_ms();
                tx.query_row(
                    &format!(
                        "INSERT INTO products (id, name, description, price_cents, on_hand, reserved, sku, category, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?8) RETURNING {COLUMNS}"
                    ),
                    params![
                        Uuid::now_v7().to_string(),
                        new.name,
                        new.description,
                        new.price.cents(),
                        new.on_hand,
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
        // The hottest read of the shop (every product page): on the caller's thread.
        self.db
            .read_now(move |conn| {
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM products WHERE id = ?1"))?
                    .query_row([id.to_string()], to_product)
                    .optional()
            })
            .await
    }

    async fn list(
        &self,
        page: &PageRequest,
        filter: &CatalogFilter,
    ) -> Result<Page<Product>, StoreError> {
        let ((after_at, after_id), skip) = page.row_start()?;
        let limit = page.limit;
        let (category, search) = (filter.category.clone(), filter.search_text());
        let rows = self
            .db
            .read(move |conn| {
                let mut q = conn.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM products WHERE (?1 IS NULL OR category = ?1)
                     AND (?6 IS NULL OR instr(lower(name || ' ' || sku || ' ' || description), ?6) > 0)
                     AND (created_at, id) > (?2, ?3)
                     ORDER BY created_at, id LIMIT ?4 OFFSET ?5"
                ))?;
                let products = q
                    .query_map(
                        params![category, after_at, after_id.to_string(), limit + 1, skip, search],
                        to_product,
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StoreError>(products)
            })
            .await?;
        Ok(Page::from_rows(rows, limit, |p| {
            Cursor::after_row(p.created_at.timestamp_millis(), p.id)
        }))
    }

    async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<Option<Product>, StoreError> {
        self.db
            .write(move |tx| {
                if let Some(on_hand) = changes.on_hand
                    && let Some(level) = stock_of(tx, id)?
                    && on_hand < level.stock.reserved
                {
                    return Err(StoreError::BelowReserved {
                        product_id: id,
                        reserved: level.stock.reserved,
                        on_hand,
                    });
                }
                tx.query_row(
                    &format!(
                        "UPDATE products SET
                            name = COALESCE(?1, name),
                            description = COALESCE(?2, description),
                            price_cents = COALESCE(?3, price_cents),
                            on_hand = COALESCE(?4, on_hand),
                            sku = COALESCE(?5, sku),
                            category = COALESCE(?6, category),
                            updated_at = ?7
                         WHERE id = ?8 RETURNING {COLUMNS}"
                    ),
                    params![
                        changes.name,
                        changes.description,
                        changes.price.map(Money::cents),
                        changes.on_hand,
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
        self.db.read(move |conn| stock_of(conn, id)).await
    }

    async fn change_stock(
        &self,
        id: Uuid,
        change: StockChange,
    ) -> Result<Option<StockLevel>, StoreError> {
        // Read and write in one write transaction: SQLite has one writer, so nothing reserves
        // in between.
        self.db
            .write(move |tx| {
                let Some(mut level) = stock_of(tx, id)? else {
                    return Ok(None);
                };
                let on_hand = changed_on_hand(id, level.stock, change)?;
                tx.execute(
                    "UPDATE products SET on_hand = ?1, updated_at = ?2 WHERE id = ?3",
                    params![on_hand, now_ms(), id.to_string()],
                )?;
                level.stock.on_hand = on_hand;
                Ok(Some(level))
            })
            .await
    }

    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &ReservationLines,
        hold: Hold,
    ) -> Result<(Reservation, bool), StoreError> {
        let lines = lines.clone();
        self.db
            .write(move |tx| {
                let now = now_ms();
                let order = order_id.to_string();
                let attempt = hold.attempt.map(|a| a.to_string());
                let claimed = tx.execute(
                    "INSERT INTO reservations (order_id, status, created_at, updated_at, expires_at, attempt)
                     VALUES (?1, 'held', ?2, ?2, ?3, ?4) ON CONFLICT (order_id) DO NOTHING",
                    params![order, now, hold.until_ms, attempt],
                )?;
                if claimed == 0 {
                    let (mut existing, _, expires_at) =
                        load_reservation(tx, order_id)?.ok_or(StoreError::Corrupt)?;
                    if !hold.renew || existing.status == ReservationStatus::Committed {
                        return Ok((existing, false));
                    }
                    let until = if existing.status == ReservationStatus::Held {
                        expires_at.max(hold.until_ms)
                    } else {
                        hold.until_ms
                    };
                    tx.execute(
                        "UPDATE reservations SET status = 'held', attempt = ?1, expires_at = ?2, updated_at = ?3
                         WHERE order_id = ?4",
                        params![attempt, until, now, order],
                    )?;
                    existing.expires_at = expiry(until);
                    if existing.status == ReservationStatus::Held {
                        return Ok((existing, false));
                    }
                    // Released: taken again as if new; a shortfall rolls the renewal back too.
                    tx.execute("DELETE FROM reservation_items WHERE order_id = ?1", [&order])?;
                    existing.items = take_lines(tx, &order, &lines, now)?;
                    existing.status = ReservationStatus::Held;
                    return Ok((existing, true));
                }
                let items = take_lines(tx, &order, &lines, now)?;
                Ok((
                    Reservation {
                        order_id,
                        status: ReservationStatus::Held,
                        expires_at: expiry(hold.until_ms),
                        items,
                    },
                    true,
                ))
            })
            .await
    }

    async fn prune_settled(&self, settled_before_ms: i64, limit: u32) -> Result<usize, StoreError> {
        self.db
            .write(move |tx| {
                let due: Vec<String> = tx
                    .prepare_cached(
                        "SELECT order_id FROM reservations
                         WHERE status IN ('released', 'committed') AND updated_at < ?1 LIMIT ?2",
                    )?
                    .query_map(params![settled_before_ms, limit], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for order_id in &due {
                    tx.execute(
                        "DELETE FROM reservation_items WHERE order_id = ?1",
                        [order_id],
                    )?;
                    tx.execute("DELETE FROM reservations WHERE order_id = ?1", [order_id])?;
                }
                Ok(due.len())
            })
            .await
    }

    async fn release_expired(&self, limit: u32) -> Result<usize, StoreError> {
        let now = now_ms();
        let due: Vec<String> = self
            .db
            .read(move |conn| {
                Ok::<_, StoreError>(
                    conn.prepare_cached(
                        "SELECT order_id FROM reservations WHERE status = 'held' AND expires_at <= ?1 LIMIT ?2",
                    )?
                    .query_map(params![now, limit], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?,
                )
            })
            .await?;
        let mut released = 0;
        for order in due {
            let Ok(order_id) = order.parse::<Uuid>() else {
                continue;
            };
            // Re-checked in the write: a retry may have renewed the hold meanwhile.
            match self
                .transition(
                    order_id,
                    ReservationStatus::Released,
                    ReleaseIf::ExpiredBy(now),
                )
                .await
            {
                Ok(Some((_, true))) => released += 1,
                Ok(_) | Err(StoreError::WrongState(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(released)
    }

    async fn release(
        &self,
        order_id: Uuid,
        only: ReleaseIf,
    ) -> Result<Option<Reservation>, StoreError> {
        Ok(self
            .transition(order_id, ReservationStatus::Released, only)
            .await?
            .map(|(r, _)| r))
    }

    async fn commit(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError> {
        Ok(self
            .transition(order_id, ReservationStatus::Committed, ReleaseIf::Held)
            .await?
            .map(|(r, _)| r))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    async fn close(&self) {
        self.db.close().await;
    }
}

/// The reservation of `order_id` with its lines (ordered by product id), the attempt holding
/// it and its deadline.
fn load_reservation(
    conn: &Connection,
    order_id: Uuid,
) -> Result<Option<(Reservation, Option<Uuid>, i64)>, StoreError> {
    let order = order_id.to_string();
    let head: Option<(String, Option<String>, i64)> = conn
        .prepare_cached("SELECT status, attempt, expires_at FROM reservations WHERE order_id = ?1")?
        .query_row([&order], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((status, attempt, expires_at)) = head else {
        return Ok(None);
    };
    let attempt = attempt
        .map(|a| a.parse::<Uuid>().map_err(|_| StoreError::Corrupt))
        .transpose()?;
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
    Ok(Some((
        Reservation {
            order_id,
            status: ReservationStatus::parse(&status),
            expires_at: expiry(expires_at),
            items,
        },
        attempt,
        expires_at,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_sweep_releases_a_backlog_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/products.db", dir.path().display());
        let store = SqliteProductStore::open(&url, &Default::default())
            .await
            .unwrap();
        let product = store
            .create(NewProduct {
                name: "Chai".into(),
                description: String::new(),
                price: Money::from_cents(100).unwrap(),
                on_hand: 10_000,
                sku: "CHAI-1".into(),
                category: "tea".into(),
            })
            .await
            .unwrap();
        let lines = ReservationLines::parse(&[(product.id, 1)]).unwrap();
        let backlog = 3 * RELEASE_BATCH as usize + 7;
        for _ in 0..backlog {
            let past = Hold {
                until_ms: now_ms() - 1_000,
                attempt: None,
                renew: false,
            };
            store.reserve(Uuid::now_v7(), &lines, past).await.unwrap();
        }
        let held = store.get(product.id).await.unwrap().unwrap().stock;
        assert_eq!(held.reserved, backlog as i64);
        let released = release_all_due(&store, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(released, backlog);
        let after = store.get(product.id).await.unwrap().unwrap().stock;
        assert_eq!((after.on_hand, after.reserved), (10_000, 0));
    }

    #[test]
    fn stock_changes_stay_in_range() {
        let held = Stock {
            on_hand: 10,
            reserved: 4,
        };
        let id = Uuid::nil();
        assert_eq!(changed_on_hand(id, held, StockChange::Set(7)).unwrap(), 7);
        assert_eq!(
            changed_on_hand(id, held, StockChange::Adjust(-3)).unwrap(),
            7
        );
        assert_eq!(
            changed_on_hand(id, held, StockChange::Adjust(5)).unwrap(),
            15
        );
        assert!(matches!(
            changed_on_hand(id, held, StockChange::Set(3)),
            Err(StoreError::BelowReserved {
                reserved: 4,
                on_hand: 3,
                ..
            })
        ));
        for out in [
            StockChange::Set(-1),
            StockChange::Set(MAX_STOCK + 1),
            StockChange::Adjust(-11),
            StockChange::Adjust(MAX_STOCK),
            StockChange::Adjust(i64::MAX),
        ] {
            assert!(
                matches!(
                    changed_on_hand(id, held, out),
                    Err(StoreError::StockOutOfRange)
                ),
                "{out:?}"
            );
        }
    }

    #[test]
    fn stock_is_answered_with_what_can_be_sold() {
        let json = serde_json::to_value(Stock {
            on_hand: 9,
            reserved: 2,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"stock": 7, "on_hand": 9, "reserved": 2, "available": 7})
        );
    }
}
