//! The [`OrderStore`] contract, run unchanged against SQLite, (feature `postgres`)
//! PostgreSQL and (feature `dynamodb`) DynamoDB: what the API and the saga rely on, down to the
//! outbox rows each change writes. PostgreSQL must be reachable for the `postgres` tests, and
//! `TEST_DYNAMODB_ENDPOINT` set (scripts/check-aws starts moto) for the `dynamodb` one: they
//! fail, never skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use bus::names::{ORDER_EVENTS_QUEUE, ORDERS_TOPIC};
use chrono::Duration;
use kit::Money;
use kit::page::{Cursor, PageRequest, Start};
use orders::domain::OrderStatus;
use orders::store::{DeadLetter, Order, OrderStore, StoreError, new_order};
use uuid::Uuid;

/// Reads a backend's outbox back: `(destination, event type, key)` in commit order.
enum Outbox {
    Sqlite(kit::db::Db),
    #[cfg(feature = "postgres")]
    Pg(kit::pg::Pg),
    #[cfg(feature = "dynamodb")]
    Dynamo(aws_sdk_dynamodb::Client, String),
}

type Row = (String, String, String);

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
                let event_type = payload["event_type"].as_str().unwrap().to_owned();
                (destination, event_type, key)
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

/// The two rows every order event gets: the `orders` stream and the `order-events` queue.
fn rows_for(order: Uuid, event_type: &str) -> Vec<Row> {
    vec![
        (
            format!("stream:{ORDERS_TOPIC}"),
            event_type.to_owned(),
            order.to_string(),
        ),
        (
            format!("queue:{ORDER_EVENTS_QUEUE}"),
            event_type.to_owned(),
            order.to_string(),
        ),
    ]
}

fn cents(c: i64) -> Money {
    Money::from_cents(c).unwrap()
}

/// A pending order with lines sorted by product id (the order the store returns them in).
fn order(user: Uuid, ttl: Duration) -> Order {
    let mut products = [Uuid::new_v4(), Uuid::new_v4()];
    products.sort();
    new_order(
        Uuid::now_v7(),
        user,
        &[(products[0], 2, cents(1999)), (products[1], 1, cents(501))],
        "1 Main St".into(),
        orders::store::CURRENCY,
        ttl,
    )
    .unwrap()
}

/// Legal moves from `pending` to `status`.
fn path_to(status: OrderStatus) -> &'static [OrderStatus] {
    use OrderStatus::*;
    match status {
        Pending => &[],
        Paid => &[Paid],
        PaymentFailed => &[PaymentFailed],
        Shipped => &[Paid, Shipped],
        Delivered => &[Paid, Shipped, Delivered],
        Cancelled => &[Cancelled],
        Refunded => &[Paid, Refunded],
    }
}

const TTL: Duration = Duration::minutes(15);

async fn keeps_the_contract(store: Arc<dyn OrderStore>, outbox: Outbox) {
    store.ping().await.unwrap();
    let mut inserted = 0i64;
    assert_eq!(store.count().await.unwrap(), 0);

    // Insert and get: exactly what was written, with its order.created rows.
    let user = Uuid::now_v7();
    let first = order(user, TTL);
    assert_eq!(first.total_amount, cents(2 * 1999 + 501));
    store.insert(&first).await.unwrap();
    inserted += 1;
    assert_eq!(store.get(first.id).await.unwrap(), Some(first.clone()));
    assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
    assert_eq!(
        outbox.rows().await,
        rows_for(first.id, "order.created"),
        "one row per destination, committed with the order"
    );
    assert!(matches!(
        store.insert(&first).await,
        Err(StoreError::Duplicate)
    ));
    assert_eq!(
        outbox.rows().await.len(),
        2,
        "a refused insert writes no event"
    );

    // list_by_user: oldest first (created_at, then id), paged, only that user's.
    let base = first.created_at;
    let mut later = Vec::new();
    for offset in [30, 10, 20, 20] {
        let mut o = order(user, TTL);
        o.created_at = base + Duration::milliseconds(offset);
        o.updated_at = o.created_at;
        store.insert(&o).await.unwrap();
        inserted += 1;
        later.push(o);
    }
    let other_user = order(Uuid::now_v7(), TTL);
    store.insert(&other_user).await.unwrap();
    inserted += 1;
    // Two orders made in the same millisecond: ordered by id.
    let (tie_a, tie_b) = if later[2].id < later[3].id {
        (later[2].clone(), later[3].clone())
    } else {
        (later[3].clone(), later[2].clone())
    };
    let expected = vec![
        first.clone(),
        later[1].clone(),
        tie_a,
        tie_b,
        later[0].clone(),
    ];
    assert_eq!(listed(&store, user, 0, 100).await, expected);
    assert_eq!(listed(&store, user, 1, 2).await, expected[1..3].to_vec());
    assert_eq!(listed(&store, user, 5, 10).await, vec![]);
    assert_eq!(
        listed(&store, other_user.user_id, 0, 10).await,
        vec![other_user.clone()]
    );
    assert_eq!(listed(&store, Uuid::now_v7(), 0, 10).await, vec![]);
    // Following the cursor visits each order once, in order, for any page size; a full last
    // page says it is the last.
    for limit in [1, 2, 3, 5, 6] {
        let mut request = PageRequest::first(limit);
        let mut seen = Vec::new();
        loop {
            let page = store.list_by_user(user, &request).await.unwrap();
            assert!(page.items.len() <= limit as usize);
            seen.extend(page.items);
            match page.next {
                Some(next) => request.start = Start::After(next),
                None => break,
            }
        }
        assert_eq!(seen, expected, "pages of {limit}");
    }
    let foreign = PageRequest {
        limit: 2,
        start: Start::After(Cursor::from_text("not a row")),
    };
    assert!(matches!(
        store.list_by_user(user, &foreign).await,
        Err(StoreError::BadCursor(_))
    ));

    // Every (from, to) pair: legal moves change the order and write order.<to>; moving to the
    // current status is a no-op; everything else is refused and writes nothing.
    for from in OrderStatus::ALL {
        for to in OrderStatus::ALL {
            let o = order(Uuid::now_v7(), TTL);
            store.insert(&o).await.unwrap();
            inserted += 1;
            for step in path_to(from) {
                assert!(store.transition(o.id, *step, None).await.unwrap().changed);
            }
            let before = outbox.of(o.id).await;
            let result = store.transition(o.id, to, None).await;
            let after = outbox.of(o.id).await;
            let now = store.get(o.id).await.unwrap().unwrap();
            if from == to {
                let t = result.unwrap();
                assert!(!t.changed, "{from} -> {to}");
                assert_eq!(t.order, now);
                assert_eq!(after, before, "{from} -> {to} writes nothing");
            } else if from.can_become(to) {
                let t = result.unwrap();
                assert!(t.changed, "{from} -> {to}");
                assert_eq!(t.order.status, to);
                assert_eq!(t.order, now, "the returned order is the stored one");
                assert!(t.order.updated_at >= o.updated_at);
                let mut expected = before.clone();
                expected.extend(rows_for(o.id, &to.event_type()));
                assert_eq!(after, expected, "{from} -> {to}");
            } else {
                match result {
                    Err(StoreError::IllegalTransition { from: f, to: t }) => {
                        assert_eq!((f, t), (from, to));
                    }
                    other => panic!("{from} -> {to}: expected a refusal, got {other:?}"),
                }
                assert_eq!(now.status, from, "{from} -> {to} leaves the order alone");
                assert_eq!(after, before, "{from} -> {to} writes nothing");
            }
        }
    }
    assert!(matches!(
        store
            .transition(Uuid::now_v7(), OrderStatus::Paid, None)
            .await,
        Err(StoreError::NotFound)
    ));

    // 20 concurrent attempts of one transition: exactly one changes the order.
    let raced = order(Uuid::now_v7(), TTL);
    store.insert(&raced).await.unwrap();
    inserted += 1;
    let attempts = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.transition(raced.id, OrderStatus::Paid, None).await })
    });
    let mut changed = 0;
    for attempt in attempts.collect::<Vec<_>>() {
        let t = attempt.await.unwrap().unwrap();
        assert_eq!(t.order.status, OrderStatus::Paid);
        changed += usize::from(t.changed);
    }
    assert_eq!(changed, 1);
    let mut expected = rows_for(raced.id, "order.created");
    expected.extend(rows_for(raced.id, "order.paid"));
    assert_eq!(outbox.of(raced.id).await, expected);

    // 20 concurrent conflicting moves (paid vs cancelled): one wins, the rest are no-ops (same
    // target) or refused (the other one); one event.
    let contested = order(Uuid::now_v7(), TTL);
    store.insert(&contested).await.unwrap();
    inserted += 1;
    let attempts = (0..20).map(|i| {
        let store = store.clone();
        let to = if i % 2 == 0 {
            OrderStatus::Paid
        } else {
            OrderStatus::Cancelled
        };
        tokio::spawn(async move { (to, store.transition(contested.id, to, None).await) })
    });
    let mut winners = Vec::new();
    let mut results = Vec::new();
    for attempt in attempts.collect::<Vec<_>>() {
        let (to, result) = attempt.await.unwrap();
        if let Ok(t) = &result
            && t.changed
        {
            winners.push(to);
        }
        results.push((to, result));
    }
    assert_eq!(winners.len(), 1, "exactly one of 20 wins");
    let winner = winners[0];
    for (to, result) in results {
        match result {
            Ok(t) => assert_eq!(t.order.status, winner),
            Err(StoreError::IllegalTransition { from, to: refused }) => {
                assert_eq!((from, refused), (winner, to));
                assert_ne!(to, winner);
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let final_status = store.get(contested.id).await.unwrap().unwrap().status;
    assert_eq!(final_status, winner);
    let mut expected = rows_for(contested.id, "order.created");
    expected.extend(rows_for(contested.id, &winner.event_type()));
    assert_eq!(outbox.of(contested.id).await, expected);

    // Processed events: a redelivered event is recognised (even once its move is no longer
    // legal); a refused event is not marked, so it applies once it can.
    let deduped = order(Uuid::now_v7(), TTL);
    store.insert(&deduped).await.unwrap();
    inserted += 1;
    let (e1, e2) = (Uuid::now_v7(), Uuid::now_v7());
    assert!(
        store
            .transition(deduped.id, OrderStatus::Paid, Some(e1))
            .await
            .unwrap()
            .changed
    );
    let again = store
        .transition(deduped.id, OrderStatus::Paid, Some(e1))
        .await
        .unwrap();
    assert!(!again.changed);
    assert_eq!(again.order.status, OrderStatus::Paid);
    assert!(
        store
            .transition(deduped.id, OrderStatus::Refunded, Some(e2))
            .await
            .unwrap()
            .changed
    );
    assert!(
        !store
            .transition(deduped.id, OrderStatus::Refunded, Some(e2))
            .await
            .unwrap()
            .changed
    );
    // e1 again: paid is no longer reachable from refunded, yet it is not an error.
    assert!(
        !store
            .transition(deduped.id, OrderStatus::Paid, Some(e1))
            .await
            .unwrap()
            .changed
    );
    let mut expected = rows_for(deduped.id, "order.created");
    expected.extend(rows_for(deduped.id, "order.paid"));
    expected.extend(rows_for(deduped.id, "order.refunded"));
    assert_eq!(outbox.of(deduped.id).await, expected);

    let early = order(Uuid::now_v7(), TTL);
    store.insert(&early).await.unwrap();
    inserted += 1;
    let e3 = Uuid::now_v7();
    assert!(matches!(
        store
            .transition(early.id, OrderStatus::Shipped, Some(e3))
            .await,
        Err(StoreError::IllegalTransition {
            from: OrderStatus::Pending,
            to: OrderStatus::Shipped
        })
    ));
    store
        .transition(early.id, OrderStatus::Paid, None)
        .await
        .unwrap();
    assert!(
        store
            .transition(early.id, OrderStatus::Shipped, Some(e3))
            .await
            .unwrap()
            .changed,
        "the refused delivery was not recorded as processed"
    );

    // The same event delivered 20 times at once applies once.
    let redelivered = order(Uuid::now_v7(), TTL);
    store.insert(&redelivered).await.unwrap();
    inserted += 1;
    let e4 = Uuid::now_v7();
    let deliveries = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .transition(redelivered.id, OrderStatus::PaymentFailed, Some(e4))
                .await
        })
    });
    let mut changed = 0;
    for delivery in deliveries.collect::<Vec<_>>() {
        changed += usize::from(delivery.await.unwrap().unwrap().changed);
    }
    assert_eq!(changed, 1);
    assert_eq!(outbox.of(redelivered.id).await.len(), 4);

    // Pruning forgets exactly the recorded ids (e1, e2, e3, e4), then nothing.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(
        store
            .prune_processed(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .prune_processed(std::time::Duration::ZERO)
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        store
            .prune_processed(std::time::Duration::ZERO)
            .await
            .unwrap(),
        0
    );

    // expired_pending: pending orders past their window, oldest expiry first; not paid ones,
    // not ones still in their window.
    let older = order(Uuid::now_v7(), Duration::minutes(-10));
    let newer = order(Uuid::now_v7(), Duration::minutes(-5));
    let expired_but_paid = order(Uuid::now_v7(), Duration::minutes(-20));
    for o in [&newer, &older, &expired_but_paid] {
        store.insert(o).await.unwrap();
        inserted += 1;
    }
    store
        .transition(expired_but_paid.id, OrderStatus::Paid, None)
        .await
        .unwrap();
    assert_eq!(
        store.expired_pending(100).await.unwrap(),
        vec![older.id, newer.id]
    );
    assert_eq!(store.expired_pending(1).await.unwrap(), vec![older.id]);

    // Payment versions: the newest seen per payment wins; older ones are stale, the same one
    // again is not (a redelivery), and payments are told apart.
    let (for_order, payment, other) = (older.id, Uuid::now_v7(), Uuid::now_v7());
    assert!(
        store
            .observe_payment_version(for_order, payment, 2)
            .await
            .unwrap()
    );
    assert!(
        !store
            .observe_payment_version(for_order, payment, 1)
            .await
            .unwrap(),
        "an older version is stale"
    );
    assert!(
        store
            .observe_payment_version(for_order, payment, 2)
            .await
            .unwrap()
    );
    assert!(
        store
            .observe_payment_version(for_order, payment, 3)
            .await
            .unwrap()
    );
    assert!(
        !store
            .observe_payment_version(for_order, payment, 2)
            .await
            .unwrap()
    );
    assert!(
        store
            .observe_payment_version(for_order, other, 1)
            .await
            .unwrap()
    );

    // announce: the order's event under a chosen id, once per id, the order unchanged; an
    // id already processed (here, by a transition) announces nothing.
    let notice = Uuid::now_v7();
    let before = outbox.of(older.id).await;
    assert!(
        store
            .announce(older.id, "order.payment_refunded", notice)
            .await
            .unwrap()
    );
    assert!(
        !store
            .announce(older.id, "order.payment_refunded", notice)
            .await
            .unwrap(),
        "announced once per id"
    );
    let mut expected = before.clone();
    expected.extend(rows_for(older.id, "order.payment_refunded"));
    assert_eq!(outbox.of(older.id).await, expected);
    assert_eq!(
        store.get(older.id).await.unwrap().unwrap().status,
        OrderStatus::Pending
    );
    let applied = Uuid::now_v7();
    store
        .transition(newer.id, OrderStatus::Cancelled, Some(applied))
        .await
        .unwrap();
    assert!(
        !store
            .announce(newer.id, "order.payment_refunded", applied)
            .await
            .unwrap()
    );
    assert!(matches!(
        store
            .announce(Uuid::now_v7(), "order.payment_refunded", Uuid::now_v7())
            .await,
        Err(StoreError::NotFound)
    ));

    // A user's pending orders and the units they hold: `first` and `second` were paid or
    // moved on above; a fresh pending order of 3 units counts, a cancelled one does not.
    let shopper = Uuid::now_v7();
    let window = chrono::Utc::now() - Duration::minutes(20);
    assert_eq!(
        store.pending_of_user(shopper, window).await.unwrap(),
        (0, 0)
    );
    let (held, dropped) = (order(shopper, TTL), order(shopper, TTL));
    for o in [&held, &dropped] {
        store.insert(o).await.unwrap();
        inserted += 1;
    }
    store
        .transition(dropped.id, OrderStatus::Cancelled, None)
        .await
        .unwrap();
    assert_eq!(
        store.pending_of_user(shopper, window).await.unwrap(),
        (1, 3)
    );
    // Outside the window nothing is read.
    assert_eq!(
        store
            .pending_of_user(shopper, chrono::Utc::now() + Duration::minutes(1))
            .await
            .unwrap(),
        (0, 0)
    );

    // Dead letters: kept once per record, read back oldest first.
    let letter = DeadLetter {
        topic: "payments".into(),
        partition: 0,
        offset: 41,
        key: older.id.to_string(),
        payload: r#"{"event":"poison"}"#.into(),
        reason: "products answered 503".into(),
        attempts: 8,
    };
    store.dead_letter(&letter).await.unwrap();
    store.dead_letter(&letter).await.unwrap();
    let later = DeadLetter {
        offset: 42,
        ..letter.clone()
    };
    store.dead_letter(&later).await.unwrap();
    assert_eq!(
        store.dead_letters(10).await.unwrap(),
        vec![letter.clone(), later]
    );
    assert_eq!(store.dead_letters(1).await.unwrap(), vec![letter]);

    assert_eq!(store.count().await.unwrap(), inserted);
    let keys: BTreeSet<String> = outbox.rows().await.into_iter().map(|r| r.2).collect();
    assert_eq!(
        i64::try_from(keys.len()).unwrap(),
        inserted,
        "every order announced"
    );
}

#[tokio::test]
async fn sqlite_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/orders.db", dir.path().display());
    let store = orders::SqliteOrderStore::open(&url, &Default::default())
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
        &kit::pg::unique_schema("orders"),
        &Default::default(),
        orders::pg::MIGRATIONS,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "PostgreSQL at {url}: {e}. These tests need a server: start one (scripts/test does) \
             or point TEST_DATABASE_URL at one"
        )
    });
    let store = orders::PgOrderStore::new(pg.clone());
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
             e.g. scripts/check-aws cargo test -p orders --features dynamodb"
        )
    });
    let url = format!(
        "dynamodb://orders-{}?region=us-east-1&endpoint={endpoint}",
        Uuid::new_v4()
    );
    let store = orders::dynamo::DynamoOrderStore::from_url(&url)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    store.ensure_table().await.unwrap(); // idempotent
    let parsed = kit::dynamo_url::parse(&url).unwrap();
    let client = aws_sdk_dynamodb::Client::new(&bus::dynamo::sdk_config(&parsed).await);
    let outbox = Outbox::Dynamo(client, store.outbox().table().to_owned());
    keeps_the_contract(Arc::new(store), outbox).await;
}

/// The seed's `skip` and `limit`.
async fn listed(store: &Arc<dyn OrderStore>, user: Uuid, skip: u32, limit: u32) -> Vec<Order> {
    let request = PageRequest::parse(limit, Some(skip), None).unwrap();
    store.list_by_user(user, &request).await.unwrap().items
}
