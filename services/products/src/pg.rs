//! Products, stock and reservations in PostgreSQL (feature `postgres`): the same contract as
//! the SQLite store, in the service's own schema.
//!
//! Money is BIGINT cents and times BIGINT milliseconds, exactly as in SQLite (a reservation's
//! `expires_at` may be "never", `i64::MAX`, which no TIMESTAMPTZ holds).
//!
//! Why reservations cannot oversell or double-reserve, at READ COMMITTED:
//! - Stock is only ever taken by `UPDATE products SET stock = stock - q WHERE id = $ AND
//!   stock >= q`. The row lock serialises writers of one product, and PostgreSQL re-checks
//!   the `WHERE` against the newest committed row once the lock is granted, so every taker
//!   sees the stock left by the one before. `CHECK (stock >= 0)` is the backstop.
//! - One reservation's lines are taken in ascending product id (`ReservationLines` is sorted
//!   by id, and UUIDs sort alike in Rust and PostgreSQL), as is stock given back on release:
//!   every transaction locks product rows in the same order, so they cannot deadlock.
//! - The reservation row (primary key `order_id`) is inserted first, in the same
//!   transaction. A concurrent reserve for the same order waits on that key; when the first
//!   commits it finds the row and returns the existing reservation, when it rolls back (short
//!   stock) the second proceeds on its own. All lines commit with the row or none do.
//! - Release and commit lock the reservation row (`FOR UPDATE`) before reading its status,
//!   so two of them for one order run one after the other and stock comes back only once.

use async_trait::async_trait;
use chrono::DateTime;
use kit::Money;
use kit::config::PostgresSettings;
use kit::db::now_ms;
use kit::pg::{Pg, PgError, PgStep, is_unique_violation};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use crate::domain::ReservationLines;
use crate::store::{
    NewProduct, Product, ProductChanges, ProductStore, Reservation, ReservationStatus,
    ReservedLine, StockLevel, StoreError,
};

pub static PG_MIGRATIONS: &[PgStep] = &[(
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
)];

const SELECT_PRODUCT: &str = "SELECT id, name, description, price_cents, stock, sku, category, created_at, updated_at FROM products";

#[derive(Debug, Clone)]
pub struct PgProductStore {
    pg: Pg,
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
        stock: row.try_get(4)?,
        sku: row.try_get(5)?,
        category: row.try_get(6)?,
        created_at: time(7)?,
        updated_at: time(8)?,
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

impl PgProductStore {
    /// Connects and migrates `schema` (the service name in production).
    pub async fn open(
        url: &str,
        schema: &str,
        settings: &PostgresSettings,
    ) -> Result<PgProductStore, PgError> {
        Ok(PgProductStore {
            pg: Pg::open(url, schema, settings, PG_MIGRATIONS).await?,
        })
    }

    pub fn pg(&self) -> &Pg {
        &self.pg
    }

    async fn transition(
        &self,
        order_id: Uuid,
        to: ReservationStatus,
    ) -> Result<Option<Reservation>, StoreError> {
        let mut tx = self.pg.pool().begin().await?;
        // The row lock makes concurrent transitions of one order take turns, and the status
        // read under it is the one the previous turn committed.
        let Some(mut reservation) = load_reservation(&mut tx, order_id, true).await? else {
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
            // Items come ordered by product id: the same lock order as `reserve`.
            for line in &reservation.items {
                sqlx::query(
                    "UPDATE products SET stock = stock + $1, updated_at = $2 WHERE id = $3",
                )
                .bind(line.quantity)
                .bind(now)
                .bind(line.product_id)
                .execute(&mut *tx)
                .await?;
            }
        }
        sqlx::query("UPDATE reservations SET status = $1, updated_at = $2 WHERE order_id = $3")
            .bind(to.as_str())
            .bind(now)
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        reservation.status = to;
        Ok(Some(reservation))
    }
}

/// The reservation of `order_id` with its lines (ordered by product id); with `lock`, its row
/// stays locked until the transaction ends.
async fn load_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
    lock: bool,
) -> Result<Option<Reservation>, StoreError> {
    let status: Option<String> = if lock {
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1 FOR UPDATE")
    } else {
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
    }
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(status) = status else {
        return Ok(None);
    };
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
    Ok(Some(Reservation {
        order_id,
        status: ReservationStatus::parse(&status),
        items,
    }))
}

#[async_trait]
impl ProductStore for PgProductStore {
    async fn count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM products")
            .fetch_one(self.pg.pool())
            .await?)
    }

    async fn create(&self, new: NewProduct) -> Result<Product, StoreError> {
        let row = sqlx::query(
            "INSERT INTO products (id, name, description, price_cents, stock, sku, category, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
             RETURNING id, name, description, price_cents, stock, sku, category, created_at, updated_at",
        )
        .bind(Uuid::now_v7())
        .bind(&new.name)
        .bind(&new.description)
        .bind(new.price.cents())
        .bind(new.stock)
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
            "{SELECT_PRODUCT} WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pg.pool())
        .await?;
        row.as_ref().map(to_product).transpose()
    }

    async fn list(
        &self,
        skip: u32,
        limit: u32,
        category: Option<String>,
    ) -> Result<Vec<Product>, StoreError> {
        // The same order as SQLite: UUIDs sort by bytes, as their lower-case text does there.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_PRODUCT} WHERE ($1::TEXT IS NULL OR category = $1)
             ORDER BY created_at, id LIMIT $2 OFFSET $3"
        )))
        .bind(category)
        .bind(i64::from(limit))
        .bind(i64::from(skip))
        .fetch_all(self.pg.pool())
        .await?;
        rows.iter().map(to_product).collect()
    }

    async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<Option<Product>, StoreError> {
        let row = sqlx::query(
            "UPDATE products SET
                name = COALESCE($1, name),
                description = COALESCE($2, description),
                price_cents = COALESCE($3, price_cents),
                stock = COALESCE($4, stock),
                sku = COALESCE($5, sku),
                category = COALESCE($6, category),
                updated_at = $7
             WHERE id = $8
             RETURNING id, name, description, price_cents, stock, sku, category, created_at, updated_at",
        )
        .bind(changes.name)
        .bind(changes.description)
        .bind(changes.price.map(Money::cents))
        .bind(changes.stock)
        .bind(changes.sku)
        .bind(changes.category)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(self.pg.pool())
        .await
        .map_err(unique_sku)?;
        row.as_ref().map(to_product).transpose()
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM products WHERE id = $1")
            .bind(id)
            .execute(self.pg.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn stock(&self, id: Uuid) -> Result<Option<StockLevel>, StoreError> {
        let row = sqlx::query(
            "SELECT p.id, p.sku, p.stock,
                    COALESCE((SELECT SUM(ri.quantity) FROM reservation_items ri
                              JOIN reservations r ON r.order_id = ri.order_id
                              WHERE ri.product_id = p.id AND r.status = 'held'), 0)::BIGINT
             FROM products p WHERE p.id = $1",
        )
        .bind(id)
        .fetch_optional(self.pg.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(StockLevel {
            product_id: row.try_get(0)?,
            sku: row.try_get(1)?,
            stock: row.try_get(2)?,
            reserved: row.try_get(3)?,
        }))
    }

    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &ReservationLines,
        hold_until_ms: i64,
    ) -> Result<(Reservation, bool), StoreError> {
        let now = now_ms();
        // Dropping `tx` on any early return rolls back the claim and every line taken so far.
        let mut tx = self.pg.pool().begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO reservations (order_id, status, created_at, updated_at, expires_at)
             VALUES ($1, 'held', $2, $2, $3) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id)
        .bind(now)
        .bind(hold_until_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            // A retry: the conflict was with a committed reservation, which this statement
            // (a new snapshot at READ COMMITTED) reads whole.
            let existing = load_reservation(&mut tx, order_id, false)
                .await?
                .ok_or(StoreError::Corrupt)?;
            return Ok((existing, false));
        }
        let mut reserved = Vec::with_capacity(lines.lines().len());
        // Ascending product id: the one lock order every transaction here uses.
        for (product_id, quantity) in lines.lines() {
            let price: Option<i64> = sqlx::query_scalar(
                "UPDATE products SET stock = stock - $1, updated_at = $2
                 WHERE id = $3 AND stock >= $1 RETURNING price_cents",
            )
            .bind(quantity)
            .bind(now)
            .bind(product_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(price) = price else {
                let available: Option<i64> =
                    sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
                        .bind(product_id)
                        .fetch_optional(&mut *tx)
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
            .execute(&mut *tx)
            .await?;
            reserved.push(ReservedLine {
                product_id: *product_id,
                quantity: *quantity,
                unit_price: money(price)?,
            });
        }
        tx.commit().await?;
        Ok((
            Reservation {
                order_id,
                status: ReservationStatus::Held,
                items: reserved,
            },
            true,
        ))
    }

    async fn release_expired(&self, limit: u32) -> Result<usize, StoreError> {
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT order_id FROM reservations WHERE status = 'held' AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now_ms())
        .bind(i64::from(limit))
        .fetch_all(self.pg.pool())
        .await?;
        let mut released = 0;
        for order_id in due {
            // Another replica's sweeper, or the order's own settlement, may get there first:
            // the locked re-check in `transition` makes that harmless.
            match self.transition(order_id, ReservationStatus::Released).await {
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
        sqlx::query("SELECT 1").execute(self.pg.pool()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pg.close().await;
    }
}
