//! Products, stock and reservations in PostgreSQL (feature `postgres`): the same contract as
//! the SQLite store, in the service's own schema.
//!
//! Money is BIGINT cents and times BIGINT milliseconds, exactly as in SQLite (a reservation's
//! `expires_at` may be "never", `i64::MAX`, which no TIMESTAMPTZ holds).
//!
//! Why reservations cannot oversell or double-reserve, at READ COMMITTED:
//! - Stock is only ever taken by `UPDATE products SET reserved = reserved + q WHERE id = $ AND
//!   on_hand - reserved >= q`. The row lock serialises writers of one product, and PostgreSQL
//!   re-checks the `WHERE` against the newest committed row once the lock is granted, so every
//!   taker sees the stock left by the one before. `CHECK (reserved <= on_hand)` is the
//!   backstop; operators' changes of on hand use the same conditional form.
//! - One reservation's lines are taken in ascending product id (`ReservationLines` is sorted
//!   by id, and UUIDs sort alike in Rust and PostgreSQL), as is stock given back on release:
//!   every transaction locks product rows in the same order, so they cannot deadlock.
//! - The reservation row (primary key `order_id`) is inserted first, in the same
//!   transaction. A concurrent reserve for the same order waits on that key; when the first
//!   commits it finds the row and returns the existing reservation, when it rolls back (short
//!   stock) the second proceeds on its own. All lines commit with the row or none do.
//! - Release, commit and a retry's renewal lock the reservation row (`FOR UPDATE`) before
//!   reading its status, so two of them for one order run one after the other and stock comes
//!   back, or is taken again, only once.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::DateTime;
use kit::Money;
use kit::config::PostgresSettings;
use kit::db::now_ms;
use kit::page::{Cursor, Page, PageRequest};
use kit::pg::batch::{BatchWrite, Batcher, Together};
use kit::pg::{Pg, PgError, PgStep, is_unique_violation};
use kit::server::BoxFuture;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use crate::domain::ReservationLines;
use crate::store::{
    CatalogFilter, Hold, NewProduct, Product, ProductChanges, ProductStore, ReleaseIf, Reservation,
    ReservationStatus, ReservedLine, Stock, StockChange, StockLevel, StoreError, changed_on_hand,
    expiry,
};

pub static PG_MIGRATIONS: &[PgStep] = &[
    (
        1,
        "catalog and reservations",
        "CREATE TABLE products (
        id UUID PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        price_cents BIGINT NOT NULL CHECK (price_cents > 0),
        stock BIGINT NOT NULL CHECK (stock >= 0),
        sku TEXT NOT NULL UNIQUE,
        category TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE INDEX products_category ON products (category, created_at, id);
    CREATE INDEX products_created ON products (created_at, id);
    -- One row per order: the primary key is what makes a second reservation impossible.
    CREATE TABLE reservations (
        order_id UUID PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('held', 'released', 'committed')),
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX reservations_held_expiry ON reservations (expires_at) WHERE status = 'held';
    -- No foreign key to products, as in SQLite: deleting a product keeps its sales history.
    CREATE TABLE reservation_items (
        order_id UUID NOT NULL REFERENCES reservations (order_id),
        product_id UUID NOT NULL,
        quantity BIGINT NOT NULL CHECK (quantity > 0),
        unit_price_cents BIGINT NOT NULL,
        PRIMARY KEY (order_id, product_id)
    );
    CREATE INDEX reservation_items_product ON reservation_items (product_id);",
    ),
    (
        2,
        "stock on hand and reserved; the attempt holding a reservation",
        // `stock` was what could still be sold, held units already taken out of it: on hand is
        // that plus what held reservations have.
        "ALTER TABLE products RENAME COLUMN stock TO on_hand;
        ALTER TABLE products ADD COLUMN reserved BIGINT NOT NULL DEFAULT 0;
        UPDATE products p SET on_hand = p.on_hand + h.held, reserved = h.held
            FROM (SELECT ri.product_id, SUM(ri.quantity)::BIGINT AS held FROM reservation_items ri
                  JOIN reservations r ON r.order_id = ri.order_id
                  WHERE r.status = 'held' GROUP BY ri.product_id) h
            WHERE h.product_id = p.id;
        ALTER TABLE products ADD CONSTRAINT products_reserved_on_hand
            CHECK (reserved >= 0 AND reserved <= on_hand);
        ALTER TABLE reservations ADD COLUMN attempt UUID;",
    ),
    (
        3,
        "settled reservations found by age, to be pruned",
        "CREATE INDEX reservations_settled ON reservations (status, updated_at);",
    ),
];

const PRODUCT_COLUMNS: &str =
    "id, name, description, price_cents, on_hand, reserved, sku, category, created_at, updated_at";

#[derive(Debug, Clone)]
pub struct PgProductStore {
    pg: Pg,
    reservations: Batcher<FreshReservation>,
}

fn money(cents: i64) -> Result<Money, StoreError> {
    Money::from_cents(cents).map_err(|_| StoreError::Corrupt)
}

fn to_product(row: &PgRow) -> Result<Product, StoreError> {
    let time = |i: usize| -> Result<_, sqlx::Error> {
        Ok(DateTime::from_timestamp_millis(row.try_get(i)?).unwrap_or_default())
    };
    Ok(Product {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        description: row.try_get(2)?,
        price: money(row.try_get(3)?)?,
        stock: Stock {
            on_hand: row.try_get(4)?,
            reserved: row.try_get(5)?,
        },
        sku: row.try_get(6)?,
        category: row.try_get(7)?,
        created_at: time(8)?,
        updated_at: time(9)?,
    })
}

fn unique_sku(e: sqlx::Error) -> StoreError {
    // The only unique columns are the fresh v7 id and the sku.
    if is_unique_violation(&e) {
        StoreError::DuplicateSku
    } else {
        StoreError::Postgres(e)
    }
}

async fn stock_of(conn: &mut PgConnection, id: Uuid) -> Result<Option<StockLevel>, StoreError> {
    let row = sqlx::query("SELECT id, sku, on_hand, reserved FROM products WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(StockLevel {
        product_id: row.try_get(0)?,
        sku: row.try_get(1)?,
        stock: Stock {
            on_hand: row.try_get(2)?,
            reserved: row.try_get(3)?,
        },
    }))
}

/// What the one-statement reservation found.
enum Fresh {
    /// Claimed and every line taken.
    Held(Reservation),
    /// Nothing claimed or taken: a product is unknown or short.
    Refused(StoreError),
    /// Nothing claimed or taken: this order has a reservation already (a retry).
    Exists,
}

/// A new order's reservation in one statement: claim the order id, lock the lines' products
/// in ascending id, and take every line only if every line is there. One round trip, committed
/// with the others of its batch ([`FreshReservation`]) or on its own; a much-ordered product's
/// row lock is held for the batch and its one WAL flush (with BEGIN … COMMIT per order it was
/// held across three round trips and a flush for every order).
///
/// All or nothing within one statement: `locked` takes the row locks (in id order, the order
/// every writer here uses) and reads the newest committed stock (READ COMMITTED re-reads a
/// row once its lock is granted); the claim is inserted only if every line is available, and
/// the lines are taken only if the claim was. `taken` updates rows this statement already
/// holds, so no one can have changed them in between; `CHECK (reserved <= on_hand)` stays the
/// backstop.
async fn reserve_fresh(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &ReservationLines,
    hold: Hold,
    now: i64,
) -> Result<Fresh, StoreError> {
    let (products, quantities): (Vec<Uuid>, Vec<i64>) = lines.lines().iter().copied().unzip();
    // Products are reached by primary key only (`= ANY`, a line's quantity by its product's
    // position): joined with the lines instead, the planner scanned the products table, and a
    // much-ordered product's page holds hundreds of dead row versions between prunings.
    let rows = sqlx::query(
        "WITH locked AS MATERIALIZED (
            SELECT p.id, p.on_hand - p.reserved AS available, ($3::bigint[])[array_position($2::uuid[], p.id)] AS quantity
            FROM products p WHERE p.id = ANY($2::uuid[])
            ORDER BY p.id FOR UPDATE
         ), claim AS (
            INSERT INTO reservations (order_id, status, created_at, updated_at, expires_at, attempt)
            SELECT $1, 'held', $4, $4, $5, $6
            WHERE (SELECT COUNT(*) = cardinality($2::uuid[]) AND COALESCE(bool_and(available >= quantity), FALSE) FROM locked)
            ON CONFLICT (order_id) DO NOTHING
            RETURNING order_id
         ), taken AS (
            UPDATE products p SET reserved = p.reserved + ($3::bigint[])[array_position($2::uuid[], p.id)], updated_at = $4
            WHERE p.id = ANY($2::uuid[]) AND EXISTS (SELECT 1 FROM claim)
            RETURNING p.id, p.price_cents
         ), items AS (
            INSERT INTO reservation_items (order_id, product_id, quantity, unit_price_cents)
            SELECT $1, t.id, ($3::bigint[])[array_position($2::uuid[], t.id)], t.price_cents FROM taken t
         )
         SELECT c.claimed, c.existed, l.id, l.available, t.price_cents
         FROM (SELECT (SELECT COUNT(*) FROM claim) AS claimed,
                      EXISTS (SELECT 1 FROM reservations r WHERE r.order_id = $1) AS existed) c
         LEFT JOIN locked l ON TRUE
         LEFT JOIN taken t ON t.id = l.id",
    )
    .bind(order_id)
    .bind(&products)
    .bind(&quantities)
    .bind(now)
    .bind(hold.until_ms)
    .bind(hold.attempt)
    .fetch_all(conn)
    .await?;
    // At least one row (the claim's outcome), then one per product found.
    let Some(first) = rows.first() else {
        return Err(StoreError::Corrupt);
    };
    let claimed = first.try_get::<i64, _>(0)? == 1;
    let existed: bool = first.try_get(1)?;
    // (product, available, price if taken): a handful of lines, searched in place.
    let mut found: Vec<(Uuid, i64, Option<i64>)> = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(id) = row.try_get::<Option<Uuid>, _>(2)? {
            found.push((id, row.try_get(3)?, row.try_get(4)?));
        }
    }
    let found_line = |product: &Uuid| found.iter().find(|(id, ..)| id == product);
    if claimed {
        return held(order_id, lines, hold, |product| {
            found_line(product).and_then(|(.., price)| *price)
        });
    }
    // The first line that cannot be had, as the transaction reported it.
    let shortfall = first_shortfall(lines, |product| {
        found_line(product).map(|(_, available, _)| *available)
    });
    // The statement's snapshot shows a reservation committed before it (a retry). One being
    // committed concurrently for the same order is not in the snapshot: its claim made ours
    // wait and then do nothing, so a claim skipped with every line available means the same.
    Ok(match shortfall {
        Some(e) if !existed => Fresh::Refused(e),
        _ => Fresh::Exists,
    })
}

/// A new order's reservation as one write of a batch (`kit::pg::batch`): its statement is all
/// or nothing by itself, and it locks its products in ascending id, as the batches need.
/// Batched, the reservations of a much-ordered product share one commit and take its row lock
/// once a batch (docs/benchmarks.md, "The PostgreSQL profile").
struct FreshReservation {
    order_id: Uuid,
    lines: ReservationLines,
    hold: Hold,
    now: i64,
}

impl BatchWrite for FreshReservation {
    /// A refusal or a corrupt row is the reservation's outcome; a database error aborts.
    type Output = Result<Fresh, StoreError>;

    fn lock_keys(&self) -> Option<(Uuid, Uuid)> {
        let lines = self.lines.lines();
        Some((lines.first()?.0, lines.last()?.0))
    }

    fn write<'c>(
        &'c self,
        conn: &'c mut PgConnection,
    ) -> BoxFuture<'c, Result<Self::Output, sqlx::Error>> {
        Box::pin(async move {
            match reserve_fresh(conn, self.order_id, &self.lines, self.hold, self.now).await {
                Err(StoreError::Postgres(e)) => Err(e),
                outcome => Ok(outcome),
            }
        })
    }

    /// The batch in two statements, whatever its size: one locks every product of the batch
    /// (ascending id) and finds which orders hold a reservation already; Rust decides each
    /// order in the batch's order ([`allot`]); one writes the claims, their lines and each
    /// product's new total. A much-ordered product's row is locked and written once a batch,
    /// not once an order.
    fn write_together<'c>(
        writes: &'c [&'c Self],
        conn: &'c mut PgConnection,
    ) -> BoxFuture<'c, Result<Together<Self::Output>, sqlx::Error>> {
        Box::pin(async move {
            match reserve_together(conn, writes).await {
                Err(StoreError::Postgres(e)) => Err(e),
                // A corrupt row: run alone, only the reservations that meet it fail.
                Err(_) => Ok(Together::EachAlone),
                Ok(outcome) => Ok(outcome),
            }
        })
    }
}

/// Each order of a batch decided in turn against the stock its products had when locked: the
/// outcome of running them one after another, in that order.
#[derive(Debug)]
enum Allotment {
    /// Every line can be had: the order claims its reservation and takes them.
    Take,
    /// A reservation exists for this order (a retry): nothing taken here.
    Exists,
    /// A line cannot be had (the first, in product id order): nothing taken.
    Refuse(StoreError),
}

/// A locked product: what it can still give and its price.
#[derive(Debug, Clone, Copy)]
struct Shelf {
    available: i64,
    price_cents: i64,
}

/// The first line (in product id order) that cannot be had, given what each product can still
/// give (`None`: no such product): the refusal of a reservation, alone or in a batch.
fn first_shortfall(
    lines: &ReservationLines,
    available: impl Fn(&Uuid) -> Option<i64>,
) -> Option<StoreError> {
    lines
        .lines()
        .iter()
        .find_map(|(product_id, requested)| match available(product_id) {
            None => Some(StoreError::UnknownProduct(*product_id)),
            Some(available) if available < *requested => Some(StoreError::InsufficientStock {
                product_id: *product_id,
                requested: *requested,
                available,
            }),
            Some(_) => None,
        })
}

/// A reservation just held for `order_id`: its lines at the prices their products had.
fn held(
    order_id: Uuid,
    lines: &ReservationLines,
    hold: Hold,
    price_cents: impl Fn(&Uuid) -> Option<i64>,
) -> Result<Fresh, StoreError> {
    let items = lines
        .lines()
        .iter()
        .map(|(product_id, quantity)| {
            Ok(ReservedLine {
                product_id: *product_id,
                quantity: *quantity,
                unit_price: money(price_cents(product_id).ok_or(StoreError::Corrupt)?)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Fresh::Held(Reservation {
        order_id,
        status: ReservationStatus::Held,
        expires_at: expiry(hold.until_ms),
        items,
    }))
}

/// Decides the batch's orders in turn; `shelves` loses what each taking order takes.
fn allot(
    orders: &[(Uuid, &ReservationLines)],
    existing: &HashSet<Uuid>,
    shelves: &mut HashMap<Uuid, Shelf>,
) -> Vec<Allotment> {
    // An order twice in one batch finds, the second time, what the first claimed.
    let mut claimed_here: HashSet<Uuid> = HashSet::new();
    orders
        .iter()
        .map(|(order_id, lines)| {
            if existing.contains(order_id) || claimed_here.contains(order_id) {
                return Allotment::Exists;
            }
            let shortfall = first_shortfall(lines, |product| {
                shelves.get(product).map(|shelf| shelf.available)
            });
            if let Some(refusal) = shortfall {
                return Allotment::Refuse(refusal);
            }
            for (product_id, quantity) in lines.lines() {
                if let Some(shelf) = shelves.get_mut(product_id) {
                    shelf.available -= quantity;
                }
            }
            claimed_here.insert(*order_id);
            Allotment::Take
        })
        .collect()
}

/// A batch of new reservations in two statements (see [`FreshReservation::write_together`]).
async fn reserve_together(
    conn: &mut PgConnection,
    writes: &[&FreshReservation],
) -> Result<Together<Result<Fresh, StoreError>>, StoreError> {
    let orders: Vec<Uuid> = writes.iter().map(|w| w.order_id).collect();
    let mut products: Vec<Uuid> = writes
        .iter()
        .flat_map(|w| w.lines.lines().iter().map(|(product, _)| *product))
        .collect();
    products.sort_unstable();
    products.dedup();
    // Products (a price) and existing reservations (none) in one round trip; the products by
    // primary key, locked in ascending id like every other writer's.
    let rows = sqlx::query(
        "SELECT p.id, p.available, p.price_cents FROM (
            SELECT id, on_hand - reserved AS available, price_cents FROM products
            WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE) p
         UNION ALL
         SELECT r.order_id, NULL, NULL FROM reservations r WHERE r.order_id = ANY($2::uuid[])",
    )
    .bind(&products)
    .bind(&orders)
    .fetch_all(&mut *conn)
    .await?;
    let mut shelves: HashMap<Uuid, Shelf> = HashMap::with_capacity(products.len());
    let mut existing: HashSet<Uuid> = HashSet::new();
    for row in &rows {
        let id: Uuid = row.try_get(0)?;
        match (
            row.try_get::<Option<i64>, _>(1)?,
            row.try_get::<Option<i64>, _>(2)?,
        ) {
            (Some(available), Some(price_cents)) => {
                shelves.insert(
                    id,
                    Shelf {
                        available,
                        price_cents,
                    },
                );
            }
            _ => {
                existing.insert(id);
            }
        }
    }
    let decided = allot(
        &writes
            .iter()
            .map(|w| (w.order_id, &w.lines))
            .collect::<Vec<_>>(),
        &existing,
        &mut shelves,
    );
    // `allot` lowers only what is available: the prices are those the products were locked at.
    let price_of = |product: &Uuid| shelves.get(product).map(|shelf| shelf.price_cents);
    let taking: Vec<&FreshReservation> = writes
        .iter()
        .zip(&decided)
        .filter(|(_, a)| matches!(a, Allotment::Take))
        .map(|(w, _)| *w)
        .collect();
    let mut claimed: HashSet<Uuid> = HashSet::new();
    if !taking.is_empty() {
        let mut line_orders = Vec::new();
        let mut line_products = Vec::new();
        let mut line_quantities = Vec::new();
        let mut line_prices = Vec::new();
        for w in &taking {
            for (product_id, quantity) in w.lines.lines() {
                line_orders.push(w.order_id);
                line_products.push(*product_id);
                line_quantities.push(*quantity);
                line_prices.push(price_of(product_id).ok_or(StoreError::Corrupt)?);
            }
        }
        let now = taking.iter().map(|w| w.now).max().unwrap_or_default();
        // Only the products some order takes get a new row version.
        let mut taken_products = line_products.clone();
        taken_products.sort_unstable();
        taken_products.dedup();
        // Lines and stock follow the claims actually inserted: a reservation committed by
        // another transaction since the first statement is skipped, and takes nothing here.
        let inserted: Vec<Uuid> = sqlx::query_scalar(
            "WITH claimed AS (
                INSERT INTO reservations (order_id, status, created_at, updated_at, expires_at, attempt)
                SELECT c.order_id, 'held', c.now, c.now, c.until_ms, c.attempt
                FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[]) AS c (order_id, now, until_ms, attempt)
                ON CONFLICT (order_id) DO NOTHING
                RETURNING order_id
             ), lines AS (
                SELECT l.order_id, l.product_id, l.quantity, l.price_cents
                FROM unnest($5::uuid[], $6::uuid[], $7::bigint[], $8::bigint[]) AS l (order_id, product_id, quantity, price_cents)
                WHERE l.order_id IN (SELECT order_id FROM claimed)
             ), items AS (
                INSERT INTO reservation_items (order_id, product_id, quantity, unit_price_cents)
                SELECT order_id, product_id, quantity, price_cents FROM lines
             ), taken AS (
                UPDATE products p
                SET reserved = p.reserved + (SELECT COALESCE(SUM(l.quantity), 0) FROM lines l WHERE l.product_id = p.id)::bigint,
                    updated_at = $9
                WHERE p.id = ANY($10::uuid[])
             )
             SELECT order_id FROM claimed",
        )
        .bind(taking.iter().map(|w| w.order_id).collect::<Vec<_>>())
        .bind(taking.iter().map(|w| w.now).collect::<Vec<_>>())
        .bind(taking.iter().map(|w| w.hold.until_ms).collect::<Vec<_>>())
        .bind(taking.iter().map(|w| w.hold.attempt).collect::<Vec<_>>())
        .bind(&line_orders)
        .bind(&line_products)
        .bind(&line_quantities)
        .bind(&line_prices)
        .bind(now)
        .bind(&taken_products)
        .fetch_all(&mut *conn)
        .await?;
        claimed.extend(inserted);
    }
    let skipped = taking.len().saturating_sub(claimed.len());
    if skipped > 0 && decided.iter().any(|a| matches!(a, Allotment::Refuse(_))) {
        // A skipped claim left stock a refused order might have had: decided alone, in turn.
        return Ok(Together::EachAlone);
    }
    let mut outcomes = Vec::with_capacity(writes.len());
    for (w, allotment) in writes.iter().zip(decided) {
        outcomes.push(Ok(match allotment {
            Allotment::Take if claimed.contains(&w.order_id) => {
                held(w.order_id, &w.lines, w.hold, price_of)?
            }
            Allotment::Take | Allotment::Exists => Fresh::Exists,
            Allotment::Refuse(refusal) => Fresh::Refused(refusal),
        }));
    }
    Ok(Together::Written(outcomes))
}

/// Takes every line for `order_id` (whose reservation row exists) at the current price, in
/// ascending product id: the one lock order every transaction here uses. An error leaves the
/// caller's transaction to roll back.
async fn take_lines(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &ReservationLines,
    now: i64,
) -> Result<Vec<ReservedLine>, StoreError> {
    let mut reserved = Vec::with_capacity(lines.lines().len());
    for (product_id, quantity) in lines.lines() {
        let price: Option<i64> = sqlx::query_scalar(
            "UPDATE products SET reserved = reserved + $1, updated_at = $2
             WHERE id = $3 AND on_hand - reserved >= $1 RETURNING price_cents",
        )
        .bind(quantity)
        .bind(now)
        .bind(product_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(price) = price else {
            let available: Option<i64> =
                sqlx::query_scalar("SELECT on_hand - reserved FROM products WHERE id = $1")
                    .bind(product_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            return Err(match available {
                None => StoreError::UnknownProduct(*product_id),
                Some(available) => StoreError::InsufficientStock {
                    product_id: *product_id,
                    requested: *quantity,
                    available,
                },
            });
        };
        sqlx::query(
            "INSERT INTO reservation_items (order_id, product_id, quantity, unit_price_cents)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(order_id)
        .bind(product_id)
        .bind(quantity)
        .bind(price)
        .execute(&mut *conn)
        .await?;
        reserved.push(ReservedLine {
            product_id: *product_id,
            quantity: *quantity,
            unit_price: money(price)?,
        });
    }
    Ok(reserved)
}

impl PgProductStore {
    /// Connects and migrates `schema` (the service name in production).
    pub async fn open(
        url: &str,
        schema: &str,
        settings: &PostgresSettings,
    ) -> Result<PgProductStore, PgError> {
        let pg = Pg::open(url, schema, settings, PG_MIGRATIONS).await?;
        let writers = usize::try_from(settings.max_connections / 2).unwrap_or(1);
        Ok(PgProductStore {
            reservations: Batcher::start(&pg, writers),
            pg,
        })
    }

    pub fn pg(&self) -> &Pg {
        &self.pg
    }

    /// Moves a held reservation to `to` when `only` allows: (the reservation, whether it moved).
    async fn transition(
        &self,
        order_id: Uuid,
        to: ReservationStatus,
        only: ReleaseIf,
    ) -> Result<Option<(Reservation, bool)>, StoreError> {
        kit::pg::traced("UPDATE reservations products", async {
        let mut tx = self.pg.pool().begin().await?;
        // The row lock makes concurrent transitions of one order take turns, and the status
        // read under it is the one the previous turn committed.
        let Some((mut reservation, attempt, expires_at)) =
            load_reservation(&mut tx, order_id, true).await?
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
            "UPDATE products SET reserved = reserved - $1, updated_at = $2 WHERE id = $3"
        } else {
            "UPDATE products SET reserved = reserved - $1, on_hand = on_hand - $1, updated_at = $2
             WHERE id = $3"
        };
        // Items come ordered by product id: the same lock order as `reserve`.
        for line in &reservation.items {
            sqlx::query(settle)
                .bind(line.quantity)
                .bind(now)
                .bind(line.product_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE reservations SET status = $1, updated_at = $2 WHERE order_id = $3")
            .bind(to.as_str())
            .bind(now)
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        reservation.status = to;
        Ok(Some((reservation, true)))
            })
        .await
    }
}

/// The reservation of `order_id` with its lines (ordered by product id), the attempt holding
/// it and its deadline; with `lock`, its row stays locked until the transaction ends.
async fn load_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
    lock: bool,
) -> Result<Option<(Reservation, Option<Uuid>, i64)>, StoreError> {
    let head = if lock {
        sqlx::query(
            "SELECT status, attempt, expires_at FROM reservations WHERE order_id = $1 FOR UPDATE",
        )
    } else {
        sqlx::query("SELECT status, attempt, expires_at FROM reservations WHERE order_id = $1")
    }
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(head) = head else {
        return Ok(None);
    };
    let status: String = head.try_get(0)?;
    let attempt: Option<Uuid> = head.try_get(1)?;
    let expires_at: i64 = head.try_get(2)?;
    let rows = sqlx::query(
        "SELECT product_id, quantity, unit_price_cents FROM reservation_items
         WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .iter()
        .map(|row| {
            Ok(ReservedLine {
                product_id: row.try_get(0)?,
                quantity: row.try_get(1)?,
                unit_price: money(row.try_get(2)?)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
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

#[async_trait]
impl ProductStore for PgProductStore {
    async fn count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM products")
            .fetch_one(self.pg.pool())
            .await?)
    }

    async fn held(&self) -> Result<(i64, i64), StoreError> {
        Ok(sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM reservations WHERE status = 'held'),
                    (SELECT COALESCE(SUM(reserved), 0)::BIGINT FROM products)",
        )
        .fetch_one(self.pg.pool())
        .await?)
    }

    async fn create(&self, new: NewProduct) -> Result<Product, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO products (id, name, description, price_cents, on_hand, reserved, sku, category, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, $8)
             RETURNING {PRODUCT_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(&new.name)
        .bind(&new.description)
        .bind(new.price.cents())
        .bind(new.on_hand)
        .bind(&new.sku)
        .bind(&new.category)
        .bind(now_ms())
        .fetch_one(self.pg.pool())
        .await
        .map_err(unique_sku)?;
        to_product(&row)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Product>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pg.pool())
        .await?;
        row.as_ref().map(to_product).transpose()
    }

    async fn list(
        &self,
        page: &PageRequest,
        filter: &CatalogFilter,
    ) -> Result<Page<Product>, StoreError> {
        let ((after_at, after_id), skip) = page.row_start()?;
        // The same order as SQLite: UUIDs sort by bytes, as their lower-case text does there.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE ($1::TEXT IS NULL OR category = $1)
             AND ($6::TEXT IS NULL OR strpos(lower(name || ' ' || sku || ' ' || description), $6) > 0)
             AND (created_at, id) > ($2, $3)
             ORDER BY created_at, id LIMIT $4 OFFSET $5"
        )))
        .bind(filter.category.as_deref())
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(page.limit) + 1)
        .bind(i64::from(skip))
        .bind(filter.search_text())
        .fetch_all(self.pg.pool())
        .await?;
        let rows = rows.iter().map(to_product).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(rows, page.limit, |p| {
            Cursor::after_row(p.created_at.timestamp_millis(), p.id)
        }))
    }

    async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<Option<Product>, StoreError> {
        // The on-hand condition is checked against the row as locked by this UPDATE, so a
        // reservation committed meanwhile is counted.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE products SET
                name = COALESCE($1, name),
                description = COALESCE($2, description),
                price_cents = COALESCE($3, price_cents),
                on_hand = COALESCE($4, on_hand),
                sku = COALESCE($5, sku),
                category = COALESCE($6, category),
                updated_at = $7
             WHERE id = $8 AND ($4::BIGINT IS NULL OR $4 >= reserved)
             RETURNING {PRODUCT_COLUMNS}"
        )))
        .bind(changes.name)
        .bind(changes.description)
        .bind(changes.price.map(Money::cents))
        .bind(changes.on_hand)
        .bind(changes.sku)
        .bind(changes.category)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(self.pg.pool())
        .await
        .map_err(unique_sku)?;
        match (row, changes.on_hand) {
            (Some(row), _) => to_product(&row).map(Some),
            (None, None) => Ok(None),
            (None, Some(on_hand)) => {
                let mut conn = self.pg.pool().acquire().await?;
                match stock_of(&mut conn, id).await? {
                    None => Ok(None),
                    Some(level) => Err(StoreError::BelowReserved {
                        product_id: id,
                        reserved: level.stock.reserved,
                        on_hand,
                    }),
                }
            }
        }
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM products WHERE id = $1")
            .bind(id)
            .execute(self.pg.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn stock(&self, id: Uuid) -> Result<Option<StockLevel>, StoreError> {
        let mut conn = self.pg.pool().acquire().await?;
        stock_of(&mut conn, id).await
    }

    async fn change_stock(
        &self,
        id: Uuid,
        change: StockChange,
    ) -> Result<Option<StockLevel>, StoreError> {
        kit::pg::traced("UPDATE products", async {
            let mut tx = self.pg.pool().begin().await?;
            // Locked, so no reservation lands between the check and the write.
            let row =
                sqlx::query("SELECT sku, on_hand, reserved FROM products WHERE id = $1 FOR UPDATE")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let mut level = StockLevel {
                product_id: id,
                sku: row.try_get(0)?,
                stock: Stock {
                    on_hand: row.try_get(1)?,
                    reserved: row.try_get(2)?,
                },
            };
            let on_hand = changed_on_hand(id, level.stock, change)?;
            sqlx::query("UPDATE products SET on_hand = $1, updated_at = $2 WHERE id = $3")
                .bind(on_hand)
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
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
        kit::pg::traced("UPDATE products reservations; INSERT reservations", async {
        let now = now_ms();
        let fresh = FreshReservation {
            order_id,
            lines: lines.clone(),
            hold,
            now,
        };
        match self.reservations.write(fresh).await?? {
            Fresh::Held(reservation) => return Ok((reservation, true)),
            Fresh::Refused(e) => return Err(e),
            Fresh::Exists => {}
        }
        // A reservation for this order exists already: a retry, handled in a transaction that
        // locks it. Dropping `tx` on any early return rolls back the claim and every line taken so far.
        let mut tx = self.pg.pool().begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO reservations (order_id, status, created_at, updated_at, expires_at, attempt)
             VALUES ($1, 'held', $2, $2, $3, $4) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id)
        .bind(now)
        .bind(hold.until_ms)
        .bind(hold.attempt)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            // A retry: the conflict was with a committed reservation, which this statement (a
            // new snapshot at READ COMMITTED) reads whole; renewing locks it first.
            let (mut existing, _, expires_at) = load_reservation(&mut tx, order_id, hold.renew)
                .await?
                .ok_or(StoreError::Corrupt)?;
            if !hold.renew || existing.status == ReservationStatus::Committed {
                return Ok((existing, false));
            }
            let until = if existing.status == ReservationStatus::Held {
                expires_at.max(hold.until_ms)
            } else {
                hold.until_ms
            };
            sqlx::query(
                "UPDATE reservations SET status = 'held', attempt = $1, expires_at = $2, updated_at = $3
                 WHERE order_id = $4",
            )
            .bind(hold.attempt)
            .bind(until)
            .bind(now)
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
            existing.expires_at = expiry(until);
            if existing.status == ReservationStatus::Released {
                // Taken again as if new; a shortfall rolls the renewal back too.
                sqlx::query("DELETE FROM reservation_items WHERE order_id = $1")
                    .bind(order_id)
                    .execute(&mut *tx)
                    .await?;
                existing.items = take_lines(&mut tx, order_id, lines, now).await?;
                existing.status = ReservationStatus::Held;
                tx.commit().await?;
                return Ok((existing, true));
            }
            tx.commit().await?;
            return Ok((existing, false));
        }
        let items = take_lines(&mut tx, order_id, lines, now).await?;
        tx.commit().await?;
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
        // One statement: the batch's lines, then the reservations themselves. The rows are
        // locked (and re-checked once locked), so a released reservation renewed meanwhile is
        // left alone rather than deleted while it holds stock.
        let pruned: i64 = sqlx::query_scalar(
            "WITH due AS (
                SELECT order_id FROM reservations
                WHERE status IN ('released', 'committed') AND updated_at < $1
                LIMIT $2 FOR UPDATE SKIP LOCKED
             ), lines AS (
                DELETE FROM reservation_items WHERE order_id IN (SELECT order_id FROM due)
             ), gone AS (
                DELETE FROM reservations WHERE order_id IN (SELECT order_id FROM due)
                RETURNING 1
             )
             SELECT COUNT(*) FROM gone",
        )
        .bind(settled_before_ms)
        .bind(i64::from(limit))
        .fetch_one(self.pg.pool())
        .await?;
        Ok(usize::try_from(pruned).unwrap_or(0))
    }

    async fn release_expired(&self, limit: u32) -> Result<usize, StoreError> {
        let now = now_ms();
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT order_id FROM reservations WHERE status = 'held' AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(self.pg.pool())
        .await?;
        let mut released = 0;
        for order_id in due {
            // Another replica's sweeper, the order's own settlement or a retry's renewal may
            // get there first: the locked re-check in `transition` makes that harmless.
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
        sqlx::query("SELECT 1").execute(self.pg.pool()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pg.close().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn lines(items: &[(Uuid, i64)]) -> ReservationLines {
        ReservationLines::parse(items).unwrap()
    }

    fn shelf(available: i64) -> Shelf {
        Shelf {
            available,
            price_cents: 100,
        }
    }

    #[test]
    fn allotting_decides_each_order_in_turn_against_what_the_ones_before_left() {
        let (a, b, unknown) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(9));
        let (o1, o2, o3, o4, o5, o6) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let mut shelves = HashMap::from([(a, shelf(5)), (b, shelf(3))]);
        let existing = HashSet::from([o5]);
        let (two_a, two_a_three_b, one_a, with_unknown) = (
            lines(&[(a, 2)]),
            lines(&[(a, 2), (b, 3)]),
            lines(&[(a, 1)]),
            lines(&[(a, 1), (unknown, 1)]),
        );
        let orders = [
            (o1, &two_a),
            (o2, &two_a_three_b),
            // 1 of A left: refused, and it takes nothing.
            (o3, &two_a),
            (o4, &with_unknown),
            (o5, &one_a),
            // The same order again in one batch: the first claimed it.
            (o1, &one_a),
            (o6, &one_a),
        ];
        let decided = allot(&orders, &existing, &mut shelves);
        assert!(matches!(decided[0], Allotment::Take));
        assert!(matches!(decided[1], Allotment::Take));
        assert!(matches!(
            decided[2],
            Allotment::Refuse(StoreError::InsufficientStock {
                requested: 2,
                available: 1,
                ..
            })
        ));
        assert!(
            matches!(decided[3], Allotment::Refuse(StoreError::UnknownProduct(p)) if p == unknown)
        );
        assert!(matches!(decided[4], Allotment::Exists));
        assert!(matches!(decided[5], Allotment::Exists));
        assert!(matches!(decided[6], Allotment::Take));
        assert_eq!(shelves[&a].available, 0);
        assert_eq!(shelves[&b].available, 0);
    }

    fn widget(sku: &str, on_hand: i64, cents: i64) -> crate::store::NewProduct {
        crate::store::NewProduct {
            name: sku.into(),
            description: String::new(),
            price: Money::from_cents(cents).unwrap(),
            on_hand,
            sku: sku.into(),
            category: "tools".into(),
        }
    }

    fn fresh(order_id: Uuid, items: &[(Uuid, i64)]) -> FreshReservation {
        FreshReservation {
            order_id,
            lines: lines(items),
            hold: Hold::until(i64::MAX),
            now: now_ms(),
        }
    }

    /// The two-statement batch against a database: outcomes as one after another, stock and
    /// lines written once for the orders that took, nothing for the others.
    #[tokio::test]
    async fn a_batch_reserved_together_has_each_orders_outcome_and_takes_stock_once() {
        let url = kit::pg::test_database_url();
        let store = PgProductStore::open(
            &url,
            &kit::pg::unique_schema("products"),
            &Default::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} (TEST_DATABASE_URL) is needed: {e}"));
        let a = store.create(widget("A", 5, 250)).await.unwrap();
        let b = store.create(widget("B", 3, 1_000)).await.unwrap();
        let retried = Uuid::new_v4();
        store
            .reserve(retried, &lines(&[(b.id, 1)]), Hold::until(i64::MAX))
            .await
            .unwrap();
        let (o1, o2, o3, o4) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let batch = [
            fresh(o1, &[(a.id, 2)]),
            fresh(o2, &[(a.id, 2), (b.id, 2)]),
            fresh(o3, &[(a.id, 2)]),
            fresh(retried, &[(a.id, 1)]),
            fresh(o4, &[(a.id, 1)]),
        ];
        let writes: Vec<&FreshReservation> = batch.iter().collect();
        let mut tx = store.pg.pool().begin().await.unwrap();
        let Together::Written(outcomes) = reserve_together(&mut tx, &writes).await.unwrap() else {
            panic!("no race here: the batch is written together");
        };
        tx.commit().await.unwrap();
        let held = |i: usize| match &outcomes[i] {
            Ok(Fresh::Held(r)) => r
                .items
                .iter()
                .map(|l| (l.product_id, l.quantity, l.unit_price.cents()))
                .collect::<Vec<_>>(),
            _ => panic!("order {i} should be held"),
        };
        assert_eq!(held(0), vec![(a.id, 2, 250)]);
        let mut two = vec![(a.id, 2, 250), (b.id, 2, 1_000)];
        two.sort();
        assert_eq!(held(1), two);
        assert!(matches!(
            outcomes[2],
            Ok(Fresh::Refused(StoreError::InsufficientStock {
                requested: 2,
                available: 1,
                ..
            }))
        ));
        assert!(matches!(outcomes[3], Ok(Fresh::Exists)));
        assert_eq!(held(4), vec![(a.id, 1, 250)]);
        // What the database holds agrees: A all reserved, B 1 (the retry's) + 2.
        let reserved = |id| {
            let store = store.clone();
            async move { store.stock(id).await.unwrap().unwrap().stock.reserved }
        };
        assert_eq!(reserved(a.id).await, 5);
        assert_eq!(reserved(b.id).await, 3);
        for (order, lines) in [(o1, 1), (o2, 2), (o4, 1), (retried, 1)] {
            let (r, _, _) = load_reservation(
                store.pg.pool().acquire().await.unwrap().as_mut(),
                order,
                false,
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!((r.status, r.items.len()), (ReservationStatus::Held, lines));
        }
        let refused =
            load_reservation(store.pg.pool().acquire().await.unwrap().as_mut(), o3, false)
                .await
                .unwrap();
        assert!(refused.is_none());
        store.pg.clone().drop_schema().await.unwrap();
    }
}
