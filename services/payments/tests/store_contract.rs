//! The [`PaymentStore`] contract, run unchanged against SQLite, (feature `postgres`)
//! PostgreSQL and (feature `dynamodb`) DynamoDB: the payment state machine (pending →
//! succeeded | failed → refunds), one attempt in flight or successful per order under
//! concurrency, a refunded payment no longer holding its order, exact refunds only against the
//! version they were computed from, and the outbox row (with its sequence) each change writes. PostgreSQL must be reachable for the
//! `postgres` test, and `TEST_DYNAMODB_ENDPOINT` set (scripts/check-aws starts moto) for the
//! `dynamodb` one: they fail, never skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bus::names::PAYMENTS_TOPIC;
use chrono::DateTime;
use kit::Money;
use payments::store::{NewRefund, Payment, PaymentStore, Settlement, StoreError};
use uuid::Uuid;

/// Reads a backend's outbox back: `(destination, event type, key, amount, sequence)` in commit
/// order.
enum Outbox {
    Sqlite(kit::db::Db),
    #[cfg(feature = "postgres")]
    Pg(kit::pg::Pg),
    #[cfg(feature = "dynamodb")]
    Dynamo(aws_sdk_dynamodb::Client, String),
}

type Row = (String, String, String, String, u64);

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
                    payload["sequence"].as_u64().unwrap(),
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

fn row(order: Uuid, event_type: &str, amount: Money, sequence: u64) -> Row {
    (
        format!("stream:{PAYMENTS_TOPIC}"),
        event_type.to_owned(),
        order.to_string(),
        serde_json::to_value(amount).unwrap().to_string(),
        sequence,
    )
}

fn cents(c: i64) -> Money {
    Money::from_cents(c).unwrap()
}

/// A new pending payment (as `begin` takes it).
fn intent(order_id: Uuid, amount: i64) -> Payment {
    let now = DateTime::from_timestamp_millis(kit::db::now_ms()).unwrap();
    Payment {
        id: Uuid::now_v7(),
        order_id,
        amount: cents(amount),
        currency: "USD".into(),
        status: "pending".into(),
        payment_method: "credit_card".into(),
        card_brand: None,
        card_last4: None,
        provider_reference: None,
        failure_reason: None,
        refunded_amount: Money::ZERO,
        version: 0,
        created_at: now,
        updated_at: now,
    }
}

fn paid(reference: &str) -> Settlement {
    Settlement::Succeeded {
        reference: reference.into(),
        card: Some(("visa".into(), "4242".into())),
    }
}

fn declined() -> Settlement {
    Settlement::Failed {
        reference: Some("pi_declined".into()),
        reason: "card_declined".into(),
    }
}

fn refund_of(payment: &Payment, amount: i64) -> NewRefund {
    NewRefund {
        id: Uuid::now_v7(),
        payment_id: payment.id,
        expected_version: payment.version,
        amount: cents(amount),
        provider_reference: Some("re_1".into()),
        reason: None,
    }
}

/// A succeeded payment of `amount` for a new order.
async fn charged(store: &Arc<dyn PaymentStore>, amount: i64) -> Payment {
    let p = intent(Uuid::now_v7(), amount);
    store.begin(&p).await.unwrap();
    store.finish(p.id, &paid("pi_ok")).await.unwrap().payment
}

async fn keeps_the_contract(store: Arc<dyn PaymentStore>, outbox: Outbox) {
    store.ping().await.unwrap();

    // An intent: pending, version 0, no event; one per order.
    let order = Uuid::now_v7();
    let mut first = intent(order, 1000);
    first.created_at -= chrono::Duration::milliseconds(5);
    first.updated_at = first.created_at;
    store.begin(&first).await.unwrap();
    assert_eq!(store.get(first.id).await.unwrap(), Some(first.clone()));
    assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
    assert!(matches!(
        store.begin(&intent(order, 1000)).await,
        Err(StoreError::InProgress)
    ));
    let later = DateTime::from_timestamp_millis(kit::db::now_ms() + 1000).unwrap();
    assert!(
        store
            .pending_before(later, 1000)
            .await
            .unwrap()
            .contains(&first)
    );
    assert!(
        !store
            .pending_before(first.created_at, 1000)
            .await
            .unwrap()
            .contains(&first),
        "only those created before the cutoff"
    );
    assert_eq!(outbox.of(order).await, vec![], "nothing happened yet");

    // Finished once, at version 1, with its event; a second outcome changes nothing.
    let failed = store.finish(first.id, &declined()).await.unwrap();
    assert!(failed.changed);
    assert_eq!(
        (
            failed.payment.status.as_str(),
            failed.payment.version,
            failed.payment.failure_reason.as_deref()
        ),
        ("failed", 1, Some("card_declined"))
    );
    let again = store.finish(first.id, &paid("pi_late")).await.unwrap();
    assert!(!again.changed);
    assert_eq!(again.payment, failed.payment);
    assert_eq!(
        store.get(first.id).await.unwrap(),
        Some(failed.payment.clone())
    );
    assert!(
        !store
            .pending_before(later, 1000)
            .await
            .unwrap()
            .iter()
            .any(|p| p.id == first.id),
        "no longer pending"
    );
    assert!(matches!(
        store.finish(Uuid::now_v7(), &declined()).await,
        Err(StoreError::NotFound)
    ));

    // A failure holds nothing: the next attempt begins and succeeds; then the order is paid.
    let second = intent(order, 1000);
    store.begin(&second).await.unwrap();
    let ok = store
        .finish(second.id, &paid("pi_1"))
        .await
        .unwrap()
        .payment;
    assert_eq!(
        (
            ok.status.as_str(),
            ok.version,
            ok.provider_reference.as_deref()
        ),
        ("succeeded", 1, Some("pi_1"))
    );
    assert_eq!(
        (ok.card_brand.as_deref(), ok.card_last4.as_deref()),
        (Some("visa"), Some("4242"))
    );
    assert!(matches!(
        store.begin(&intent(order, 1000)).await,
        Err(StoreError::AlreadyPaid)
    ));
    assert_eq!(
        store.by_order(order).await.unwrap(),
        vec![failed.payment.clone(), ok.clone()]
    );
    assert_eq!(store.by_order(Uuid::now_v7()).await.unwrap(), vec![]);
    assert_eq!(
        outbox.of(order).await,
        vec![
            row(order, "payment.failed", cents(1000), 1),
            row(order, "payment.succeeded", cents(1000), 1),
        ],
        "one row per finished attempt, none for the refused ones"
    );

    // An intent the provider never charged is withdrawn, without a trace; the order is free.
    let quiet = Uuid::now_v7();
    let withdrawn = intent(quiet, 500);
    store.begin(&withdrawn).await.unwrap();
    assert!(store.abandon(withdrawn.id).await.unwrap());
    assert!(!store.abandon(withdrawn.id).await.unwrap());
    assert_eq!(store.get(withdrawn.id).await.unwrap(), None);
    assert!(!store.abandon(ok.id).await.unwrap(), "only a pending one");
    assert_eq!(store.get(ok.id).await.unwrap(), Some(ok.clone()));
    store.begin(&intent(quiet, 500)).await.unwrap();
    assert_eq!(outbox.of(quiet).await, vec![]);

    // 20 concurrent attempts for one order: exactly one begins.
    let contested = Uuid::now_v7();
    let attempts = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.begin(&intent(contested, 2500)).await })
    });
    let (mut began, mut in_progress) = (0, 0);
    for attempt in attempts.collect::<Vec<_>>() {
        match attempt.await.unwrap() {
            Ok(()) => began += 1,
            Err(StoreError::InProgress) => in_progress += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((began, in_progress), (1, 19));
    assert_eq!(store.by_order(contested).await.unwrap().len(), 1);

    // Refunds: exact, bounded by what is left, only of a success, only at the version read.
    let partial = store.refund(&refund_of(&ok, 300)).await.unwrap();
    assert_eq!(partial.amount, cents(300));
    assert_eq!(partial.payment_id, ok.id);
    assert_eq!(partial.provider_reference.as_deref(), Some("re_1"));
    assert_eq!(partial.payment.status, "partially_refunded");
    assert_eq!(partial.payment.refunded_amount, cents(300));
    assert_eq!(partial.payment.version, 2);
    assert_eq!(
        store.get(ok.id).await.unwrap(),
        Some(partial.payment.clone())
    );
    assert!(
        matches!(
            store.refund(&refund_of(&ok, 100)).await,
            Err(StoreError::Conflict)
        ),
        "computed from version 1, which is gone"
    );
    match store.refund(&refund_of(&partial.payment, 701)).await {
        Err(StoreError::RefundTooLarge {
            requested,
            remaining,
        }) => assert_eq!((requested, remaining), (cents(701), cents(700))),
        other => panic!("expected RefundTooLarge, got {other:?}"),
    }
    assert!(matches!(
        store.refund(&refund_of(&partial.payment, 0)).await,
        Err(StoreError::RefundTooLarge { .. })
    ));
    assert!(
        matches!(
            store.begin(&intent(order, 1000)).await,
            Err(StoreError::AlreadyPaid)
        ),
        "a partially refunded payment still holds its order"
    );
    let rest = store
        .refund(&NewRefund {
            reason: Some("order_cancelled".into()),
            ..refund_of(&partial.payment, 700)
        })
        .await
        .unwrap();
    assert_eq!(rest.amount, cents(700));
    assert_eq!(rest.reason.as_deref(), Some("order_cancelled"));
    assert_eq!(rest.payment.status, "refunded");
    assert_eq!(rest.payment.refunded_amount, cents(1000));
    assert_eq!(rest.payment.version, 3);
    assert_ne!(rest.id, partial.id);
    assert!(matches!(
        store.refund(&refund_of(&rest.payment, 1)).await,
        Err(StoreError::NotRefundable)
    ));
    assert!(matches!(
        store.refund(&refund_of(&failed.payment, 1)).await,
        Err(StoreError::NotRefundable)
    ));
    assert!(matches!(
        store
            .refund(&NewRefund {
                payment_id: Uuid::now_v7(),
                ..refund_of(&ok, 1)
            })
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.get(ok.id).await.unwrap(), Some(rest.payment.clone()));
    assert_eq!(
        outbox.of(order).await[2..].to_vec(),
        vec![
            row(order, "payment.refunded", cents(300), 2),
            row(order, "payment.refunded", cents(700), 3),
        ],
        "one row per refund, none for the refused ones"
    );

    // Finding 4: a refunded payment is not the order's success; a new attempt may begin.
    let next = intent(order, 1000);
    store.begin(&next).await.unwrap();
    let repaid = store.finish(next.id, &paid("pi_2")).await.unwrap();
    assert_eq!(repaid.payment.status, "succeeded");
    assert_eq!(store.by_order(order).await.unwrap().len(), 3);

    // 20 concurrent refunds computed from one version: exactly one is recorded.
    let big = charged(&store, 1000).await;
    let refunds = (0..20).map(|_| {
        let store = store.clone();
        let refund = refund_of(&big, 100);
        tokio::spawn(async move { store.refund(&refund).await })
    });
    let (mut refunded, mut conflicts) = (0, 0);
    for refund in refunds.collect::<Vec<_>>() {
        match refund.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.amount, cents(100));
                refunded += 1;
            }
            Err(StoreError::Conflict) => conflicts += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((refunded, conflicts), (1, 19));
    let after = store.get(big.id).await.unwrap().unwrap();
    assert_eq!((after.refunded_amount, after.version), (cents(100), 2));
    // Refunds one after the other, each from the version the last left, sum exactly.
    let mut current = after;
    for _ in 0..9 {
        current = store
            .refund(&refund_of(&current, 100))
            .await
            .unwrap()
            .payment;
    }
    assert_eq!(
        (
            current.status.as_str(),
            current.refunded_amount,
            current.version
        ),
        ("refunded", cents(1000), 11)
    );
    assert_eq!(
        outbox
            .of(big.order_id)
            .await
            .iter()
            .map(|r| r.4)
            .collect::<Vec<_>>(),
        (1..=11).collect::<Vec<u64>>(),
        "the charge and ten refunds, their sequences the payment's versions"
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
