//! The orders store on PostgreSQL (feature `postgres`), with the same semantics as the SQLite
//! one: every change and its outbox rows in one transaction, transitions conditional on the
//! current status, processed event ids recorded in the transaction that applies the event.
//!
//! SQLite has a single writer, so "read the status, then update" cannot race there. Here
//! writers run concurrently, so the status check is part of the `UPDATE` itself
//! (`WHERE status = ANY(<statuses that may become the target>)`): of concurrent attempts the
//! row lock lets one update, and the others re-check the committed row and update nothing.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::now_ms;
use kit::pg::{Pg, PgStep};
use sqlx::{PgConnection, Row as _};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::domain::OrderStatus;
use crate::store::{
    DESTINATIONS, DeadLetter, Order, OrderLine, OrderStore, StoreError, Transition, order_cursor,
};
use kit::page::{Page, PageRequest};

/// Timestamps are Unix milliseconds in BIGINT as in SQLite (and the shared outbox), so both
/// backends round-trip an order exactly; money is BIGINT cents.
pub static MIGRATIONS: &[PgStep] = &[
    (
        1,
        "orders",
        "CREATE TABLE orders (
            id UUID PRIMARY KEY,
            user_id UUID NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'payment_failed', 'shipped',
                                                   'delivered', 'cancelled', 'refunded')),
            total_cents BIGINT NOT NULL CHECK (total_cents >= 0),
            currency TEXT NOT NULL,
            shipping_address TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL
        );
        CREATE INDEX orders_user ON orders (user_id, created_at, id);
        -- Only pending orders are ever swept, so only they are indexed.
        CREATE INDEX orders_pending_expiry ON orders (expires_at) WHERE status = 'pending';
        CREATE TABLE order_items (
            order_id UUID NOT NULL REFERENCES orders (id),
            product_id UUID NOT NULL,
            quantity BIGINT NOT NULL CHECK (quantity > 0),
            unit_price_cents BIGINT NOT NULL CHECK (unit_price_cents >= 0),
            PRIMARY KEY (order_id, product_id)
        );
        CREATE TABLE processed_events (
            event_id UUID PRIMARY KEY,
            processed_at BIGINT NOT NULL
        );
        CREATE INDEX processed_events_age ON processed_events (processed_at);",
    ),
    (2, "outbox", bus::outbox::PG_MIGRATION),
    (3, "idempotency keys", kit::idempotency::PG_MIGRATION),
    (
        4,
        "payment versions",
        "CREATE TABLE payment_versions (
            payment_id UUID PRIMARY KEY,
            order_id UUID NOT NULL,
            version BIGINT NOT NULL,
            seen_at BIGINT NOT NULL
        );
        CREATE INDEX payment_versions_age ON payment_versions (seen_at);",
    ),
    (
        5,
        "dead letters",
        "CREATE TABLE dead_letters (
            topic TEXT NOT NULL,
            partition BIGINT NOT NULL,
            record_offset BIGINT NOT NULL,
            key TEXT NOT NULL,
            payload TEXT NOT NULL,
            reason TEXT NOT NULL,
            attempts BIGINT NOT NULL,
            dead_at BIGINT NOT NULL,
            PRIMARY KEY (topic, partition, record_offset)
        );",
    ),
    (
        6,
        "outbox retrying index",
        bus::outbox::PG_MIGRATION_RETRYING_INDEX,
    ),
];

#[derive(Debug, Clone)]
pub struct PgOrderStore {
    pg: Pg,
    wake_relay: Arc<Notify>,
}

impl PgOrderStore {
    /// A store over `pg`, opened with [`MIGRATIONS`].
    pub fn new(pg: Pg) -> PgOrderStore {
        PgOrderStore {
            pg,
            wake_relay: Arc::new(Notify::new()),
        }
    }

    pub fn pg(&self) -> &Pg {
        &self.pg
    }

    /// Lets the outbox relay know, right after commit, that events are waiting.
    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> PgOrderStore {
        self.wake_relay = wake;
        self
    }
}

fn corrupt<E>(_: E) -> StoreError {
    StoreError::Corrupt
}

fn time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or(StoreError::Corrupt)
}

/// An order row without its lines.
fn order_from_row(row: &sqlx::postgres::PgRow) -> Result<Order, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        status: status.parse().map_err(corrupt)?,
        items: Vec::new(),
        total_amount: Money::from_cents(row.try_get("total_cents")?).map_err(corrupt)?,
        currency: row.try_get("currency")?,
        shipping_address: row.try_get("shipping_address")?,
        created_at: time(row.try_get("created_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
        expires_at: time(row.try_get("expires_at")?)?,
    })
}

/// Fills in the lines of `orders` with one query (no query per order).
async fn attach_lines(conn: &mut PgConnection, orders: &mut [Order]) -> Result<(), StoreError> {
    if orders.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    let rows = sqlx::query(
        "SELECT order_id, product_id, quantity, unit_price_cents FROM order_items
         WHERE order_id = ANY($1) ORDER BY order_id, product_id",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let order_id: Uuid = row.try_get("order_id")?;
        let quantity: i64 = row.try_get("quantity")?;
        let unit_price = Money::from_cents(row.try_get("unit_price_cents")?).map_err(corrupt)?;
        let line = OrderLine {
            product_id: row.try_get("product_id")?,
            quantity,
            unit_price,
            line_total: unit_price.checked_mul(quantity).unwrap_or(Money::ZERO),
        };
        if let Some(order) = orders.iter_mut().find(|o| o.id == order_id) {
            order.items.push(line);
        }
    }
    Ok(())
}

async fn load(conn: &mut PgConnection, id: Uuid) -> Result<Option<Order>, StoreError> {
    let row = sqlx::query(
        "SELECT id, user_id, status, total_cents, currency, shipping_address, created_at, updated_at, expires_at
         FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut orders = [order_from_row(&row)?];
    attach_lines(conn, &mut orders).await?;
    let [order] = orders;
    Ok(Some(order))
}

/// Marks `event_id` processed in `tx`; `false` when it was already. A concurrent delivery of
/// the same event waits on the key until the first transaction ends, then finds it taken.
async fn mark_processed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    event_id: Uuid,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "INSERT INTO processed_events (event_id, processed_at) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

#[async_trait]
impl OrderStore for PgOrderStore {
    async fn insert(&self, order: &Order) -> Result<(), StoreError> {
        // The order, its lines and its outbox rows in one statement, committed on its own: one
        // round trip and one WAL flush (as BEGIN, three inserts and COMMIT it was five round
        // trips). The lines' foreign key is checked at the end of the statement, when the
        // order row is there. (Batching orders into shared transactions, as products does with
        // reservations, measured no better: orders share no row to queue on.)
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "WITH new_order AS (
                    INSERT INTO orders (id, user_id, status, total_cents, currency, shipping_address, created_at, updated_at, expires_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ), lines AS (
                    INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents)
                    SELECT $1, * FROM unnest($10::uuid[], $11::bigint[], $12::bigint[])
                 )
                 {}",
                bus::outbox::PgOutboxRows::insert_sql(13)
            )
        });
        kit::pg::traced("INSERT orders order_items outbox", async {
            let event = order.event(bus::event::types::ORDER_CREATED)?;
            let outbox = bus::outbox::PgOutboxRows::of(&event, DESTINATIONS)?;
            let products: Vec<Uuid> = order.items.iter().map(|i| i.product_id).collect();
            let quantities: Vec<i64> = order.items.iter().map(|i| i.quantity).collect();
            let prices: Vec<i64> = order.items.iter().map(|i| i.unit_price.cents()).collect();
            let query = sqlx::query(SQL.as_str())
                .bind(order.id)
                .bind(order.user_id)
                .bind(order.status.as_str())
                .bind(order.total_amount.cents())
                .bind(order.currency.as_str())
                .bind(order.shipping_address.as_str())
                .bind(order.created_at.timestamp_millis())
                .bind(order.updated_at.timestamp_millis())
                .bind(order.expires_at.timestamp_millis())
                .bind(products)
                .bind(quantities)
                .bind(prices);
            outbox
                .bind(query)
                .execute(self.pg.pool())
                .await
                .map_err(|e| {
                    // Whichever of the three inserts met it first (their order inside one
                    // statement is not defined), a unique key taken means this order exists:
                    // its lines and event ids are keyed by its id.
                    if kit::pg::is_unique_violation(&e) {
                        StoreError::Duplicate
                    } else {
                        StoreError::Postgres(e)
                    }
                })?;
            self.wake_relay.notify_one();
            Ok(())
        })
        .await
    }

    async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        let mut conn = self.pg.pool().acquire().await?;
        load(&mut conn, id).await
    }

    async fn list_by_user(
        &self,
        user_id: Uuid,
        page: &PageRequest,
    ) -> Result<Page<Order>, StoreError> {
        let ((after_at, after_id), skip) = page.row_start()?;
        // One snapshot for the orders and their lines.
        let mut tx = self.pg.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT id, user_id, status, total_cents, currency, shipping_address, created_at, updated_at, expires_at
             FROM orders WHERE user_id = $1 AND (created_at, id) > ($2, $3)
             ORDER BY created_at, id LIMIT $4 OFFSET $5",
        )
        .bind(user_id)
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(page.limit) + 1)
        .bind(i64::from(skip))
        .fetch_all(&mut *tx)
        .await?;
        let mut orders = rows
            .iter()
            .map(order_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        attach_lines(&mut tx, &mut orders).await?;
        tx.commit().await?;
        Ok(Page::from_rows(orders, page.limit, order_cursor))
    }

    async fn transition(
        &self,
        id: Uuid,
        to: OrderStatus,
        event_id: Option<Uuid>,
    ) -> Result<Transition, StoreError> {
        kit::pg::traced("UPDATE orders; INSERT outbox", async {
            let mut tx = self.pg.pool().begin().await?;
            if let Some(event_id) = event_id {
                // A concurrent delivery of the same event waits here on the key until this
                // transaction ends, then finds it taken.
                if !mark_processed(&mut tx, event_id).await? {
                    let order = load(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
                    tx.commit().await?;
                    return Ok(Transition {
                        order,
                        changed: false,
                    });
                }
            }
            let from: Vec<&str> = OrderStatus::ALL
                .iter()
                .filter(|s| s.can_become(to))
                .map(|s| s.as_str())
                .collect();
            let now = now_ms();
            let updated = sqlx::query(
                "UPDATE orders SET status = $2, updated_at = $3 WHERE id = $1 AND status = ANY($4)",
            )
            .bind(id)
            .bind(to.as_str())
            .bind(now)
            .bind(&from)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            // Within the transaction: the row as this update left it, or as the winner committed it.
            let order = load(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
            if !updated {
                if order.status != to {
                    // Rolled back on drop, so a refused event is not marked as processed.
                    return Err(StoreError::IllegalTransition {
                        from: order.status,
                        to,
                    });
                }
                tx.commit().await?;
                return Ok(Transition {
                    order,
                    changed: false,
                });
            }
            bus::outbox::enqueue_pg(&mut tx, &order.event(&to.event_type())?, DESTINATIONS).await?;
            tx.commit().await?;
            self.wake_relay.notify_one();
            Ok(Transition {
                order,
                changed: true,
            })
        })
        .await
    }

    async fn announce(
        &self,
        id: Uuid,
        event_type: &str,
        event_id: Uuid,
    ) -> Result<bool, StoreError> {
        kit::pg::traced("UPDATE orders; INSERT outbox", async {
            let mut tx = self.pg.pool().begin().await?;
            if !mark_processed(&mut tx, event_id).await? {
                return Ok(false);
            }
            let order = load(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
            bus::outbox::enqueue_pg(
                &mut tx,
                &order.event_with_id(event_id, event_type)?,
                DESTINATIONS,
            )
            .await?;
            tx.commit().await?;
            self.wake_relay.notify_one();
            Ok(true)
        })
        .await
    }

    async fn pending_of_user(
        &self,
        user_id: Uuid,
        since: DateTime<Utc>,
    ) -> Result<(i64, i64), StoreError> {
        let (orders, units): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(DISTINCT o.id), COALESCE(SUM(i.quantity), 0)::BIGINT
             FROM orders o JOIN order_items i ON i.order_id = o.id
             WHERE o.user_id = $1 AND o.created_at >= $2 AND o.status = 'pending'",
        )
        .bind(user_id)
        .bind(since.timestamp_millis())
        .fetch_one(self.pg.pool())
        .await?;
        Ok((orders, units))
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dead_letters
             (topic, partition, record_offset, key, payload, reason, attempts, dead_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(&letter.topic)
        .bind(i64::from(letter.partition))
        .bind(letter.offset)
        .bind(&letter.key)
        .bind(&letter.payload)
        .bind(&letter.reason)
        .bind(i64::from(letter.attempts))
        .bind(now_ms())
        .execute(self.pg.pool())
        .await?;
        Ok(())
    }

    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        let rows: Vec<(String, i64, i64, String, String, String, i64)> = sqlx::query_as(
            "SELECT topic, partition, record_offset, key, payload, reason, attempts
             FROM dead_letters ORDER BY dead_at, topic, partition, record_offset LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.pg.pool())
        .await?;
        rows.into_iter()
            .map(
                |(topic, partition, offset, key, payload, reason, attempts)| {
                    Ok(DeadLetter {
                        topic,
                        partition: u32::try_from(partition).map_err(|_| StoreError::Corrupt)?,
                        offset,
                        key,
                        payload,
                        reason,
                        attempts: u32::try_from(attempts).map_err(|_| StoreError::Corrupt)?,
                    })
                },
            )
            .collect()
    }

    async fn expired_pending(&self, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM orders WHERE status = 'pending' AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now_ms())
        .bind(i64::from(limit))
        .fetch_all(self.pg.pool())
        .await?)
    }

    async fn prune_processed(&self, age: std::time::Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2);
        let mut removed = sqlx::query("DELETE FROM processed_events WHERE processed_at < $1")
            .bind(cutoff)
            .execute(self.pg.pool())
            .await?
            .rows_affected();
        removed += sqlx::query("DELETE FROM payment_versions WHERE seen_at < $1")
            .bind(cutoff)
            .execute(self.pg.pool())
            .await?
            .rows_affected();
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }

    async fn observe_payment_version(
        &self,
        order_id: Uuid,
        payment_id: Uuid,
        version: u64,
    ) -> Result<bool, StoreError> {
        let version = i64::try_from(version).map_err(|_| StoreError::Corrupt)?;
        // Concurrent deliveries of one payment's events serialise on its row.
        let newest = sqlx::query(
            "INSERT INTO payment_versions (payment_id, order_id, version, seen_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (payment_id) DO UPDATE SET version = EXCLUDED.version, seen_at = EXCLUDED.seen_at
             WHERE payment_versions.version <= EXCLUDED.version",
        )
        .bind(payment_id)
        .bind(order_id)
        .bind(version)
        .bind(now_ms())
        .execute(self.pg.pool())
        .await?
        .rows_affected()
            == 1;
        Ok(newest)
    }

    async fn count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM orders")
            .fetch_one(self.pg.pool())
            .await?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pg.pool()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pg.close().await;
    }
}
