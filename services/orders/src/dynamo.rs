//! The orders store on DynamoDB (feature `dynamodb`), with the same guarantees as the SQL
//! stores: every change and its outbox items commit in one `TransactWriteItems`, a transition
//! applies only from a status that may become the target (of concurrent attempts exactly one
//! changes the order), an event id is applied once. No scans.
//!
//! Table design (the seed's `orders` table), partition key `order_id` (S), items told apart by
//! `kind`:
//! - `order`: `order_id` = the order's UUID; `user_id`, `status`, `total_cents` (N, integer
//!   cents: exact), `currency`, `shipping_address`, `created_at`/`updated_at`/`expires_at`
//!   (N, Unix ms), and the lines as a list `items` of maps (`product_id`, `quantity`,
//!   `unit_price_cents`) in product-id order, so one read returns the whole order;
//!   - `user_sort` (S) = zero-padded `created_at` + `#` + id, the range key of GSI
//!     `user_id-created_at`: a user's orders oldest first with ties broken by id, as the SQL
//!     stores order them;
//!   - `pending` (S, always `pending`), present **only while the order is pending** (a
//!     transition out of pending removes it), the hash key of the sparse GSI
//!     `pending-expires_at` (range `expires_at`): the expiry sweep queries only pending orders;
//! - `event`: `order_id` = `event#<event id>`, `processed` (S, always `processed`),
//!   `processed_at` (N): a processed event id, put with `attribute_not_exists` in the
//!   transaction that applies the event; GSI `processed-processed_at` finds old ones to prune;
//! - `payment_version`: `order_id` = `payment#<payment id>`, `for_order`, `seen_version` (N): the
//!   newest version of the payment the saga has seen (older events are stale); it carries
//!   `processed`/`processed_at` too, so it is pruned with the processed events;
//! - `counter`: `order_id` = `count#<shard>` (8 shards), `orders` (N): incremented by the
//!   insert's transaction. Sharded so concurrent inserts rarely touch the same counter item
//!   (DynamoDB cancels transactions that collide on an item); `count` reads the 8 items.
//!
//! Transitions: read the order (consistently), decide with the shared rules
//! (`OrderStatus::can_become`), then one transaction: update the order on condition that its
//! status is still one that may become the target, put the processed event (if any) on
//! condition it is new, put the outbox items. When DynamoDB cancels it, the reason per item
//! tells: the event item's condition failed → already processed (no change); the order's
//! condition failed → another writer moved it: re-read and decide again (then it is "no
//! change" if it reached the target, "refused" if not). Conflicts with a concurrent
//! transaction are retried the same way.
//!
//! GSIs are eventually consistent on AWS: an order can take a moment to appear in
//! `list_by_user` or the expiry sweep; `get` and transitions read the table consistently.
//! `list_by_user`'s `skip` reads the skipped orders (DynamoDB has no offset).
//!
//! The outbox is the table `<table>-outbox` ([`bus::dynamo::DynamoOutbox`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use bus::dynamo::design::{Index, Kind, TableDesign};
use bus::dynamo::{
    CONDITION_FAILED, DynamoOutbox, TRANSACTION_CONFLICT, contention_pause, dynamo_error, n, s,
    transact,
};
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::now_ms;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::domain::OrderStatus;
use crate::store::{
    DESTINATIONS, DeadLetter, Order, OrderLine, OrderStore, StoreError, Transition, order_cursor,
};
use kit::page::{Page, PageRequest, Start};

pub const USER_INDEX: &str = "user_id-created_at";
pub const PENDING_INDEX: &str = "pending-expires_at";
pub const PROCESSED_INDEX: &str = "processed-processed_at";

/// The table's design (Terraform's `aws_dynamodb_table.orders`); `purge_at` is the TTL of the
/// Idempotency-Key items ([`DynamoOrderStore::idempotency_keys`]).
pub const TABLE: TableDesign = TableDesign {
    hash: "order_id",
    range: None,
    attributes: &[
        ("order_id", Kind::S),
        ("user_id", Kind::S),
        ("user_sort", Kind::S),
        ("pending", Kind::S),
        ("expires_at", Kind::N),
        ("processed", Kind::S),
        ("processed_at", Kind::N),
    ],
    indexes: &[
        Index {
            name: USER_INDEX,
            hash: "user_id",
            range: Some("user_sort"),
        },
        Index {
            name: PENDING_INDEX,
            hash: "pending",
            range: Some("expires_at"),
        },
        Index {
            name: PROCESSED_INDEX,
            hash: "processed",
            range: Some("processed_at"),
        },
    ],
    ttl: Some("purge_at"),
};

/// Counter shards: enough that concurrent inserts seldom collide, few enough to read at once.
const COUNTER_SHARDS: u32 = 8;

/// How often a contended write is retried before the request fails; each retry re-reads, so
/// only sustained contention exhausts it.
const ATTEMPTS: u32 = 60;

#[derive(Debug, Clone)]
pub struct DynamoOrderStore {
    client: Client,
    table: String,
    outbox: DynamoOutbox,
    wake_relay: Arc<Notify>,
}

fn remote(e: impl std::fmt::Display) -> StoreError {
    StoreError::Dynamo(e.to_string())
}

fn event_key(event_id: Uuid) -> String {
    format!("event#{event_id}")
}

fn user_sort(order: &Order) -> String {
    sort_key(order.created_at.timestamp_millis(), order.id)
}

/// `user_sort` for an order made at `created_at_ms`: text that sorts as `(created_at, id)`.
fn sort_key(created_at_ms: i64, id: Uuid) -> String {
    format!("{created_at_ms:020}#{id}")
}

impl DynamoOrderStore {
    /// A query of the user index for one user's orders (`:u`), oldest first; callers narrow
    /// the key condition (`user_sort` ranges) and the page.
    fn user_orders(
        &self,
        user_id: Uuid,
    ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
        self.client
            .query()
            .table_name(&self.table)
            .index_name(USER_INDEX)
            .key_condition_expression("user_id = :u")
            .expression_attribute_values(":u", s(user_id.to_string()))
    }

    /// The `user_sort` of the user's `skip`-th order (1-based), reading only that attribute;
    /// `None` when they have fewer.
    async fn user_sort_at(&self, user_id: Uuid, skip: u32) -> Result<Option<String>, StoreError> {
        let mut keys = self
            .user_orders(user_id)
            .projection_expression("user_sort")
            .limit(i32::try_from(skip).unwrap_or(i32::MAX).min(1000))
            .into_paginator()
            .items()
            .send();
        let mut seen = 0;
        while let Some(item) = keys.next().await {
            let item = item.map_err(|e| remote(dynamo_error("skipping a user's orders", e)))?;
            seen += 1;
            if seen == skip {
                return Ok(Some(
                    item.get("user_sort")
                        .and_then(|v| v.as_s().ok())
                        .ok_or(StoreError::Corrupt)?
                        .clone(),
                ));
            }
        }
        Ok(None)
    }

    /// A store over `table`, its outbox in `outbox`.
    pub fn new(client: Client, table: impl Into<String>, outbox: DynamoOutbox) -> Self {
        DynamoOrderStore {
            client,
            table: table.into(),
            outbox,
            wake_relay: Arc::new(Notify::new()),
        }
    }

    /// From `dynamodb://TABLE?region=REGION&endpoint=URL`; the outbox is `TABLE-outbox`.
    pub async fn from_url(url: &str) -> Result<Self, StoreError> {
        let parsed = kit::dynamo_url::parse(url).map_err(remote)?;
        let client = bus::dynamo::client(&bus::dynamo::sdk_config(&parsed).await);
        let outbox = DynamoOutbox::beside(client.clone(), &parsed.table);
        Ok(Self::new(client, parsed.table, outbox))
    }

    /// The outbox, for [`bus::outbox::Relay::on_dynamo`].
    pub fn outbox(&self) -> &DynamoOutbox {
        &self.outbox
    }

    /// `Idempotency-Key` records as items of this table (partition key `idempotency#<key>`),
    /// shared by every replica like the rest of the table.
    pub fn idempotency_keys(
        &self,
        ttl: Duration,
        body_limit: usize,
    ) -> kit::idempotency::Idempotency {
        kit::idempotency::Idempotency::on_dynamo(
            self.client.clone(),
            self.table.clone(),
            "order_id",
            ttl,
            body_limit,
        )
    }

    /// Lets the outbox relay know, right after commit, that events are waiting.
    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> Self {
        self.wake_relay = wake;
        self
    }

    /// Creates the table (with its three indexes) and the outbox table where missing: for
    /// local servers and tests; AWS gets its tables from Terraform.
    pub async fn ensure_table(&self) -> Result<(), StoreError> {
        self.outbox.ensure_table().await.map_err(remote)?;
        TABLE
            .create_if_missing(&self.client, &self.table)
            .await
            .map_err(remote)
    }

    async fn load(&self, key: &str) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("order_id", s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| remote(dynamo_error("reading an order", e)))?;
        Ok(out.item)
    }

    fn put_new(
        &self,
        item: HashMap<String, AttributeValue>,
    ) -> Result<TransactWriteItem, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(order_id)")
            .build()
            .map_err(remote)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    fn processed_item(event_id: Uuid, now: i64) -> HashMap<String, AttributeValue> {
        HashMap::from([
            ("order_id".to_owned(), s(event_key(event_id))),
            ("kind".to_owned(), s("event")),
            ("processed".to_owned(), s("processed")),
            ("processed_at".to_owned(), n(now)),
        ])
    }

    /// The order as it is now, for answers that change nothing.
    async fn current(&self, id: Uuid) -> Result<Order, StoreError> {
        self.get(id).await?.ok_or(StoreError::NotFound)
    }

    /// Marks `event_id` processed on its own (a delivery whose move is already done); whether
    /// it was new does not matter to the caller.
    async fn mark_processed(&self, event_id: Uuid) -> Result<(), StoreError> {
        self.put_if_absent(
            Self::processed_item(event_id, now_ms()),
            "recording a processed event",
        )
        .await
    }

    /// Puts `item` unless its key exists; an existing one is left as it is (not an error).
    async fn put_if_absent(
        &self,
        item: HashMap<String, AttributeValue>,
        what: &str,
    ) -> Result<(), StoreError> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(order_id)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(remote(dynamo_error(what, e))),
        }
    }
}

fn to_item(o: &Order) -> HashMap<String, AttributeValue> {
    let lines = o
        .items
        .iter()
        .map(|l| {
            AttributeValue::M(HashMap::from([
                ("product_id".to_owned(), s(l.product_id.to_string())),
                ("quantity".to_owned(), n(l.quantity)),
                ("unit_price_cents".to_owned(), n(l.unit_price.cents())),
            ]))
        })
        .collect();
    let mut item = HashMap::from([
        ("order_id".to_owned(), s(o.id.to_string())),
        ("kind".to_owned(), s("order")),
        ("user_id".to_owned(), s(o.user_id.to_string())),
        ("user_sort".to_owned(), s(user_sort(o))),
        ("status".to_owned(), s(o.status.as_str())),
        ("total_cents".to_owned(), n(o.total_amount.cents())),
        ("currency".to_owned(), s(&o.currency)),
        ("shipping_address".to_owned(), s(&o.shipping_address)),
        ("created_at".to_owned(), n(o.created_at.timestamp_millis())),
        ("updated_at".to_owned(), n(o.updated_at.timestamp_millis())),
        ("expires_at".to_owned(), n(o.expires_at.timestamp_millis())),
        ("items".to_owned(), AttributeValue::L(lines)),
    ]);
    if o.status == OrderStatus::Pending {
        item.insert("pending".to_owned(), s("pending"));
    }
    item
}

fn number(item: &HashMap<String, AttributeValue>, k: &str) -> Result<i64, StoreError> {
    item.get(k)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .ok_or(StoreError::Corrupt)
}

fn text(item: &HashMap<String, AttributeValue>, k: &str) -> Result<String, StoreError> {
    item.get(k)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .ok_or(StoreError::Corrupt)
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Order, StoreError> {
    if text(item, "kind")? != "order" {
        return Err(StoreError::Corrupt);
    }
    let id = |k: &str| -> Result<Uuid, StoreError> {
        text(item, k)?.parse().map_err(|_| StoreError::Corrupt)
    };
    let time = |k: &str| -> Result<DateTime<Utc>, StoreError> {
        DateTime::from_timestamp_millis(number(item, k)?).ok_or(StoreError::Corrupt)
    };
    let mut items = Vec::new();
    for line in item
        .get("items")
        .and_then(|v| v.as_l().ok())
        .ok_or(StoreError::Corrupt)?
    {
        let line = line.as_m().map_err(|_| StoreError::Corrupt)?;
        let quantity = number(line, "quantity")?;
        let unit_price = Money::from_cents(number(line, "unit_price_cents")?)
            .map_err(|_| StoreError::Corrupt)?;
        items.push(OrderLine {
            product_id: text(line, "product_id")?
                .parse()
                .map_err(|_| StoreError::Corrupt)?,
            quantity,
            unit_price,
            line_total: unit_price
                .checked_mul(quantity)
                .ok_or(StoreError::Corrupt)?,
        });
    }
    Ok(Order {
        id: id("order_id")?,
        user_id: id("user_id")?,
        status: text(item, "status")?
            .parse()
            .map_err(|()| StoreError::Corrupt)?,
        items,
        total_amount: Money::from_cents(number(item, "total_cents")?)
            .map_err(|_| StoreError::Corrupt)?,
        currency: text(item, "currency")?,
        shipping_address: text(item, "shipping_address")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        expires_at: time("expires_at")?,
    })
}

#[async_trait]
impl OrderStore for DynamoOrderStore {
    async fn insert(&self, order: &Order) -> Result<(), StoreError> {
        let event = order.event(bus::event::types::ORDER_CREATED)?;
        // Lines in product-id order, as the SQL stores return them.
        let mut sorted = order.clone();
        sorted.items.sort_by_key(|l| l.product_id);
        for _ in 0..ATTEMPTS {
            let counter = Update::builder()
                .table_name(&self.table)
                .key(
                    "order_id",
                    s(format!("count#{}", fastrand::u32(0..COUNTER_SHARDS))),
                )
                .update_expression("SET kind = :kind ADD orders :one")
                .expression_attribute_values(":kind", s("counter"))
                .expression_attribute_values(":one", n(1))
                .build()
                .map_err(remote)?;
            let mut items = vec![
                self.put_new(to_item(&sorted))?,
                TransactWriteItem::builder().update(counter).build(),
            ];
            items.extend(self.outbox.items(&event, DESTINATIONS).map_err(remote)?);
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => {
                    self.wake_relay.notify_one();
                    return Ok(());
                }
                Err(codes) if codes.first().map(String::as_str) == Some(CONDITION_FAILED) => {
                    return Err(StoreError::Duplicate);
                }
                // Another insert held the same counter shard: try again (maybe another shard).
                Err(codes) if codes.iter().any(|c| c == TRANSACTION_CONFLICT) => {
                    contention_pause().await
                }
                Err(codes) => {
                    return Err(StoreError::Dynamo(format!(
                        "inserting an order was cancelled: {codes:?}"
                    )));
                }
            }
        }
        Err(StoreError::Dynamo(
            "inserting an order kept conflicting with other writes".into(),
        ))
    }

    async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        self.load(&id.to_string())
            .await?
            .as_ref()
            .map(from_item)
            .transpose()
    }

    async fn list_by_user(
        &self,
        user_id: Uuid,
        page: &PageRequest,
    ) -> Result<Page<Order>, StoreError> {
        // The user index's range key is the SQL stores' sort key, `created_at` then id, as
        // text: a cursor's row is a key range start, and cursors mean the same on every backend.
        let ((after_at, after_id), skip) = page.row_start()?;
        let mut after = match page.start {
            Start::After(_) => Some(sort_key(after_at, after_id)),
            Start::Skip(_) => None,
        };
        if skip > 0 {
            // The seed's offset (bounded by kit::page::MAX_SKIP): walk past it reading keys only.
            after = self.user_sort_at(user_id, skip).await?;
            if after.is_none() {
                return Ok(Page::last(Vec::new()));
            }
        }
        let limit = page.limit;
        let mut query = self
            .user_orders(user_id)
            .limit(i32::try_from(limit + 1).unwrap_or(i32::MAX));
        if let Some(after) = after {
            query = query
                .key_condition_expression("user_id = :u AND user_sort > :after")
                .expression_attribute_values(":after", s(after));
        }
        // Pages until `limit + 1` orders or the end (a page stops at 1 MB).
        let mut items = query.into_paginator().items().send();
        let mut orders = Vec::new();
        while orders.len() <= limit as usize {
            match items.next().await {
                Some(item) => orders.push(from_item(
                    &item.map_err(|e| remote(dynamo_error("listing a user's orders", e)))?,
                )?),
                None => break,
            }
        }
        Ok(Page::from_rows(orders, limit, order_cursor))
    }

    async fn transition(
        &self,
        id: Uuid,
        to: OrderStatus,
        event_id: Option<Uuid>,
    ) -> Result<Transition, StoreError> {
        for _ in 0..ATTEMPTS {
            // A redelivered event: recognised whatever the order's status now.
            if let Some(event_id) = event_id
                && self.load(&event_key(event_id)).await?.is_some()
            {
                return Ok(Transition {
                    order: self.current(id).await?,
                    changed: false,
                });
            }
            let order = self.current(id).await?;
            if order.status == to {
                // Already there: record the delivery (as the SQL stores do) and change nothing.
                if let Some(event_id) = event_id {
                    self.mark_processed(event_id).await?;
                }
                return Ok(Transition {
                    order,
                    changed: false,
                });
            }
            if !order.status.can_become(to) {
                // Not marked as processed: the event applies once it can.
                return Err(StoreError::IllegalTransition {
                    from: order.status,
                    to,
                });
            }
            let now = now_ms();
            let mut next = order.clone();
            next.status = to;
            next.updated_at = DateTime::from_timestamp_millis(now).ok_or(StoreError::Corrupt)?;
            let from: Vec<&str> = OrderStatus::ALL
                .iter()
                .filter(|s| s.can_become(to))
                .map(|s| s.as_str())
                .collect();
            let mut update = Update::builder()
                .table_name(&self.table)
                .key("order_id", s(id.to_string()))
                // Leaving pending drops the order from the sparse expiry index.
                .update_expression("SET #status = :to, updated_at = :now REMOVE pending")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":to", s(to.as_str()))
                .expression_attribute_values(":now", n(now));
            let mut allowed = Vec::with_capacity(from.len());
            for (i, status) in from.iter().enumerate() {
                let name = format!(":from{i}");
                update = update.expression_attribute_values(&name, s(*status));
                allowed.push(name);
            }
            let update = update
                .condition_expression(format!("#status IN ({})", allowed.join(", ")))
                .build()
                .map_err(remote)?;
            let mut items = vec![TransactWriteItem::builder().update(update).build()];
            if let Some(event_id) = event_id {
                items.push(self.put_new(Self::processed_item(event_id, now))?);
            }
            items.extend(
                self.outbox
                    .items(&next.event(&to.event_type())?, DESTINATIONS)
                    .map_err(remote)?,
            );
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => {
                    self.wake_relay.notify_one();
                    return Ok(Transition {
                        order: next,
                        changed: true,
                    });
                }
                Err(codes) => {
                    if event_id.is_some()
                        && codes.get(1).map(String::as_str) == Some(CONDITION_FAILED)
                    {
                        // A concurrent delivery of the same event applied it.
                        return Ok(Transition {
                            order: self.current(id).await?,
                            changed: false,
                        });
                    }
                    let moved = codes.first().map(String::as_str) == Some(CONDITION_FAILED);
                    if !moved && !codes.iter().any(|c| c == TRANSACTION_CONFLICT) {
                        return Err(StoreError::Dynamo(format!(
                            "a transition was cancelled: {codes:?}"
                        )));
                    }
                    // Another writer moved the order (or held it): decide again on what it
                    // left, without a pause when it committed (the answer is ready).
                    if !moved {
                        contention_pause().await;
                    }
                }
            }
        }
        Err(StoreError::Dynamo(
            "a transition kept conflicting with other writes".into(),
        ))
    }

    async fn announce(
        &self,
        id: Uuid,
        event_type: &str,
        event_id: Uuid,
    ) -> Result<bool, StoreError> {
        let order = self.current(id).await?;
        let mut items = vec![self.put_new(Self::processed_item(event_id, now_ms()))?];
        items.extend(
            self.outbox
                .items(&order.event_with_id(event_id, event_type)?, DESTINATIONS)
                .map_err(remote)?,
        );
        match transact(&self.client, items).await.map_err(remote)? {
            Ok(()) => {
                self.wake_relay.notify_one();
                Ok(true)
            }
            Err(codes) if codes.first().map(String::as_str) == Some(CONDITION_FAILED) => Ok(false),
            Err(codes) => Err(StoreError::Dynamo(format!(
                "an announcement was cancelled: {codes:?}"
            ))),
        }
    }

    async fn pending_of_user(
        &self,
        user_id: Uuid,
        since: DateTime<Utc>,
    ) -> Result<(i64, i64), StoreError> {
        // The user index's range key starts with the zero-padded creation time: only the
        // window is read.
        let mut pages = self
            .user_orders(user_id)
            .key_condition_expression("user_id = :u AND user_sort >= :since")
            .filter_expression("#status = :pending")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":since", s(format!("{:020}", since.timestamp_millis())))
            .expression_attribute_values(":pending", s(OrderStatus::Pending.as_str()))
            .into_paginator()
            .items()
            .send();
        let (mut orders, mut units) = (0, 0);
        while let Some(item) = pages.next().await {
            let item =
                item.map_err(|e| remote(dynamo_error("counting a user's pending orders", e)))?;
            orders += 1;
            units += from_item(&item)?.items_count();
        }
        Ok((orders, units))
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let key = format!(
            "deadletter#{}#{}#{}",
            letter.topic, letter.partition, letter.offset
        );
        let item = HashMap::from([
            ("order_id".to_owned(), s(key)),
            ("kind".to_owned(), s("deadletter")),
            ("topic".to_owned(), s(&letter.topic)),
            ("partition".to_owned(), n(i64::from(letter.partition))),
            ("record_offset".to_owned(), n(letter.offset)),
            ("key".to_owned(), s(&letter.key)),
            ("payload".to_owned(), s(&letter.payload)),
            ("reason".to_owned(), s(&letter.reason)),
            ("attempts".to_owned(), n(i64::from(letter.attempts))),
            ("dead_at".to_owned(), n(now_ms())),
        ]);
        self.put_if_absent(item, "storing a dead letter").await
    }

    /// A scan: dead letters are rare and read by an operator, never on a request's path.
    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        let mut pages = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .filter_expression("#kind = :kind")
            .expression_attribute_names("#kind", "kind")
            .expression_attribute_values(":kind", s("deadletter"))
            .into_paginator()
            .items()
            .send();
        let mut letters = Vec::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(|e| remote(dynamo_error("reading dead letters", e)))?;
            letters.push((
                number(&item, "dead_at")?,
                DeadLetter {
                    topic: text(&item, "topic")?,
                    partition: u32::try_from(number(&item, "partition")?)
                        .map_err(|_| StoreError::Corrupt)?,
                    offset: number(&item, "record_offset")?,
                    key: text(&item, "key")?,
                    payload: text(&item, "payload")?,
                    reason: text(&item, "reason")?,
                    attempts: u32::try_from(number(&item, "attempts")?)
                        .map_err(|_| StoreError::Corrupt)?,
                },
            ));
        }
        letters.sort_by(|(at_a, a), (at_b, b)| {
            (at_a, &a.topic, a.partition, a.offset).cmp(&(at_b, &b.topic, b.partition, b.offset))
        });
        Ok(letters
            .into_iter()
            .take(limit as usize)
            .map(|(_, letter)| letter)
            .collect())
    }

    async fn expired_pending(&self, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        let page = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(PENDING_INDEX)
            .key_condition_expression("pending = :p AND expires_at <= :now")
            .expression_attribute_values(":p", s("pending"))
            .expression_attribute_values(":now", n(now_ms()))
            .limit(i32::try_from(limit).unwrap_or(1000).clamp(1, 1000))
            .send()
            .await
            .map_err(|e| remote(dynamo_error("finding expired orders", e)))?;
        page.items()
            .iter()
            .map(|item| {
                text(item, "order_id")?
                    .parse()
                    .map_err(|_| StoreError::Corrupt)
            })
            .collect()
    }

    async fn observe_payment_version(
        &self,
        order_id: Uuid,
        payment_id: Uuid,
        version: u64,
    ) -> Result<bool, StoreError> {
        let version = i64::try_from(version).map_err(|_| StoreError::Corrupt)?;
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("order_id", s(format!("payment#{payment_id}")))
            // Names through placeholders: `processed` is one of DynamoDB's reserved words.
            .update_expression("SET #kind = :kind, #order = :order, #v = :v, #p = :p, #at = :now")
            .condition_expression("attribute_not_exists(#v) OR #v <= :v")
            .expression_attribute_names("#kind", "kind")
            .expression_attribute_names("#order", "for_order")
            .expression_attribute_names("#v", "seen_version")
            .expression_attribute_names("#p", "processed")
            .expression_attribute_names("#at", "processed_at")
            .expression_attribute_values(":kind", s("payment_version"))
            .expression_attribute_values(":order", s(order_id.to_string()))
            .expression_attribute_values(":v", n(version))
            .expression_attribute_values(":p", s("processed"))
            .expression_attribute_values(":now", n(now_ms()))
            .send()
            .await;
        match update {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(remote(dynamo_error("recording a payment version", e))),
        }
    }

    async fn prune_processed(&self, age: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2);
        let mut removed = 0;
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(PROCESSED_INDEX)
                .key_condition_expression("processed = :p AND processed_at < :cutoff")
                .expression_attribute_values(":p", s("processed"))
                .expression_attribute_values(":cutoff", n(cutoff))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| remote(dynamo_error("finding old processed events", e)))?;
            for item in page.items() {
                self.client
                    .delete_item()
                    .table_name(&self.table)
                    .key("order_id", s(text(item, "order_id")?))
                    .send()
                    .await
                    .map_err(|e| remote(dynamo_error("forgetting a processed event", e)))?;
                removed += 1;
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(removed),
            }
        }
    }

    async fn count(&self) -> Result<i64, StoreError> {
        let mut total = 0;
        for shard in 0..COUNTER_SHARDS {
            if let Some(item) = self.load(&format!("count#{shard}")).await? {
                total += number(&item, "orders")?;
            }
        }
        Ok(total)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| remote(dynamo_error("describing the orders table", e)))
    }

    /// Nothing to flush: every write is committed when it returns.
    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A table declared differently on AWS would fail there only: hold Terraform to the code.
    #[test]
    fn terraform_declares_the_table_the_code_uses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/terraform/aws/dynamodb.tf"
        );
        let hcl = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            super::TABLE.terraform_mismatches(&hcl, "orders"),
            Vec::<String>::new(),
            "{path}"
        );
    }

    #[test]
    fn items_round_trip_with_lines_and_the_pending_marker() {
        let at = DateTime::from_timestamp_millis(1_764_000_000_123).unwrap();
        let price = Money::from_cents(1999).unwrap();
        let mut o = Order {
            id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            status: OrderStatus::Pending,
            items: vec![OrderLine {
                product_id: Uuid::now_v7(),
                quantity: 2,
                unit_price: price,
                line_total: Money::from_cents(3998).unwrap(),
            }],
            total_amount: Money::from_cents(3998).unwrap(),
            currency: "USD".into(),
            shipping_address: "1 Main St".into(),
            created_at: at,
            updated_at: at,
            expires_at: at,
        };
        let item = to_item(&o);
        assert_eq!(item["total_cents"], AttributeValue::N("3998".into()));
        assert_eq!(item["pending"], AttributeValue::S("pending".into()));
        assert_eq!(
            item["user_sort"],
            AttributeValue::S(format!("00000001764000000123#{}", o.id))
        );
        assert_eq!(from_item(&item).unwrap(), o);
        o.status = OrderStatus::Paid;
        assert!(!to_item(&o).contains_key("pending"));
    }
}
