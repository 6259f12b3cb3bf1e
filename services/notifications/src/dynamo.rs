//! Notification records in DynamoDB (the seed's `notifications` table), for the Lambda.
//!
//! Table design, no scans on the read paths:
//! - partition key `event_id` (S): one record per event, enforced by a conditional put
//!   (`attribute_not_exists(event_id)`), so a redelivered SQS message never writes twice;
//! - GSI `user_id-created_at` and GSI `order_id-created_at` for the two lookups the API offers,
//!   both with range key `created_sort` (S) = zero-padded `created_at` (Unix ms) + `#` + id:
//!   oldest first with ties broken by id, as the SQL stores order them, so a page's cursor is
//!   a key range start and means the same on every backend. (`created_at` stays the seed's
//!   RFC 3339 text, for readers of the table.)
//!
//! `amount` is a DynamoDB number written from the decimal text (`3999.98`): exact, no float.
//!
//! The platform's notifier uses it too when its database URL is
//! `dynamodb://TABLE?region=REGION&endpoint=URL` (region and endpoint optional: the standard
//! AWS environment otherwise). Listing without a user or an order (an operator's view, not a
//! customer's, and admin-only) is the one read that scans: a page of `limit` records in table
//! order, its cursor the last record's key.

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::AttributeValue;
use bus::dynamo::design::{Index, Kind, TableDesign};
use bus::dynamo::s;
use chrono::{DateTime, SecondsFormat, Utc};
use kit::Money;
use std::collections::HashMap;
use uuid::Uuid;

use crate::content::Notification;
use crate::store::{Filter, NotificationStore, StoreError, notification_cursor};
use kit::page::{BadCursor, Cursor, Page, PageRequest, Start};

pub const USER_INDEX: &str = "user_id-created_at";
pub const ORDER_INDEX: &str = "order_id-created_at";

/// The table's design (Terraform's `aws_dynamodb_table.notifications`, in the notifier module).
pub const TABLE: TableDesign = TableDesign {
    hash: "event_id",
    range: None,
    attributes: &[
        ("event_id", Kind::S),
        ("user_id", Kind::S),
        ("order_id", Kind::S),
        ("created_sort", Kind::S),
    ],
    indexes: &[
        Index {
            name: USER_INDEX,
            hash: "user_id",
            range: Some("created_sort"),
        },
        Index {
            name: ORDER_INDEX,
            hash: "order_id",
            range: Some("created_sort"),
        },
    ],
    ttl: None,
};

#[derive(Debug, Clone)]
pub struct DynamoNotificationStore {
    client: Client,
    table: String,
}

impl DynamoNotificationStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoNotificationStore {
            client,
            table: table.into(),
        }
    }

    /// From `dynamodb://TABLE?region=REGION&endpoint=URL`; what the URL leaves out comes from
    /// the standard AWS environment.
    pub async fn from_url(url: &str) -> Result<Self, StoreError> {
        let parsed = kit::dynamo_url::parse(url).map_err(|e| StoreError::Remote(e.to_string()))?;
        let config = bus::dynamo::sdk_config(&parsed).await;
        Ok(Self::new(bus::dynamo::client(&config), parsed.table))
    }

    /// Creates the table and its two indexes where missing: for local servers and tests; AWS
    /// gets its table from Terraform.
    pub async fn ensure_table(&self) -> Result<(), StoreError> {
        TABLE
            .create_if_missing(&self.client, &self.table)
            .await
            .map_err(|e| StoreError::Remote(e.to_string()))
    }

    /// A page of every record, in table order (an operator's view): the one read that scans.
    async fn scan_page(&self, page: &PageRequest) -> Result<Page<Notification>, StoreError> {
        let remote = |e: String| StoreError::Remote(e);
        let mut start = match &page.start {
            Start::After(cursor) => {
                let event_id = cursor.text().strip_prefix(SCAN_CURSOR).ok_or(BadCursor)?;
                let event_id: Uuid = event_id.parse().map_err(|_| BadCursor)?;
                Some(HashMap::from([(
                    "event_id".to_owned(),
                    s(event_id.to_string()),
                )]))
            }
            Start::Skip(_) => None,
        };
        let skip = match page.start {
            Start::Skip(skip) => skip as usize,
            Start::After(_) => 0,
        };
        let wanted = skip + page.limit as usize;
        let mut records = Vec::new();
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .set_exclusive_start_key(start.take())
                .limit(i32::try_from(wanted - records.len()).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(|e| remote(aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string()))?;
            for item in out.items() {
                records.push(from_item(item)?);
            }
            match out.last_evaluated_key() {
                Some(next) if records.len() < wanted => start = Some(next.clone()),
                // Full, or the end: the last record read is where the next page starts, unless
                // the table has nothing after it.
                Some(_) => {
                    let records = records.split_off(skip.min(records.len()));
                    let next = records
                        .last()
                        .map(|n| Cursor::from_text(format!("{SCAN_CURSOR}{}", n.event_id)));
                    return Ok(Page {
                        items: records,
                        next,
                    });
                }
                None => {
                    let records = records.split_off(skip.min(records.len()));
                    return Ok(Page::last(records));
                }
            }
        }
    }

    async fn describe(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::Remote(aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string())
            })
    }

    /// Region, credentials and endpoint (`AWS_ENDPOINT_URL` for local servers) from the
    /// standard AWS environment, as Lambda provides it.
    pub async fn from_env(table: impl Into<String>) -> Self {
        let config = aws_config::load_from_env().await;
        Self::new(bus::dynamo::client(&config), table)
    }
}

fn to_item(n: &Notification) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("event_id".to_owned(), s(n.event_id.to_string())),
        ("id".to_owned(), s(n.id.to_string())),
        ("event_type".to_owned(), s(&n.event_type)),
        ("order_id".to_owned(), s(n.order_id.to_string())),
        ("user_id".to_owned(), s(n.user_id.to_string())),
        ("recipient".to_owned(), s(&n.recipient)),
        ("subject".to_owned(), s(&n.subject)),
        ("body".to_owned(), s(&n.body)),
        ("amount".to_owned(), AttributeValue::N(n.amount.to_string())),
        ("currency".to_owned(), s(&n.currency)),
        (
            "created_at".to_owned(),
            s(n.created_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        ),
        (
            "created_sort".to_owned(),
            s(sort_key(n.created_at.timestamp_millis(), n.id)),
        ),
    ])
}

/// `created_sort` for a record made at `created_at_ms`: text that sorts as `(created_at, id)`.
fn sort_key(created_at_ms: i64, id: Uuid) -> String {
    format!("{created_at_ms:020}#{id}")
}

/// A scan's cursor: the last record's key, marked so a row cursor is never taken for one.
const SCAN_CURSOR: &str = "scan:";

fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Notification, StoreError> {
    let text = |k: &str| -> Result<String, StoreError> {
        item.get(k)
            .and_then(|v| v.as_s().ok().or_else(|| v.as_n().ok()))
            .cloned()
            .ok_or_else(|| StoreError::Remote(format!("record without {k}")))
    };
    let id = |k: &str| -> Result<Uuid, StoreError> {
        text(k)?
            .parse()
            .map_err(|_| StoreError::Remote(format!("{k} is not a UUID")))
    };
    Ok(Notification {
        id: id("id")?,
        event_id: id("event_id")?,
        event_type: text("event_type")?,
        order_id: id("order_id")?,
        user_id: id("user_id")?,
        recipient: text("recipient")?,
        subject: text("subject")?,
        body: text("body")?,
        amount: text("amount")?
            .parse::<Money>()
            .map_err(|e| StoreError::Remote(e.to_string()))?,
        currency: text("currency")?,
        created_at: DateTime::parse_from_rfc3339(&text("created_at")?)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| StoreError::Remote(e.to_string()))?,
    })
}

#[async_trait]
impl NotificationStore for DynamoNotificationStore {
    async fn insert_batch(&self, batch: &[Notification]) -> Result<Vec<bool>, StoreError> {
        let mut stored = Vec::with_capacity(batch.len());
        for n in batch {
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(to_item(n)))
                .condition_expression("attribute_not_exists(event_id)")
                .send()
                .await;
            match put {
                Ok(_) => stored.push(true),
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() =>
                {
                    stored.push(false)
                }
                Err(e) => {
                    return Err(StoreError::Remote(
                        aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
                    ));
                }
            }
        }
        Ok(stored)
    }

    async fn find(&self, filter: &Filter) -> Result<Page<Notification>, StoreError> {
        let limit = filter.page.limit;
        let Some((index, key, value)) = (match (filter.order_id, filter.user_id) {
            (Some(order), _) => Some((ORDER_INDEX, "order_id", order.to_string())),
            (None, Some(user)) => Some((USER_INDEX, "user_id", user.to_string())),
            (None, None) => None,
        }) else {
            return self.scan_page(&filter.page).await;
        };
        let ((after_at, after_id), skip) = filter.page.row_start()?;
        let mut query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(index)
            .expression_attribute_names("#k", key)
            .expression_attribute_values(":v", s(value))
            .key_condition_expression("#k = :v AND created_sort > :after")
            .expression_attribute_values(":after", s(sort_key(after_at, after_id)))
            .limit(i32::try_from(limit + 1).unwrap_or(i32::MAX));
        if let (Some(user), Some(_)) = (filter.user_id, filter.order_id) {
            query = query
                .filter_expression("user_id = :user")
                .expression_attribute_values(":user", s(user.to_string()));
        }
        // Pages (a page stops at 1 MB, or holds fewer after the filter) until the offset and
        // `limit + 1` records are read, or the end.
        let wanted = skip as usize + limit as usize + 1;
        let mut items = query.into_paginator().items().send();
        let mut records = Vec::new();
        while records.len() < wanted {
            match items.next().await {
                Some(item) => records.push(from_item(&item.map_err(|e| {
                    StoreError::Remote(aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string())
                })?)?),
                None => break,
            }
        }
        let records = records.split_off((skip as usize).min(records.len()));
        Ok(Page::from_rows(records, limit, notification_cursor))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.describe().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table declared differently on AWS would fail there only: hold Terraform to the code.
    #[test]
    fn terraform_declares_the_table_the_code_uses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/terraform/aws/notifier/main.tf"
        );
        let hcl = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            super::TABLE.terraform_mismatches(&hcl, "notifications"),
            Vec::<String>::new(),
            "{path}"
        );
    }

    #[tokio::test]
    async fn urls_name_a_table_and_only_known_parameters() {
        for bad in [
            "dynamodb://",
            "dynamodb://?region=us-east-1",
            "dynamodb://no spaces",
            "dynamodb://t?regin=us-east-1",
            "dynamodb://t?endpoint=",
            "sqlite://x.db",
        ] {
            assert!(
                DynamoNotificationStore::from_url(bad).await.is_err(),
                "{bad} must be refused"
            );
        }
        let store = DynamoNotificationStore::from_url(
            "dynamodb://notifications?region=eu-west-1&endpoint=http://127.0.0.1:1",
        )
        .await
        .unwrap();
        assert_eq!(store.table, "notifications");
    }

    #[test]
    fn items_round_trip_with_exact_amounts() {
        let n = Notification {
            id: Uuid::now_v7(),
            event_id: Uuid::now_v7(),
            event_type: "order.created".into(),
            order_id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            recipient: "user:x".into(),
            subject: "s".into(),
            body: "b".into(),
            amount: "3999.98".parse().unwrap(),
            currency: "USD".into(),
            created_at: DateTime::parse_from_rfc3339("2026-11-24T10:00:00.123Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        let item = to_item(&n);
        assert_eq!(item["amount"], AttributeValue::N("3999.98".into()));
        assert_eq!(from_item(&item).unwrap(), n);
    }
}
