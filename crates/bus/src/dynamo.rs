//! The transactional outbox in DynamoDB (feature `dynamodb`), for services whose store is a
//! DynamoDB table: the store puts the outbox items in the same `TransactWriteItems` as its
//! change ([`DynamoOutbox::items`]), and the [`crate::outbox::Relay`] publishes them.
//!
//! Table design (one outbox table per service, e.g. `payments-outbox`), no scans:
//! - partition key `pk` (S), always `outbox`: one partition, so the relay finds due rows with a
//!   Query (a single partition takes about 1,000 writes/s, far above one service's event rate;
//!   should that change, shard `pk` as `outbox#N` and query each shard);
//! - sort key `seq` (S): a UUIDv7 string, so rows sort in commit-time order as SQL's `seq`;
//! - `next_attempt_at` (N, Unix ms): when the row is due; the relay *leases* a row by pushing it
//!   out with a conditional update on the value it read, so two relays never take the same row
//!   (the loser's condition fails and it skips the row, and the later rows of its key);
//! - `event_id`, `destination`, `key`, `headers` (JSON), `payload`, `created_at`, `attempts`.
//!
//! Also [`sdk_config`]: the AWS configuration for a `dynamodb://` URL, shared by the stores,
//! and [`design`]: each table's design as data, created locally and checked against Terraform.

pub mod design;
pub mod write_units;

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, DeleteRequest, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, Select, TransactWriteItem, WriteRequest,
};
use kit::db::now_ms;
use kit::dynamo_url::DynamoUrl;

use crate::outbox::{Destination, LEASE_MS, Pending, RowId};
use crate::{BusError, Event};

/// Every outbox table's design (`<table>-outbox`; Terraform's `aws_dynamodb_table.outbox`).
pub const TABLE: design::TableDesign = design::TableDesign {
    hash: "pk",
    range: Some("seq"),
    attributes: &[("pk", design::Kind::S), ("seq", design::Kind::S)],
    indexes: &[],
    ttl: None,
};

/// The most writes one `BatchWriteItem` takes.
const BATCH_WRITE_MAX: usize = 25;

/// How often the rows a `BatchWriteItem` left unprocessed are sent again before giving up.
const UNPROCESSED_ATTEMPTS: usize = 5;

/// The fixed partition every outbox row is in.
const PARTITION: &str = "outbox";

/// The AWS configuration for a parsed `dynamodb://` URL: its region and endpoint where given,
/// the standard AWS environment for the rest (credentials always).
pub async fn sdk_config(url: &DynamoUrl) -> aws_config::SdkConfig {
    let mut loader = aws_config::from_env();
    if let Some(region) = &url.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &url.endpoint {
        loader = loader.endpoint_url(endpoint.clone());
    }
    loader.load().await
}

/// A DynamoDB client for `config` that counts its requests in `dynamodb_requests_total`, by
/// operation (`PutItem`, `TransactWriteItems`, ...): the round trips an order costs, which the
/// benchmarks and a test read per order; and the write units they bill in
/// `dynamodb_write_units_total` ([`write_units`]). Every store and outbox makes its client here.
pub fn client(config: &aws_config::SdkConfig) -> Client {
    let conf = aws_sdk_dynamodb::config::Builder::from(config)
        .interceptor(RequestCounter)
        .build();
    Client::from_conf(conf)
}

/// Counts each request as it is sent (a retry is another request, billed as one).
#[derive(Debug)]
struct RequestCounter;

impl aws_sdk_dynamodb::config::Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_dynamodb::config::RuntimeComponents,
        _: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        metrics::counter!("dynamodb_requests_total", "operation" => operation_of(context.request().headers().get("x-amz-target")))
            .increment(1);
        Ok(())
    }

    /// Once an operation, however often it is retried: a write refused is not billed.
    fn read_before_execution(
        &self,
        context: &aws_sdk_dynamodb::config::interceptors::BeforeSerializationInterceptorContextRef<
            '_,
        >,
        _: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        use aws_sdk_dynamodb::operation;
        let input = context.input();
        let written = if let Some(put) = input.downcast_ref::<operation::put_item::PutItemInput>() {
            Some(("PutItem", write_units::of_put(put)))
        } else if let Some(t) =
            input.downcast_ref::<operation::transact_write_items::TransactWriteItemsInput>()
        {
            Some(("TransactWriteItems", write_units::of_transaction(t)))
        } else if let Some(b) =
            input.downcast_ref::<operation::batch_write_item::BatchWriteItemInput>()
        {
            Some(("BatchWriteItem", write_units::of_batch(b)))
        } else if input
            .downcast_ref::<operation::update_item::UpdateItemInput>()
            .is_some()
        {
            Some(("UpdateItem", 1))
        } else if input
            .downcast_ref::<operation::delete_item::DeleteItemInput>()
            .is_some()
        {
            Some(("DeleteItem", 1))
        } else {
            None
        };
        if let Some((operation, units)) = written {
            metrics::counter!("dynamodb_write_units_total", "operation" => operation)
                .increment(units);
        }
        Ok(())
    }
}

/// The operation a request's `X-Amz-Target` names (`DynamoDB_20120810.PutItem` → `PutItem`),
/// as one of a fixed set of labels.
fn operation_of(target: Option<&str>) -> &'static str {
    const OPERATIONS: [&str; 14] = [
        "GetItem",
        "PutItem",
        "UpdateItem",
        "DeleteItem",
        "Query",
        "Scan",
        "BatchGetItem",
        "BatchWriteItem",
        "TransactWriteItems",
        "TransactGetItems",
        "DescribeTable",
        "CreateTable",
        "UpdateTimeToLive",
        "DescribeTimeToLive",
    ];
    let name = target
        .and_then(|t| t.rsplit_once('.'))
        .map_or("", |(_, op)| op);
    OPERATIONS
        .into_iter()
        .find(|op| *op == name)
        .unwrap_or("other")
}

/// A key-schema element for `create_table` (every store's and the outbox's).
pub fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement, BusError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| dynamo_error("key schema", e))
}

/// An attribute definition for `create_table`.
pub fn attribute(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition, BusError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(|e| dynamo_error("attribute definition", e))
}

/// A DynamoDB failure as a bus error, with the service's own message.
pub fn dynamo_error<E: std::error::Error>(what: &str, e: E) -> BusError {
    BusError::Dynamo(format!("{what}: {}", DisplayErrorContext(e)))
}

/// A string attribute: the item builders' shorthand (every store's and the outbox's).
pub fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number attribute (DynamoDB carries numbers as decimal strings).
pub fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A short random pause before retrying a contended conditional write or transaction, so
/// racers spread out instead of colliding again in step.
pub async fn contention_pause() {
    tokio::time::sleep(std::time::Duration::from_millis(fastrand::u64(2..20))).await;
}

/// A service's outbox table.
#[derive(Debug, Clone)]
pub struct DynamoOutbox {
    client: Client,
    table: String,
}

impl DynamoOutbox {
    pub fn new(client: Client, table: impl Into<String>) -> DynamoOutbox {
        DynamoOutbox {
            client,
            table: table.into(),
        }
    }

    /// The outbox of the store table `table`: the table `<table>-outbox`, the one naming
    /// rule Terraform follows too.
    pub fn beside(client: Client, table: &str) -> DynamoOutbox {
        DynamoOutbox::new(client, format!("{table}-outbox"))
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table where missing: for local servers and tests (AWS gets its tables from
    /// Terraform).
    pub async fn ensure_table(&self) -> Result<(), BusError> {
        TABLE.create_if_missing(&self.client, &self.table).await
    }

    /// The items that enqueue `event` for each destination, to put in the caller's
    /// `TransactWriteItems` next to the change the event describes (a transaction takes up to
    /// 100 items, so a store's change plus a few destinations fits easily).
    pub fn items(
        &self,
        event: &Event,
        destinations: &[Destination],
    ) -> Result<Vec<TransactWriteItem>, BusError> {
        let headers = serde_json::to_string(&event.outbox_headers())
            .map_err(|e| BusError::Malformed(e.to_string()))?;
        let now = now_ms();
        destinations
            .iter()
            .map(|destination| {
                let item = HashMap::from([
                    ("pk".to_owned(), s(PARTITION)),
                    ("seq".to_owned(), s(uuid::Uuid::now_v7().to_string())),
                    ("event_id".to_owned(), s(event.id.to_string())),
                    ("destination".to_owned(), s(destination.encode())),
                    ("key".to_owned(), s(&event.subject)),
                    ("headers".to_owned(), s(&headers)),
                    ("payload".to_owned(), s(&event.data)),
                    ("created_at".to_owned(), n(now)),
                    ("attempts".to_owned(), n(0)),
                    ("next_attempt_at".to_owned(), n(now)),
                ]);
                let put = Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .build()
                    .map_err(|e| dynamo_error("outbox item", e))?;
                Ok(TransactWriteItem::builder().put(put).build())
            })
            .collect()
    }

    /// Leases up to `batch` rows it may take now, oldest first. The Query reads the whole
    /// partition in `seq` order (a filter would save no read capacity, and the rows it hid are
    /// needed): a row not due yet (backing off, or leased by another relay) holds back the
    /// later rows of its key and destination, and so does one that another relay leased
    /// between the Query and this relay's conditional update on the `next_attempt_at` read.
    pub(crate) async fn due(&self, batch: i64) -> Result<Vec<(String, Pending)>, BusError> {
        let now = now_ms();
        let wanted = usize::try_from(batch.max(1)).unwrap_or(256);
        let mut taken = Vec::new();
        let mut waiting: HashSet<(String, String)> = HashSet::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(PARTITION))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| dynamo_error("reading due outbox rows", e))?;
            for item in page.items() {
                if taken.len() >= wanted {
                    return Ok(taken);
                }
                let Row(destination, pending, seen) = read_row(item)?;
                let chain = (destination, pending.key.clone());
                if waiting.contains(&chain) {
                    continue;
                }
                if seen > now || !self.lease(&pending.seq, seen, now + LEASE_MS).await? {
                    waiting.insert(chain);
                    continue;
                }
                taken.push((chain.0, pending));
            }
            match page.last_evaluated_key() {
                Some(key) if taken.len() < wanted => start = Some(key.clone()),
                _ => return Ok(taken),
            }
        }
    }

    /// Pushes one row's next attempt to `until` if nobody changed it since it was read.
    async fn lease(&self, seq: &RowId, seen: i64, until: i64) -> Result<bool, BusError> {
        let RowId::Key(seq) = seq else {
            return Ok(false);
        };
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(PARTITION))
            .key("seq", s(seq))
            .update_expression("SET next_attempt_at = :until")
            .condition_expression("next_attempt_at = :seen")
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":seen", n(seen))
            .send()
            .await;
        match update {
            Ok(_) => Ok(true),
            // Another relay leased it (or published and deleted it) since the Query.
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                Ok(false)
            }
            Err(e) => Err(dynamo_error("leasing an outbox row", e)),
        }
    }

    /// Deletes published rows: one `BatchWriteItem` per 25 rows (DynamoDB's most), what it
    /// leaves unprocessed sent again, instead of a request per row.
    pub(crate) async fn delete(&self, seqs: Vec<String>) -> Result<(), BusError> {
        for chunk in seqs.chunks(BATCH_WRITE_MAX) {
            let mut requests = chunk
                .iter()
                .map(|seq| {
                    let delete = DeleteRequest::builder()
                        .key("pk", s(PARTITION))
                        .key("seq", s(seq))
                        .build()
                        .map_err(|e| dynamo_error("an outbox row's delete", e))?;
                    Ok(WriteRequest::builder().delete_request(delete).build())
                })
                .collect::<Result<Vec<_>, BusError>>()?;
            for _ in 0..UNPROCESSED_ATTEMPTS {
                let answer = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, requests)
                    .send()
                    .await
                    .map_err(|e| dynamo_error("deleting published outbox rows", e))?;
                requests = answer
                    .unprocessed_items()
                    .and_then(|left| left.get(&self.table))
                    .cloned()
                    .unwrap_or_default();
                if requests.is_empty() {
                    break;
                }
                // Throttled: DynamoDB handed some back; a short pause before sending them again.
                contention_pause().await;
            }
            if !requests.is_empty() {
                // Published but not deleted: the rows are published again later (at least
                // once), which every consumer deduplicates by event id.
                return Err(BusError::Dynamo(format!(
                    "{} published outbox rows stayed undeleted after {UNPROCESSED_ATTEMPTS} attempts",
                    requests.len()
                )));
            }
        }
        Ok(())
    }

    pub(crate) async fn reschedule(
        &self,
        seqs: Vec<String>,
        retry_at: i64,
    ) -> Result<(), BusError> {
        for seq in seqs {
            let update = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(PARTITION))
                .key("seq", s(seq))
                .update_expression("SET next_attempt_at = :at ADD attempts :one")
                // Never resurrect a row as a bare key if it was deleted meanwhile.
                .condition_expression("attribute_exists(seq)")
                .expression_attribute_values(":at", n(retry_at))
                .expression_attribute_values(":one", n(1))
                .send()
                .await;
            match update {
                Ok(_) => {}
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() => {}
                Err(e) => return Err(dynamo_error("rescheduling an outbox row", e)),
            }
        }
        Ok(())
    }

    /// Makes leased rows due at `at` again without counting an attempt (they were not tried).
    pub(crate) async fn reschedule_untried(
        &self,
        seqs: Vec<String>,
        at: i64,
    ) -> Result<(), BusError> {
        for seq in seqs {
            let update = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(PARTITION))
                .key("seq", s(seq))
                .update_expression("SET next_attempt_at = :at")
                .condition_expression("attribute_exists(seq)")
                .expression_attribute_values(":at", n(at))
                .send()
                .await;
            match update {
                Ok(_) => {}
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() => {}
                Err(e) => return Err(dynamo_error("releasing an outbox row", e)),
            }
        }
        Ok(())
    }

    /// Rows not yet published, counted up to `cap` (a counting Query of the partition, page by
    /// page: every row counted is a read paid for, so a large backlog is not read in full).
    pub(crate) async fn pending(&self, cap: i64) -> Result<i64, BusError> {
        let mut count = 0i64;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .select(Select::Count)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(PARTITION))
                .limit(i32::try_from(cap - count).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| dynamo_error("counting outbox rows", e))?;
            count += i64::from(page.count());
            match page.last_evaluated_key() {
                Some(key) if count < cap => start = Some(key.clone()),
                _ => return Ok(count),
            }
        }
    }

    /// When the oldest row was written: the first by `seq` (a UUIDv7, so commit-time order).
    pub(crate) async fn oldest_created_ms(&self) -> Result<Option<i64>, BusError> {
        let page = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(PARTITION))
            .projection_expression("created_at")
            .limit(1)
            .send()
            .await
            .map_err(|e| dynamo_error("reading the oldest outbox row", e))?;
        Ok(page
            .items()
            .first()
            .and_then(|item| item.get("created_at"))
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok()))
    }

    /// Every row due now (tests: skips the backoff).
    #[cfg(test)]
    pub(crate) async fn make_all_due(&self) -> Result<(), BusError> {
        let page = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(PARTITION))
            .send()
            .await
            .map_err(|e| dynamo_error("reading outbox rows", e))?;
        for item in page.items() {
            let seq = item
                .get("seq")
                .cloned()
                .ok_or_else(|| BusError::Malformed("outbox row without seq".into()))?;
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(PARTITION))
                .key("seq", seq)
                .update_expression("SET next_attempt_at = :zero")
                .expression_attribute_values(":zero", n(0))
                .send()
                .await
                .map_err(|e| dynamo_error("making a row due", e))?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }
}

/// A row as read: destination, the pending publish, and the `next_attempt_at` seen.
struct Row(String, Pending, i64);

fn read_row(item: &HashMap<String, AttributeValue>) -> Result<Row, BusError> {
    let text = |k: &str| -> Result<String, BusError> {
        item.get(k)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| BusError::Malformed(format!("outbox row without {k}")))
    };
    let number = |k: &str| -> Result<i64, BusError> {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| BusError::Malformed(format!("outbox row without numeric {k}")))
    };
    let headers =
        serde_json::from_str(&text("headers")?).map_err(|e| BusError::Malformed(e.to_string()))?;
    Ok(Row(
        text("destination")?,
        Pending {
            seq: RowId::Key(text("seq")?),
            key: text("key")?,
            event_id: text("event_id")?,
            headers,
            payload: text("payload")?,
            attempts: number("attempts")?,
        },
        number("next_attempt_at")?,
    ))
}

/// Why a `TransactWriteItems` was cancelled: one code per item, in the order sent
/// (`None` for items that were fine, [`CONDITION_FAILED`], [`TRANSACTION_CONFLICT`], ...).
pub type CancellationCodes = Vec<String>;

/// The cancellation code of an item whose condition expression was false.
pub const CONDITION_FAILED: &str = "ConditionalCheckFailed";

/// The cancellation code of an item another transaction held: retry after a pause.
pub const TRANSACTION_CONFLICT: &str = "TransactionConflict";

/// Sends one transaction. `Ok(Ok(()))` when it committed, `Ok(Err(codes))` when DynamoDB
/// cancelled it (a condition failed or another transaction held an item: the caller decides
/// what each means), `Err` for any other failure.
pub async fn transact(
    client: &Client,
    items: Vec<TransactWriteItem>,
) -> Result<Result<(), CancellationCodes>, BusError> {
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
    let count = items.len();
    // The transaction's span, as SQL stores have (kit::pg::traced).
    let span = if kit::telemetry::in_exported_trace() {
        tracing::info_span!(
            "dynamodb",
            otel.name = "TransactWriteItems",
            otel.kind = "client",
            db.system.name = "aws.dynamodb",
            db.operation.name = "TransactWriteItems",
            db.operation.batch.size = count,
        )
    } else {
        tracing::Span::none()
    };
    let sent = tracing::Instrument::instrument(
        client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send(),
        span,
    )
    .await;
    match sent {
        Ok(_) => Ok(Ok(())),
        Err(SdkError::ServiceError(e)) => match e.err() {
            TransactWriteItemsError::TransactionCanceledException(cancelled) => {
                let mut codes: CancellationCodes = cancelled
                    .cancellation_reasons()
                    .iter()
                    .map(|r| r.code().unwrap_or("None").to_owned())
                    .collect();
                // Servers that give no reasons: one unknown code per item, so indexing is safe.
                codes.resize(count, "Unknown".to_owned());
                Ok(Err(codes))
            }
            // Another transaction is mid-flight on one of the items: as retryable as a conflict.
            TransactWriteItemsError::TransactionInProgressException(_) => {
                Ok(Err(vec![TRANSACTION_CONFLICT.to_owned(); count]))
            }
            _ => Err(dynamo_error("transaction", SdkError::ServiceError(e))),
        },
        Err(e) => Err(dynamo_error("transaction", e)),
    }
}

#[cfg(test)]
mod request_counter_tests {
    use super::operation_of;

    #[test]
    fn operations_are_named_by_their_target() {
        assert_eq!(
            operation_of(Some("DynamoDB_20120810.TransactWriteItems")),
            "TransactWriteItems"
        );
        assert_eq!(operation_of(Some("DynamoDB_20120810.Query")), "Query");
        assert_eq!(
            operation_of(Some("DynamoDB_20120810.SomethingNew")),
            "other"
        );
        assert_eq!(operation_of(None), "other");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// A table declared differently on AWS would fail there only: hold Terraform to the code.
    #[test]
    fn terraform_declares_the_table_the_code_uses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/terraform/aws/dynamodb.tf"
        );
        let hcl = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            super::TABLE.terraform_mismatches(&hcl, "outbox"),
            Vec::<String>::new(),
            "{path}"
        );
    }
}
