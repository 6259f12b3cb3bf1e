//! The [`PaymentStore`] contract, run unchanged against SQLite, (feature `postgres`)
//! PostgreSQL and (feature `dynamodb`) DynamoDB: one success per order under concurrency,
//! exact refunds, and the outbox row each change writes. PostgreSQL must be reachable for the
//! `postgres` test, and `TEST_DYNAMODB_ENDPOINT` set (scripts/check-aws starts moto) for the
//! `dynamodb` one: they fail, never skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bus::names::PAYMENTS_TOPIC;
use chrono::DateTime;
use kit::Money;
use payments::store::{Payment, PaymentStore, StoreError};
use uuid::Uuid;

/// Reads a backend's outbox back: `(destination, event type, key, amount)` in commit order.
enum Outbox {
    Sqlite(kit::db::Db),
    #[cfg(feature = "postgres")]
    Pg(kit::pg::Pg),
    #[cfg(feature = "dynamodb")]
    Dynamo(aws_sdk_dynamodb::Client, String),
}

type Row = (String, String, String, String);

impl Outbox {
    async fn rows(&self) -> Vec<Row> {
        let raw: Vec<(String, String, String)> = match self {
            Outbox::Sqlite(db) => db
                .read(|c| {
                    let mut stmt =
                        c.prepare("SELECT destination, payload, key FROM outbox ORDER BY seq")?;
                    let rows = stmt
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok::<_, StoreError>(rows)
                })
                .await
                .unwrap(),
            #[cfg(feature = "postgres")]
            Outbox::Pg(pg) => {
                sqlx::query_as("SELECT destination, payload, key FROM outbox ORDER BY seq")
                    .fetch_all(pg.pool())
                    .await
                    .unwrap()
            }
            // The outbox partition in `seq` (UUIDv7, commit time) order.
            #[cfg(feature = "dynamodb")]
            Outbox::Dynamo(client, table) => {
                let mut rows = Vec::new();
                let mut start = None;
                loop {
                    let page = client
                        .query()
                        .table_name(table)
                        .consistent_read(true)
                        .key_condition_expression("pk = :pk")
                        .expression_attribute_values(
                            ":pk",
                            aws_sdk_dynamodb::types::AttributeValue::S("outbox".into()),
                        )
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .unwrap();
                    for item in page.items() {
                        let text = |k: &str| item[k].as_s().unwrap().clone();
                        rows.push((text("destination"), text("payload"), text("key")));
                    }
                    match page.last_evaluated_key() {
                        Some(key) => start = Some(key.clone()),
                        None => break,
                    }
                }
                rows
            }
        };
        raw.into_iter()
            .map(|(destination, payload, key)| {
                let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
                (
                    destination,
                    payload["event_type"].as_str().unwrap().to_owned(),
                    key,
                    payload["amount"].to_string(),
                )
            })
            .collect()
    }

    /// The rows about one order.
    async fn of(&self, order: Uuid) -> Vec<Row> {
        let key = order.to_string();
        self.rows()
            .await
            .into_iter()
            .filter(|r| r.2 == key)
            .collect()
    }
}

fn row(order: Uuid, event_type: &str, amount: Money) -> Row {
    (
        format!("stream:{PAYMENTS_TOPIC}"),
        event_type.to_owned(),
        order.to_string(),
        serde_json::to_value(amount).unwrap().to_string(),
    )
}

fn cents(c: i64) -> Money {
    Money::from_cents(c).unwrap()
}

fn payment(order_id: Uuid, status: &str, amount: i64) -> Payment {
    let now = DateTime::from_timestamp_millis(kit::db::now_ms()).unwrap();
    Payment {
        id: Uuid::now_v7(),
        order_id,
        amount: cents(amount),
        currency: "USD".into(),
        status: status.into(),
        payment_method: "credit_card".into(),
        card_last4: Some("4242".into()),
        provider_reference: (status == "succeeded").then(|| "sim_123".to_owned()),
        failure_reason: (status == "failed").then(|| "card_declined".to_owned()),
        refunded_amount: Money::ZERO,
        created_at: now,
        updated_at: now,
    }
}

async fn keeps_the_contract(store: Arc<dyn PaymentStore>, outbox: Outbox) {
    store.ping().await.unwrap();

    // Record, get, by_order (oldest first), has_success; at most one success per order.
    let order = Uuid::now_v7();
    assert!(!store.has_success(order).await.unwrap());
    let mut failed = payment(order, "failed", 1000);
    failed.created_at -= chrono::Duration::milliseconds(5);
    failed.updated_at = failed.created_at;
    store.record(&failed).await.unwrap();
    assert!(
        !store.has_success(order).await.unwrap(),
        "a failure is not a success"
    );
    let ok = payment(order, "succeeded", 1000);
    store.record(&ok).await.unwrap();
    assert!(store.has_success(order).await.unwrap());
    assert!(!store.has_success(Uuid::now_v7()).await.unwrap());
    assert_eq!(store.get(ok.id).await.unwrap(), Some(ok.clone()));
    assert_eq!(store.get(failed.id).await.unwrap(), Some(failed.clone()));
    assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
    assert_eq!(
        store.by_order(order).await.unwrap(),
        vec![failed.clone(), ok.clone()]
    );
    assert_eq!(store.by_order(Uuid::now_v7()).await.unwrap(), vec![]);
    assert!(matches!(
        store.record(&payment(order, "succeeded", 1000)).await,
        Err(StoreError::AlreadyPaid)
    ));
    // Failed attempts after a success are still recorded (the provider declined them).
    let late_failure = payment(order, "failed", 1000);
    store.record(&late_failure).await.unwrap();
    assert_eq!(store.by_order(order).await.unwrap().len(), 3);
    assert_eq!(
        outbox.of(order).await,
        vec![
            row(order, "payment.failed", cents(1000)),
            row(order, "payment.succeeded", cents(1000)),
            row(order, "payment.failed", cents(1000)),
        ],
        "one row per recorded attempt, none for the refused one"
    );

    // 20 concurrent successes for one order: exactly one is recorded.
    let contested = Uuid::now_v7();
    let attempts = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.record(&payment(contested, "succeeded", 2500)).await })
    });
    let (mut won, mut refused) = (0, 0);
    for attempt in attempts.collect::<Vec<_>>() {
        match attempt.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::AlreadyPaid) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((won, refused), (1, 19));
    assert_eq!(store.by_order(contested).await.unwrap().len(), 1);
    assert_eq!(
        outbox.of(contested).await,
        vec![row(contested, "payment.succeeded", cents(2500))]
    );

    // Refunds: exact, bounded by what is left, only of a success.
    let partial = store.refund(ok.id, Some(cents(300))).await.unwrap();
    assert_eq!(partial.amount, cents(300));
    assert_eq!(partial.payment_id, ok.id);
    assert_eq!(partial.payment.status, "partially_refunded");
    assert_eq!(partial.payment.refunded_amount, cents(300));
    assert_eq!(
        store.get(ok.id).await.unwrap(),
        Some(partial.payment.clone())
    );
    match store.refund(ok.id, Some(cents(701))).await {
        Err(StoreError::RefundTooLarge {
            requested,
            remaining,
        }) => assert_eq!((requested, remaining), (cents(701), cents(700))),
        other => panic!("expected RefundTooLarge, got {other:?}"),
    }
    assert!(matches!(
        store.refund(ok.id, Some(Money::ZERO)).await,
        Err(StoreError::RefundTooLarge { .. })
    ));
    let rest = store.refund(ok.id, None).await.unwrap();
    assert_eq!(rest.amount, cents(700));
    assert_eq!(rest.payment.status, "refunded");
    assert_eq!(rest.payment.refunded_amount, cents(1000));
    assert_ne!(rest.id, partial.id);
    assert!(matches!(
        store.refund(ok.id, None).await,
        Err(StoreError::NotRefundable)
    ));
    assert!(matches!(
        store.refund(failed.id, None).await,
        Err(StoreError::NotRefundable)
    ));
    assert!(matches!(
        store.refund(Uuid::now_v7(), None).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.get(ok.id).await.unwrap(), Some(rest.payment.clone()));
    // A refunded payment still took the money once: no second success for the order.
    assert!(store.has_success(order).await.unwrap());
    assert!(matches!(
        store.record(&payment(order, "succeeded", 1000)).await,
        Err(StoreError::AlreadyPaid)
    ));
    assert_eq!(
        outbox.of(order).await[3..].to_vec(),
        vec![
            row(order, "payment.refunded", cents(300)),
            row(order, "payment.refunded", cents(700)),
        ],
        "one row per refund, none for the refused ones"
    );

    // 20 concurrent refunds of 1.00 against 10.00: exactly ten go through.
    let charged = Uuid::now_v7();
    let big = payment(charged, "succeeded", 1000);
    store.record(&big).await.unwrap();
    let refunds = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.refund(big.id, Some(cents(100))).await })
    });
    let (mut refunded, mut too_large) = (0, 0);
    for refund in refunds.collect::<Vec<_>>() {
        match refund.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.amount, cents(100));
                refunded += 1;
            }
            Err(StoreError::RefundTooLarge { .. } | StoreError::NotRefundable) => too_large += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((refunded, too_large), (10, 10));
    let after = store.get(big.id).await.unwrap().unwrap();
    assert_eq!(after.refunded_amount, cents(1000));
    assert_eq!(after.status, "refunded");
    assert_eq!(
        outbox.of(charged).await.len(),
        11,
        "the charge and ten refunds"
    );
}

#[tokio::test]
async fn sqlite_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/payments.db", dir.path().display());
    let store = payments::SqlitePaymentStore::open(&url, &Default::default())
        .await
        .unwrap();
    let outbox = Outbox::Sqlite(store.db().clone());
    let store = Arc::new(store);
    keeps_the_contract(store.clone(), outbox).await;
    store.close().await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_keeps_the_contract() {
    let url = kit::pg::test_database_url();
    let pg = kit::pg::Pg::open(
        &url,
        &kit::pg::unique_schema("payments"),
        &Default::default(),
        payments::pg::MIGRATIONS,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "PostgreSQL at {url}: {e}. These tests need a server: start one (scripts/test does) \
             or point TEST_DATABASE_URL at one"
        )
    });
    let store = payments::PgPaymentStore::new(pg.clone());
    keeps_the_contract(Arc::new(store), Outbox::Pg(pg.clone())).await;
    pg.drop_schema().await.unwrap();
}

/// DynamoDB on the server at `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts moto), in
/// tables of its own.
#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn dynamodb_keeps_the_contract() {
    let endpoint = std::env::var("TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "TEST_DYNAMODB_ENDPOINT is not set: run scripts/check-aws (it starts moto[server]==5.2.1), \
             e.g. scripts/check-aws cargo test -p payments --features dynamodb"
        )
    });
    let url = format!(
        "dynamodb://payments-{}?region=us-east-1&endpoint={endpoint}",
        Uuid::new_v4()
    );
    let store = payments::dynamo::DynamoPaymentStore::from_url(&url)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    store.ensure_table().await.unwrap(); // idempotent
    let parsed = kit::dynamo_url::parse(&url).unwrap();
    let client = aws_sdk_dynamodb::Client::new(&bus::dynamo::sdk_config(&parsed).await);
    let outbox = Outbox::Dynamo(client, store.outbox().table().to_owned());
    keeps_the_contract(Arc::new(store), outbox).await;
}
