//! The payments store on DynamoDB (feature `dynamodb`), with the same guarantees as the SQL
//! stores: each change and its outbox items commit in one `TransactWriteItems`, an order has
//! at most one payment in flight or successful under any concurrency, a pending payment is
//! finished once, refunds never sum past the charge and only count against the version they
//! were computed from. No read scans.
//!
//! Table design (the seed's `payments` table), partition key `payment_id` (S), three kinds of
//! item told apart by `kind`:
//! - `payment`: `payment_id` = the payment's UUID; `order_id`, `amount_cents` and
//!   `refunded_cents` (N, integer cents: exact), `status`, `version` (N),
//!   `created_at`/`updated_at` (N, Unix ms), the optional provider and card fields only when
//!   present, and `pending` (S, always `pending`) only while the payment is pending;
//! - `active` guard: `payment_id` = `active#<order_id>`, `holder` = the payment holding the
//!   order (pending, succeeded or partially refunded). Beginning a payment puts the payment
//!   *and* the guard, both with `attribute_not_exists(payment_id)`: a second attempt fails the
//!   guard's condition and the whole transaction is cancelled ([`StoreError::InProgress`] or
//!   [`StoreError::AlreadyPaid`], by the holder's status). A failure, an abandoned intent or a
//!   full refund deletes the guard in its own transaction, as the SQL partial unique index
//!   stops counting such payments. (The `success#<order_id>` guards of earlier versions are
//!   left alone and no longer read.)
//! - `refund`: `payment_id` = `refund#<refund id>`, `refund_of`, `amount_cents`, `created_at`.
//!
//! GSI `order_id-created_at` (hash `order_id` S, range `created_at` N) serves `by_order`; only
//! payment items carry `order_id`, so guards and refunds stay out of it. The sparse GSI
//! `pending-created_at` (hash `pending`, range `created_at`) holds only pending payments: the
//! reconciler's query. GSIs are eventually consistent on AWS: a payment can take a moment to
//! appear in them, whereas `get` reads the base table consistently.
//!
//! Finishing and refunding use optimistic concurrency: read the payment, apply the shared
//! rules, then one transaction updates it on condition that it is still pending (finish) or
//! still at the version read (refund), with the outbox items.
//!
//! The outbox is the table `<table>-outbox` ([`bus::dynamo::DynamoOutbox`]).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem, Update};
use bus::dynamo::design::{Index, Kind, TableDesign};
use bus::dynamo::{
    CONDITION_FAILED, DynamoOutbox, TRANSACTION_CONFLICT, contention_pause, dynamo_error, n, s,
    transact,
};
use bus::event::types;
use chrono::{DateTime, Utc};
use kit::Money;
use kit::db::now_ms;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::store::{
    DESTINATIONS, Finished, NewRefund, Payment, PaymentStore, Refund, Settlement, StoreError,
    apply_new_refund, apply_settlement, event_for, outcome_event,
};

pub const ORDER_INDEX: &str = "order_id-created_at";
pub const PENDING_INDEX: &str = "pending-created_at";

/// The table's design (Terraform's `aws_dynamodb_table.payments`); `purge_at` is the TTL of the
/// Idempotency-Key items ([`DynamoPaymentStore::idempotency_keys`]).
pub const TABLE: TableDesign = TableDesign {
    hash: "payment_id",
    range: None,
    attributes: &[
        ("payment_id", Kind::S),
        ("order_id", Kind::S),
        ("created_at", Kind::N),
        ("pending", Kind::S),
    ],
    indexes: &[
        Index {
            name: ORDER_INDEX,
            hash: "order_id",
            range: Some("created_at"),
        },
        Index {
            name: PENDING_INDEX,
            hash: "pending",
            range: Some("created_at"),
        },
    ],
    ttl: Some("purge_at"),
};

/// How often a contended write (a refund racing another, a transaction conflict) is retried
/// before the request fails; each retry re-reads, so only sustained contention exhausts it.
const ATTEMPTS: u32 = 60;

#[derive(Debug, Clone)]
pub struct DynamoPaymentStore {
    client: Client,
    table: String,
    outbox: DynamoOutbox,
    wake_relay: Arc<Notify>,
}

fn remote(e: impl std::fmt::Display) -> StoreError {
    StoreError::Dynamo(e.to_string())
}

fn guard_key(order_id: Uuid) -> String {
    format!("active#{order_id}")
}

impl DynamoPaymentStore {
    /// A store over `table`, its outbox in `outbox`.
    pub fn new(client: Client, table: impl Into<String>, outbox: DynamoOutbox) -> Self {
        DynamoPaymentStore {
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
        ttl: std::time::Duration,
        body_limit: usize,
    ) -> kit::idempotency::Idempotency {
        kit::idempotency::Idempotency::on_dynamo(
            self.client.clone(),
            self.table.clone(),
            "payment_id",
            ttl,
            body_limit,
        )
    }

    /// Lets the outbox relay know, right after commit, that events are waiting.
    pub fn with_relay_waker(mut self, wake: Arc<Notify>) -> Self {
        self.wake_relay = wake;
        self
    }

    /// Creates the table (with its index) and the outbox table where missing: for local
    /// servers and tests; AWS gets its tables from Terraform.
    pub async fn ensure_table(&self) -> Result<(), StoreError> {
        self.outbox.ensure_table().await.map_err(remote)?;
        TABLE
            .create_if_missing(&self.client, &self.table)
            .await
            .map_err(remote)
    }

    fn put(&self, item: HashMap<String, AttributeValue>) -> Result<TransactWriteItem, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(payment_id)")
            .build()
            .map_err(remote)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    async fn load(&self, id: &str) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("payment_id", s(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| remote(dynamo_error("reading a payment", e)))?;
        Ok(out.item)
    }
}

fn to_item(p: &Payment) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        ("payment_id".to_owned(), s(p.id.to_string())),
        ("kind".to_owned(), s("payment")),
        ("order_id".to_owned(), s(p.order_id.to_string())),
        ("amount_cents".to_owned(), n(p.amount.cents())),
        ("currency".to_owned(), s(&p.currency)),
        ("status".to_owned(), s(&p.status)),
        ("payment_method".to_owned(), s(&p.payment_method)),
        ("refunded_cents".to_owned(), n(p.refunded_amount.cents())),
        (
            "version".to_owned(),
            n(i64::try_from(p.version).unwrap_or(i64::MAX)),
        ),
        ("created_at".to_owned(), n(p.created_at.timestamp_millis())),
        ("updated_at".to_owned(), n(p.updated_at.timestamp_millis())),
    ]);
    if p.is_pending() {
        item.insert("pending".to_owned(), s("pending"));
    }
    for (name, value) in [
        ("card_brand", &p.card_brand),
        ("card_last4", &p.card_last4),
        ("provider_reference", &p.provider_reference),
        ("failure_reason", &p.failure_reason),
    ] {
        if let Some(value) = value {
            item.insert(name.to_owned(), s(value));
        }
    }
    item
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Payment, StoreError> {
    let text = |k: &str| -> Option<String> { item.get(k).and_then(|v| v.as_s().ok()).cloned() };
    let required = |k: &str| text(k).ok_or(StoreError::Corrupt);
    let number = |k: &str| -> Result<i64, StoreError> {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .ok_or(StoreError::Corrupt)
    };
    let id = |k: &str| -> Result<Uuid, StoreError> {
        required(k)?.parse().map_err(|_| StoreError::Corrupt)
    };
    let money = |k: &str| -> Result<Money, StoreError> {
        Money::from_cents(number(k)?).map_err(|_| StoreError::Corrupt)
    };
    let time = |k: &str| -> Result<DateTime<Utc>, StoreError> {
        DateTime::from_timestamp_millis(number(k)?).ok_or(StoreError::Corrupt)
    };
    if text("kind").as_deref() != Some("payment") {
        return Err(StoreError::Corrupt);
    }
    let status = required("status")?;
    // Payments written before versions existed were finished ones (version 1 at least).
    let version = match item.get("version") {
        Some(_) => u64::try_from(number("version")?).map_err(|_| StoreError::Corrupt)?,
        None if status == "pending" => 0,
        None => 1,
    };
    Ok(Payment {
        id: id("payment_id")?,
        order_id: id("order_id")?,
        amount: money("amount_cents")?,
        currency: required("currency")?,
        status,
        payment_method: required("payment_method")?,
        card_brand: text("card_brand"),
        card_last4: text("card_last4"),
        provider_reference: text("provider_reference"),
        failure_reason: text("failure_reason"),
        refunded_amount: money("refunded_cents")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        version,
    })
}

impl DynamoPaymentStore {
    /// Deletes the order's guard, if `holder` still holds it.
    fn release(&self, order_id: Uuid, holder: Uuid) -> Result<TransactWriteItem, StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .key("payment_id", s(guard_key(order_id)))
            .condition_expression("holder = :holder")
            .expression_attribute_values(":holder", s(holder.to_string()))
            .build()
            .map_err(remote)?;
        Ok(TransactWriteItem::builder().delete(delete).build())
    }

    /// Which refusal a held order means: its holder is pending, or it is paid. `None` when the
    /// guard is gone meanwhile (try again).
    async fn holder_refusal(&self, order_id: Uuid) -> Result<Option<StoreError>, StoreError> {
        let Some(guard) = self.load(&guard_key(order_id)).await? else {
            return Ok(None);
        };
        let holder = guard
            .get("holder")
            .and_then(|v| v.as_s().ok())
            .ok_or(StoreError::Corrupt)?;
        let status = self
            .load(holder)
            .await?
            .as_ref()
            .map(from_item)
            .transpose()?
            .map(|p| p.status);
        Ok(Some(match status.as_deref() {
            Some("succeeded" | "partially_refunded") => StoreError::AlreadyPaid,
            _ => StoreError::InProgress,
        }))
    }
}

#[async_trait]
impl PaymentStore for DynamoPaymentStore {
    async fn begin(&self, payment: &Payment) -> Result<(), StoreError> {
        let mut pending = payment.clone();
        pending.status = "pending".into();
        pending.version = 0;
        for _ in 0..ATTEMPTS {
            let items = vec![
                self.put(to_item(&pending))?,
                self.put(HashMap::from([
                    ("payment_id".to_owned(), s(guard_key(pending.order_id))),
                    ("kind".to_owned(), s("active")),
                    ("holder".to_owned(), s(pending.id.to_string())),
                ]))?,
            ];
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => return Ok(()),
                Err(codes) => {
                    if codes.first().map(String::as_str) == Some(CONDITION_FAILED) {
                        return Err(StoreError::Dynamo(format!(
                            "payment {} is already recorded",
                            pending.id
                        )));
                    }
                    if codes.get(1).map(String::as_str) == Some(CONDITION_FAILED)
                        && let Some(refusal) = self.holder_refusal(pending.order_id).await?
                    {
                        return Err(refusal);
                    }
                    // A racing transaction on the guard, or a guard released meanwhile: retry.
                    if !codes
                        .iter()
                        .any(|c| c == TRANSACTION_CONFLICT || c == CONDITION_FAILED)
                    {
                        return Err(StoreError::Dynamo(format!(
                            "beginning a payment was cancelled: {codes:?}"
                        )));
                    }
                    contention_pause().await;
                }
            }
        }
        Err(StoreError::Dynamo(
            "beginning a payment kept conflicting with other writes".into(),
        ))
    }

    async fn finish(&self, id: Uuid, settlement: &Settlement) -> Result<Finished, StoreError> {
        for _ in 0..ATTEMPTS {
            let current = self.get(id).await?.ok_or(StoreError::NotFound)?;
            let Some(payment) = apply_settlement(current.clone(), settlement, now_ms()) else {
                return Ok(Finished {
                    payment: current,
                    changed: false,
                });
            };
            let mut set = vec!["#status = :status", "#v = :v", "updated_at = :now"];
            let mut update = Update::builder()
                .table_name(&self.table)
                .key("payment_id", s(id.to_string()))
                .condition_expression("#status = :pending")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":pending", s("pending"))
                .expression_attribute_values(":status", s(&payment.status))
                .expression_attribute_values(":v", n(1))
                .expression_attribute_values(":now", n(payment.updated_at.timestamp_millis()));
            for (name, placeholder, value) in [
                (
                    "provider_reference",
                    ":reference",
                    &payment.provider_reference,
                ),
                ("failure_reason", ":reason", &payment.failure_reason),
                ("card_brand", ":brand", &payment.card_brand),
                ("card_last4", ":last4", &payment.card_last4),
            ] {
                if let Some(value) = value {
                    set.push(match name {
                        "provider_reference" => "provider_reference = :reference",
                        "failure_reason" => "failure_reason = :reason",
                        "card_brand" => "card_brand = :brand",
                        _ => "card_last4 = :last4",
                    });
                    update = update.expression_attribute_values(placeholder, s(value));
                }
            }
            // Leaving pending drops the payment from the sparse reconciler index.
            let update = update
                .update_expression(format!("SET {} REMOVE pending", set.join(", ")))
                .build()
                .map_err(remote)?;
            let mut items = vec![TransactWriteItem::builder().update(update).build()];
            if payment.status == "failed" {
                items.push(self.release(payment.order_id, payment.id)?);
            }
            let event = event_for(&payment, outcome_event(&payment), payment.amount)?;
            items.extend(self.outbox.items(&event, DESTINATIONS).map_err(remote)?);
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => {
                    self.wake_relay.notify_one();
                    return Ok(Finished {
                        payment,
                        changed: true,
                    });
                }
                // Finished by someone else meanwhile (re-read: unchanged), or a racing write.
                Err(codes)
                    if codes
                        .iter()
                        .any(|c| c == CONDITION_FAILED || c == TRANSACTION_CONFLICT) =>
                {
                    contention_pause().await;
                }
                Err(codes) => {
                    return Err(StoreError::Dynamo(format!(
                        "finishing a payment was cancelled: {codes:?}"
                    )));
                }
            }
        }
        Err(StoreError::Dynamo(
            "finishing a payment kept conflicting with other writes".into(),
        ))
    }

    async fn abandon(&self, id: Uuid) -> Result<bool, StoreError> {
        for _ in 0..ATTEMPTS {
            let Some(current) = self.get(id).await? else {
                return Ok(false);
            };
            if !current.is_pending() {
                return Ok(false);
            }
            let delete = Delete::builder()
                .table_name(&self.table)
                .key("payment_id", s(id.to_string()))
                .condition_expression("#status = :pending")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":pending", s("pending"))
                .build()
                .map_err(remote)?;
            let items = vec![
                TransactWriteItem::builder().delete(delete).build(),
                self.release(current.order_id, id)?,
            ];
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => return Ok(true),
                Err(codes)
                    if codes
                        .iter()
                        .any(|c| c == CONDITION_FAILED || c == TRANSACTION_CONFLICT) =>
                {
                    contention_pause().await;
                }
                Err(codes) => {
                    return Err(StoreError::Dynamo(format!(
                        "abandoning a payment was cancelled: {codes:?}"
                    )));
                }
            }
        }
        Err(StoreError::Dynamo(
            "abandoning a payment kept conflicting with other writes".into(),
        ))
    }

    async fn pending_before(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Payment>, StoreError> {
        let mut payments = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(PENDING_INDEX)
                .key_condition_expression("pending = :p AND created_at < :before")
                .expression_attribute_values(":p", s("pending"))
                .expression_attribute_values(":before", n(before.timestamp_millis()))
                .limit(i32::try_from(limit).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| remote(dynamo_error("listing pending payments", e)))?;
            for item in page.items() {
                payments.push(from_item(item)?);
            }
            match page.last_evaluated_key() {
                Some(key) if payments.len() < limit => start = Some(key.clone()),
                _ => break,
            }
        }
        payments.truncate(limit);
        Ok(payments)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Payment>, StoreError> {
        self.load(&id.to_string())
            .await?
            .as_ref()
            .map(from_item)
            .transpose()
    }

    async fn by_order(&self, order_id: Uuid) -> Result<Vec<Payment>, StoreError> {
        let mut payments = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(ORDER_INDEX)
                .key_condition_expression("order_id = :o")
                .expression_attribute_values(":o", s(order_id.to_string()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| remote(dynamo_error("listing an order's payments", e)))?;
            for item in page.items() {
                payments.push(from_item(item)?);
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => break,
            }
        }
        // The index orders by created_at; ties (same millisecond) by id, as the SQL stores.
        payments.sort_by_key(|p| (p.created_at, p.id));
        Ok(payments)
    }

    async fn refund(&self, new: &NewRefund) -> Result<Refund, StoreError> {
        for _ in 0..ATTEMPTS {
            let current = self
                .get(new.payment_id)
                .await?
                .ok_or(StoreError::NotFound)?;
            let refund = apply_new_refund(current, new, now_ms())?;
            let p = &refund.payment;
            let update = Update::builder()
                .table_name(&self.table)
                .key("payment_id", s(p.id.to_string()))
                .update_expression(
                    "SET refunded_cents = :new, #status = :status, #v = :v, updated_at = :now",
                )
                // Only against the version the refund was computed from (items written before
                // versions existed have none, and version 1).
                .condition_expression("#v = :seen OR (attribute_not_exists(#v) AND :seen = :one)")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":new", n(p.refunded_amount.cents()))
                .expression_attribute_values(":status", s(&p.status))
                .expression_attribute_values(":v", n(i64::try_from(p.version).unwrap_or(i64::MAX)))
                .expression_attribute_values(":now", n(p.updated_at.timestamp_millis()))
                .expression_attribute_values(
                    ":seen",
                    n(i64::try_from(new.expected_version).unwrap_or(i64::MAX)),
                )
                .expression_attribute_values(":one", n(1))
                .build()
                .map_err(remote)?;
            let mut record = HashMap::from([
                ("payment_id".to_owned(), s(format!("refund#{}", refund.id))),
                ("kind".to_owned(), s("refund")),
                ("refund_of".to_owned(), s(p.id.to_string())),
                ("amount_cents".to_owned(), n(refund.amount.cents())),
                (
                    "created_at".to_owned(),
                    n(refund.created_at.timestamp_millis()),
                ),
            ]);
            for (name, value) in [
                ("provider_reference", &refund.provider_reference),
                ("reason", &refund.reason),
            ] {
                if let Some(value) = value {
                    record.insert(name.to_owned(), s(value));
                }
            }
            let mut items = vec![
                TransactWriteItem::builder().update(update).build(),
                self.put(record)?,
            ];
            // All given back: the order is free again, as the SQL index no longer counts it.
            if p.status == "refunded" {
                items.push(self.release(p.order_id, p.id)?);
            }
            let event = event_for(p, types::PAYMENT_REFUNDED, refund.amount)?;
            items.extend(self.outbox.items(&event, DESTINATIONS).map_err(remote)?);
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => {
                    self.wake_relay.notify_one();
                    return Ok(refund);
                }
                Err(codes) if codes.first().map(String::as_str) == Some(CONDITION_FAILED) => {
                    return Err(StoreError::Conflict);
                }
                Err(codes) if codes.get(1).map(String::as_str) == Some(CONDITION_FAILED) => {
                    // The refund id is derived from the payment's version: recorded already.
                    return Err(StoreError::Conflict);
                }
                Err(codes) if codes.iter().any(|c| c == TRANSACTION_CONFLICT) => {
                    contention_pause().await;
                }
                Err(codes) => {
                    return Err(StoreError::Dynamo(format!(
                        "refund was cancelled: {codes:?}"
                    )));
                }
            }
        }
        Err(StoreError::Dynamo(
            "the refund kept conflicting with other writes of the payment".into(),
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| remote(dynamo_error("describing the payments table", e)))
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
            super::TABLE.terraform_mismatches(&hcl, "payments"),
            Vec::<String>::new(),
            "{path}"
        );
    }

    #[test]
    fn items_round_trip_with_exact_cents_and_absent_options() {
        let now = DateTime::from_timestamp_millis(1_764_000_000_123).unwrap();
        let p = Payment {
            id: Uuid::now_v7(),
            order_id: Uuid::now_v7(),
            amount: Money::from_cents(399_998).unwrap(),
            currency: "USD".into(),
            status: "partially_refunded".into(),
            payment_method: "credit_card".into(),
            card_brand: Some("visa".into()),
            card_last4: Some("4242".into()),
            provider_reference: None,
            failure_reason: None,
            refunded_amount: Money::from_cents(1).unwrap(),
            version: 2,
            created_at: now,
            updated_at: now,
        };
        let item = to_item(&p);
        assert_eq!(item["amount_cents"], AttributeValue::N("399998".into()));
        assert!(!item.contains_key("provider_reference"));
        assert_eq!(from_item(&item).unwrap(), p);
        let mut guard = item.clone();
        guard.insert("kind".into(), s("success"));
        assert!(matches!(from_item(&guard), Err(StoreError::Corrupt)));
    }
}
