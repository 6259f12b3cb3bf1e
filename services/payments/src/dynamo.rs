//! The payments store on DynamoDB (feature `dynamodb`), with the same guarantees as the SQL
//! stores: a payment or refund and its outbox items commit in one `TransactWriteItems`, an
//! order has at most one successful payment under any concurrency, refunds never sum past the
//! charge. No read scans.
//!
//! Table design (the seed's `payments` table), partition key `payment_id` (S), three kinds of
//! item told apart by `kind`:
//! - `payment`: `payment_id` = the payment's UUID; `order_id`, `amount_cents` and
//!   `refunded_cents` (N, integer cents: exact), `status`, `created_at`/`updated_at` (N, Unix
//!   ms), the optional provider fields only when present;
//! - `success` guard: `payment_id` = `success#<order_id>`, `winner` = the successful payment.
//!   A success is recorded as one transaction putting the payment *and* its guard, both with
//!   `attribute_not_exists(payment_id)`: a second success for the order fails the guard's
//!   condition and the whole transaction is cancelled ([`StoreError::AlreadyPaid`]). The guard
//!   is never deleted (a refunded payment still took the money once), as the SQL partial unique
//!   index keeps counting refunded payments;
//! - `refund`: `payment_id` = `refund#<refund id>`, `refund_of`, `amount_cents`, `created_at`.
//!
//! GSI `order_id-created_at` (hash `order_id` S, range `created_at` N) serves `by_order`; only
//! payment items carry `order_id`, so guards and refunds stay out of it. GSIs are eventually
//! consistent on AWS: a payment can take a moment to appear in `by_order`, whereas `get` and
//! `has_success` read the base table consistently.
//!
//! Refunds use optimistic concurrency: read the payment, apply the shared
//! [`crate::store::apply_refund`] rules, then one transaction updates the payment on condition
//! that `refunded_cents` and `status` are still what was read, puts the refund item and the
//! outbox items. A concurrent refund makes the condition fail; the refund is then re-read and
//! re-applied, so each sees what the previous left.
//!
//! The outbox is the table `<table>-outbox` ([`bus::dynamo::DynamoOutbox`]).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
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
    DESTINATIONS, Payment, PaymentStore, Refund, SUCCESS_STATUSES, StoreError, apply_refund,
    event_for,
};

pub const ORDER_INDEX: &str = "order_id-created_at";

/// The table's design (Terraform's `aws_dynamodb_table.payments`); `purge_at` is the TTL of the
/// Idempotency-Key items ([`DynamoPaymentStore::idempotency_keys`]).
pub const TABLE: TableDesign = TableDesign {
    hash: "payment_id",
    range: None,
    attributes: &[
        ("payment_id", Kind::S),
        ("order_id", Kind::S),
        ("created_at", Kind::N),
    ],
    indexes: &[Index {
        name: ORDER_INDEX,
        hash: "order_id",
        range: Some("created_at"),
    }],
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
    format!("success#{order_id}")
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
        let client = Client::new(&bus::dynamo::sdk_config(&parsed).await);
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
        ("created_at".to_owned(), n(p.created_at.timestamp_millis())),
        ("updated_at".to_owned(), n(p.updated_at.timestamp_millis())),
    ]);
    for (name, value) in [
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
    Ok(Payment {
        id: id("payment_id")?,
        order_id: id("order_id")?,
        amount: money("amount_cents")?,
        currency: required("currency")?,
        status: required("status")?,
        payment_method: required("payment_method")?,
        card_last4: text("card_last4"),
        provider_reference: text("provider_reference"),
        failure_reason: text("failure_reason"),
        refunded_amount: money("refunded_cents")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
    })
}

#[async_trait]
impl PaymentStore for DynamoPaymentStore {
    async fn record(&self, payment: &Payment) -> Result<(), StoreError> {
        let event_type = if payment.status == "succeeded" {
            types::PAYMENT_SUCCEEDED
        } else {
            types::PAYMENT_FAILED
        };
        let event = event_for(payment, event_type, payment.amount)?;
        let success = SUCCESS_STATUSES.contains(&payment.status.as_str());
        for _ in 0..ATTEMPTS {
            let mut items = vec![self.put(to_item(payment))?];
            if success {
                items.push(self.put(HashMap::from([
                    ("payment_id".to_owned(), s(guard_key(payment.order_id))),
                    ("kind".to_owned(), s("success")),
                    ("winner".to_owned(), s(payment.id.to_string())),
                ]))?);
            }
            items.extend(self.outbox.items(&event, DESTINATIONS).map_err(remote)?);
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => {
                    self.wake_relay.notify_one();
                    return Ok(());
                }
                Err(codes) => {
                    if success && codes.get(1).map(String::as_str) == Some(CONDITION_FAILED) {
                        return Err(StoreError::AlreadyPaid);
                    }
                    if codes.first().map(String::as_str) == Some(CONDITION_FAILED) {
                        return Err(StoreError::Dynamo(format!(
                            "payment {} is already recorded",
                            payment.id
                        )));
                    }
                    // A conflict with a racing transaction on the guard: it decides on retry.
                    if !codes.iter().any(|c| c == TRANSACTION_CONFLICT) {
                        return Err(StoreError::Dynamo(format!(
                            "recording a payment was cancelled: {codes:?}"
                        )));
                    }
                    contention_pause().await;
                }
            }
        }
        Err(StoreError::Dynamo(
            "recording a payment kept conflicting with other writes".into(),
        ))
    }

    async fn has_success(&self, order_id: Uuid) -> Result<bool, StoreError> {
        Ok(self.load(&guard_key(order_id)).await?.is_some())
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

    async fn refund(&self, payment_id: Uuid, amount: Option<Money>) -> Result<Refund, StoreError> {
        for _ in 0..ATTEMPTS {
            let current = self.get(payment_id).await?.ok_or(StoreError::NotFound)?;
            let (seen_cents, seen_status) =
                (current.refunded_amount.cents(), current.status.clone());
            let now = now_ms();
            let (payment, amount) = apply_refund(current, amount, now)?;
            let refund_id = Uuid::now_v7();
            let update = Update::builder()
                .table_name(&self.table)
                .key("payment_id", s(payment_id.to_string()))
                .update_expression(
                    "SET refunded_cents = :new, #status = :status, updated_at = :now",
                )
                // Optimistic concurrency: only if no other refund landed since the read.
                .condition_expression("refunded_cents = :seen AND #status = :seen_status")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":new", n(payment.refunded_amount.cents()))
                .expression_attribute_values(":status", s(&payment.status))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":seen", n(seen_cents))
                .expression_attribute_values(":seen_status", s(seen_status))
                .build()
                .map_err(remote)?;
            let mut items = vec![
                TransactWriteItem::builder().update(update).build(),
                self.put(HashMap::from([
                    ("payment_id".to_owned(), s(format!("refund#{refund_id}"))),
                    ("kind".to_owned(), s("refund")),
                    ("refund_of".to_owned(), s(payment_id.to_string())),
                    ("amount_cents".to_owned(), n(amount.cents())),
                    ("created_at".to_owned(), n(now)),
                ]))?,
            ];
            let event = event_for(&payment, types::PAYMENT_REFUNDED, amount)?;
            items.extend(self.outbox.items(&event, DESTINATIONS).map_err(remote)?);
            match transact(&self.client, items).await.map_err(remote)? {
                Ok(()) => {
                    self.wake_relay.notify_one();
                    return Ok(Refund {
                        id: refund_id,
                        payment_id,
                        amount,
                        created_at: payment.updated_at,
                        payment,
                    });
                }
                // Another refund got there first (or holds the item): re-read and re-apply.
                Err(codes)
                    if codes
                        .iter()
                        .any(|c| c == CONDITION_FAILED || c == TRANSACTION_CONFLICT) =>
                {
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
            "the refund kept conflicting with other refunds of the payment".into(),
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
            card_last4: Some("4242".into()),
            provider_reference: None,
            failure_reason: None,
            refunded_amount: Money::from_cents(1).unwrap(),
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
