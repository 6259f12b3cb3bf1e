//! Products, stock and reservations in SQLite.
//!
//! Stock is taken with a conditional `UPDATE ... WHERE stock >= ?` inside a write
//! transaction, never read-then-write, and a CHECK constraint keeps it from ever going
//! negative. A reservation and its stock changes commit together, so a reservation either
//! holds all of its lines or does not exist.

use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::{Db, DbError, Step, is_unique_violation, now_ms};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use crate::domain::ReservationLines;

pub static MIGRATIONS: &[Step] = &[(
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
)];

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
    fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Held => "held",
            ReservationStatus::Released => "released",
            ReservationStatus::Committed => "committed",
        }
    }

    fn parse(s: &str) -> ReservationStatus {
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
    Db(#[from] sqlx::Error),
}

fn uuid_of(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let s: String = row.try_get(column)?;
    s.parse().map_err(|_| StoreError::Corrupt)
}

fn time_of(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(row.try_get(column)?).ok_or(StoreError::Corrupt)
}

fn to_product(row: &SqliteRow) -> Result<Product, StoreError> {
    Ok(Product {
        id: uuid_of(row, "id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        price: Money::from_cents(row.try_get("price_cents")?).map_err(|_| StoreError::Corrupt)?,
        stock: row.try_get("stock")?,
        sku: row.try_get("sku")?,
        category: row.try_get("category")?,
        created_at: time_of(row, "created_at")?,
        updated_at: time_of(row, "updated_at")?,
    })
}

fn unique_sku(e: sqlx::Error) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::DuplicateSku
    } else {
        StoreError::Db(e)
    }
}

#[derive(Debug, Clone)]
pub struct ProductStore {
    db: Db,
}

impl ProductStore {
    pub async fn open(
        url: &str,
        sqlite: &kit::config::SqliteSettings,
    ) -> Result<ProductStore, DbError> {
        Ok(ProductStore {
            db: Db::open(url, sqlite, MIGRATIONS).await?,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub async fn count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM products")
            .fetch_one(&self.db.read)
            .await?)
    }

    pub async fn create(&self, new: NewProduct) -> Result<Product, StoreError> {
        let now = now_ms();
        let id = Uuid::now_v7();
        let row = sqlx::query(
            "INSERT INTO products (id, name, description, price_cents, stock, sku, category, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(id.to_string())
        .bind(&new.name)
        .bind(&new.description)
        .bind(new.price.cents())
        .bind(new.stock)
        .bind(&new.sku)
        .bind(&new.category)
        .bind(now)
        .bind(now)
        .fetch_one(self.db.writer())
        .await
        .map_err(unique_sku)?;
        to_product(&row)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Product>, StoreError> {
        sqlx::query("SELECT * FROM products WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.db.read)
            .await?
            .as_ref()
            .map(to_product)
            .transpose()
    }

    pub async fn list(
        &self,
        skip: u32,
        limit: u32,
        category: Option<&str>,
    ) -> Result<Vec<Product>, StoreError> {
        let rows = match category {
            Some(c) => {
                sqlx::query("SELECT * FROM products WHERE category = ? ORDER BY created_at, id LIMIT ? OFFSET ?")
                    .bind(c)
                    .bind(limit)
                    .bind(skip)
                    .fetch_all(&self.db.read)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM products ORDER BY created_at, id LIMIT ? OFFSET ?")
                    .bind(limit)
                    .bind(skip)
                    .fetch_all(&self.db.read)
                    .await?
            }
        };
        rows.iter().map(to_product).collect()
    }

    /// Applies the given changes; `None` when the product does not exist.
    pub async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<Option<Product>, StoreError> {
        let row = sqlx::query(
            "UPDATE products SET
                name = COALESCE(?, name),
                description = COALESCE(?, description),
                price_cents = COALESCE(?, price_cents),
                stock = COALESCE(?, stock),
                sku = COALESCE(?, sku),
                category = COALESCE(?, category),
                updated_at = ?
             WHERE id = ? RETURNING *",
        )
        .bind(changes.name)
        .bind(changes.description)
        .bind(changes.price.map(Money::cents))
        .bind(changes.stock)
        .bind(changes.sku)
        .bind(changes.category)
        .bind(now_ms())
        .bind(id.to_string())
        .fetch_optional(self.db.writer())
        .await
        .map_err(unique_sku)?;
        row.as_ref().map(to_product).transpose()
    }

    pub async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM products WHERE id = ?")
            .bind(id.to_string())
            .execute(self.db.writer())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn stock(&self, id: Uuid) -> Result<Option<StockLevel>, StoreError> {
        let row = sqlx::query(
            "SELECT p.id, p.sku, p.stock,
                    COALESCE((SELECT SUM(ri.quantity) FROM reservation_items ri
                              JOIN reservations r ON r.order_id = ri.order_id
                              WHERE ri.product_id = p.id AND r.status = 'held'), 0) AS reserved
             FROM products p WHERE p.id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.db.read)
        .await?;
        row.map(|row| {
            Ok(StockLevel {
                product_id: uuid_of(&row, "id")?,
                sku: row.try_get("sku")?,
                stock: row.try_get("stock")?,
                reserved: row.try_get("reserved")?,
            })
        })
        .transpose()
    }

    /// Reserves every line for `order_id`, or nothing. Returns the reservation and whether it
    /// was made now (`true`) or already existed (a retry: nothing is taken twice).
    pub async fn reserve(
        &self,
        order_id: Uuid,
        lines: &ReservationLines,
    ) -> Result<(Reservation, bool), StoreError> {
        let mut tx = self.db.begin().await?;
        let now = now_ms();
        let claimed = sqlx::query(
            "INSERT INTO reservations (order_id, status, created_at, updated_at) VALUES (?, 'held', ?, ?)
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id.to_string())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            let existing = load_reservation(&mut tx, order_id)
                .await?
                .ok_or(StoreError::Corrupt)?;
            return Ok((existing, false));
        }
        let mut reserved = Vec::with_capacity(lines.lines().len());
        for (product_id, quantity) in lines.lines() {
            let price: Option<i64> = sqlx::query_scalar(
                "UPDATE products SET stock = stock - ?1, updated_at = ?2 WHERE id = ?3 AND stock >= ?1 RETURNING price_cents",
            )
            .bind(quantity)
            .bind(now)
            .bind(product_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            let Some(price) = price else {
                // Dropping `tx` rolls back the reservation and every line taken so far.
                let available: Option<i64> =
                    sqlx::query_scalar("SELECT stock FROM products WHERE id = ?")
                        .bind(product_id.to_string())
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
            reserved.push(ReservedLine {
                product_id: *product_id,
                quantity: *quantity,
                unit_price: Money::from_cents(price).map_err(|_| StoreError::Corrupt)?,
            });
        }
        let order = order_id.to_string();
        let mut items = QueryBuilder::<Sqlite>::new(
            "INSERT INTO reservation_items (order_id, product_id, quantity, unit_price_cents) ",
        );
        items.push_values(&reserved, |mut row, line| {
            row.push_bind(&order)
                .push_bind(line.product_id.to_string())
                .push_bind(line.quantity)
                .push_bind(line.unit_price.cents());
        });
        items.build().execute(&mut *tx).await?;
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

    /// Gives a held reservation's stock back, exactly once. `None` if there is no reservation.
    pub async fn release(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError> {
        self.transition(order_id, ReservationStatus::Released).await
    }

    /// Marks a held reservation as sold (its order was paid): the stock stays taken for good.
    pub async fn commit(&self, order_id: Uuid) -> Result<Option<Reservation>, StoreError> {
        self.transition(order_id, ReservationStatus::Committed)
            .await
    }

    async fn transition(
        &self,
        order_id: Uuid,
        to: ReservationStatus,
    ) -> Result<Option<Reservation>, StoreError> {
        let mut tx = self.db.begin().await?;
        let Some(mut reservation) = load_reservation(&mut tx, order_id).await? else {
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
            for line in &reservation.items {
                sqlx::query("UPDATE products SET stock = stock + ?, updated_at = ? WHERE id = ?")
                    .bind(line.quantity)
                    .bind(now)
                    .bind(line.product_id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("UPDATE reservations SET status = ?, updated_at = ? WHERE order_id = ?")
            .bind(to.as_str())
            .bind(now)
            .bind(order_id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        reservation.status = to;
        Ok(Some(reservation))
    }
}

async fn load_reservation(
    conn: &mut SqliteConnection,
    order_id: Uuid,
) -> Result<Option<Reservation>, StoreError> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = ?")
            .bind(order_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    let Some(status) = status else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT product_id, quantity, unit_price_cents FROM reservation_items WHERE order_id = ? ORDER BY product_id",
    )
    .bind(order_id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .iter()
        .map(|row| {
            Ok(ReservedLine {
                product_id: uuid_of(row, "product_id")?,
                quantity: row.try_get("quantity")?,
                unit_price: Money::from_cents(row.try_get("unit_price_cents")?)
                    .map_err(|_| StoreError::Corrupt)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(Reservation {
        order_id,
        status: ReservationStatus::parse(&status),
        items,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, ProductStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/products.db", dir.path().display());
        let store = ProductStore::open(&url, &kit::config::SqliteSettings::default())
            .await
            .unwrap();
        (dir, store)
    }

    fn widget(sku: &str, stock: i64) -> NewProduct {
        NewProduct {
            name: "Widget".into(),
            description: String::new(),
            price: Money::from_cents(1_999).unwrap(),
            stock,
            sku: sku.into(),
            category: "tools".into(),
        }
    }

    #[tokio::test]
    async fn concurrent_reservations_never_oversell() {
        let (_dir, store) = store().await;
        let p = store.create(widget("W-1", 50)).await.unwrap();
        let lines = ReservationLines::parse(&[(p.id, 1)]).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let store = store.clone();
                let lines = lines.clone();
                tokio::spawn(async move { store.reserve(Uuid::new_v4(), &lines).await })
            })
            .collect();
        let mut ok = 0;
        let mut short = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::InsufficientStock { .. }) => short += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, short), (50, 150));
        assert_eq!(store.get(p.id).await.unwrap().unwrap().stock, 0);
    }

    #[tokio::test]
    async fn reservation_is_all_or_nothing_idempotent_and_released_once() {
        let (_dir, store) = store().await;
        let plenty = store.create(widget("A", 10)).await.unwrap();
        let scarce = store.create(widget("B", 1)).await.unwrap();
        let order = Uuid::new_v4();
        let too_many = ReservationLines::parse(&[(plenty.id, 3), (scarce.id, 2)]).unwrap();
        assert!(matches!(
            store.reserve(order, &too_many).await,
            Err(StoreError::InsufficientStock { available: 1, .. })
        ));
        assert_eq!(
            store.get(plenty.id).await.unwrap().unwrap().stock,
            10,
            "nothing kept from a failed order"
        );

        let fits = ReservationLines::parse(&[(plenty.id, 3), (scarce.id, 1)]).unwrap();
        let (first, created) = store.reserve(order, &fits).await.unwrap();
        assert!(created);
        let (again, created) = store.reserve(order, &fits).await.unwrap();
        assert!(!created);
        assert_eq!(first, again);
        assert_eq!(store.get(plenty.id).await.unwrap().unwrap().stock, 7);
        assert_eq!(store.stock(plenty.id).await.unwrap().unwrap().reserved, 3);

        store.release(order).await.unwrap();
        store.release(order).await.unwrap();
        assert_eq!(
            store.get(plenty.id).await.unwrap().unwrap().stock,
            10,
            "released exactly once"
        );
        assert!(matches!(
            store.commit(order).await,
            Err(StoreError::WrongState(ReservationStatus::Released))
        ));
        assert!(store.release(Uuid::new_v4()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn unknown_product_and_duplicate_sku() {
        let (_dir, store) = store().await;
        store.create(widget("DUP", 1)).await.unwrap();
        assert!(matches!(
            store.create(widget("DUP", 1)).await,
            Err(StoreError::DuplicateSku)
        ));
        let lines = ReservationLines::parse(&[(Uuid::new_v4(), 1)]).unwrap();
        assert!(matches!(
            store.reserve(Uuid::new_v4(), &lines).await,
            Err(StoreError::UnknownProduct(_))
        ));
    }
}
