//! The notification store contract: records stored once per event id and listed by user or
//! order, oldest first. Written once against `Arc<dyn NotificationStore>` and run unchanged
//! against SQLite, with feature `postgres` PostgreSQL (a schema of its own per test, dropped
//! afterwards), and with feature `dynamodb` DynamoDB on moto (a table of its own per test).
//!
//! PostgreSQL is `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! when it is unreachable these tests fail, never skip: a green run must mean both backends
//! were checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use kit::Money;
use kit::page::{Cursor, PageRequest, Start};
use notifications::content::Notification;
use notifications::store::Filter;
use notifications::{NotificationStore, SqliteNotificationStore};
use uuid::Uuid;

async fn sqlite() -> (tempfile::TempDir, Arc<dyn NotificationStore>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/notifications.db", dir.path().display());
    let store = SqliteNotificationStore::open(&url, &Default::default())
        .await
        .unwrap();
    (dir, Arc::new(store))
}

#[cfg(feature = "postgres")]
async fn postgres() -> (kit::pg::Pg, Arc<dyn NotificationStore>) {
    let url = kit::pg::test_database_url();
    let schema = kit::pg::unique_schema("notifications");
    let store = notifications::pg::PgNotificationStore::open(&url, &schema, &Default::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {url} (TEST_DATABASE_URL) is needed for these tests: {e}. \
                 Start one with scripts/test, or point TEST_DATABASE_URL at a server."
            )
        });
    (store.pg().clone(), Arc::new(store))
}

/// DynamoDB on the server at `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts moto), in a
/// table of its own per test.
#[cfg(feature = "dynamodb")]
async fn dynamodb() -> Arc<dyn NotificationStore> {
    let endpoint = std::env::var("TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "TEST_DYNAMODB_ENDPOINT is not set: run scripts/check-aws (it starts moto[server]==5.2.1), \
             or ./scripts/test"
        )
    });
    let url = format!(
        "dynamodb://notifications-{}?region=us-east-1&endpoint={endpoint}",
        Uuid::new_v4().simple()
    );
    let store = notifications::dynamo::DynamoNotificationStore::from_url(&url)
        .await
        .unwrap();
    store
        .ensure_table()
        .await
        .unwrap_or_else(|e| panic!("DynamoDB at {endpoint}: {e}"));
    Arc::new(store)
}

/// One test per behaviour and backend, so a failure names both.
macro_rules! contract {
    ($($behaviour:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $behaviour() {
                    let (_dir, store) = super::sqlite().await;
                    super::$behaviour(store.clone()).await;
                    store.close().await;
                }
            )*
        }

        #[cfg(feature = "dynamodb")]
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $behaviour() {
                    super::$behaviour(super::dynamodb().await).await;
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $behaviour() {
                    let (pg, store) = super::postgres().await;
                    super::$behaviour(store).await;
                    // Closes the pool too.
                    pg.drop_schema().await.unwrap();
                }
            )*
        }
    };
}

contract!(
    stores_each_event_once,
    racing_deliveries_of_one_event_store_it_once,
    lists_by_user_and_order_oldest_first,
    answers_ping,
);

/// A record at `ms` past a fixed instant: whole milliseconds, the precision stores keep.
fn note(user: Uuid, order: Uuid, ms: i64, kind: &str) -> Notification {
    Notification {
        id: Uuid::now_v7(),
        event_id: Uuid::new_v4(),
        event_type: kind.into(),
        order_id: order,
        user_id: user,
        recipient: format!("user:{user}"),
        subject: format!("Order {} {kind}", &order.simple().to_string()[..8]),
        body: "Your order of 2 item(s) totalling 3999.98 USD.".into(),
        amount: Money::from_cents(399_998).unwrap(),
        currency: "USD".into(),
        created_at: DateTime::<Utc>::from_timestamp_millis(1_750_000_000_000 + ms).unwrap(),
    }
}

/// Everything a user has, oldest first, in one page.
fn of_user(user_id: Uuid) -> Filter {
    Filter {
        user_id: Some(user_id),
        order_id: None,
        page: PageRequest::first(1000),
    }
}

async fn stores_each_event_once(store: Arc<dyn NotificationStore>) {
    assert_eq!(store.insert_batch(&[]).await.unwrap(), Vec::<bool>::new());
    let (user, order) = (Uuid::new_v4(), Uuid::new_v4());
    let a = note(user, order, 1, "order.created");
    let b = note(user, order, 2, "order.paid");
    // The same event delivered twice in one batch, as a new record: only the first counts.
    let a_again = Notification {
        id: Uuid::now_v7(),
        subject: "a different rendering".into(),
        ..a.clone()
    };
    assert_eq!(
        store
            .insert_batch(&[a.clone(), b.clone(), a_again.clone()])
            .await
            .unwrap(),
        vec![true, true, false]
    );
    let c = note(user, order, 3, "order.cancelled");
    assert_eq!(
        store.insert_batch(&[a_again, c.clone()]).await.unwrap(),
        vec![false, true]
    );
    assert!(!store.insert_once(&b).await.unwrap());
    let d = note(user, order, 4, "order.shipped");
    assert!(store.insert_once(&d).await.unwrap());
    assert_eq!(
        store.find(&of_user(user)).await.unwrap().items,
        vec![a, b, c, d],
        "exact, first writes win"
    );
}

async fn racing_deliveries_of_one_event_store_it_once(store: Arc<dyn NotificationStore>) {
    let n = note(Uuid::new_v4(), Uuid::new_v4(), 0, "order.created");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (store, n) = (store.clone(), n.clone());
            tokio::spawn(async move { store.insert_once(&n).await })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        stored += usize::from(t.await.unwrap().unwrap());
    }
    assert_eq!(stored, 1);
    assert_eq!(
        store.find(&of_user(n.user_id)).await.unwrap().items,
        vec![n]
    );
}

async fn lists_by_user_and_order_oldest_first(store: Arc<dyn NotificationStore>) {
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (o1, o2, o3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // Inserted out of time order: listing must sort by created_at, not insertion.
    let ada_o1_paid = note(ada, o1, 30, "order.paid");
    let ada_o1_created = note(ada, o1, 10, "order.created");
    let bob_o3_created = note(bob, o3, 20, "order.created");
    let ada_o2_created = note(ada, o2, 40, "order.created");
    let same_ms: Vec<Notification> = (0..3).map(|_| note(bob, o3, 50, "order.paid")).collect();
    let mut batch = vec![
        ada_o1_paid.clone(),
        ada_o1_created.clone(),
        bob_o3_created.clone(),
        ada_o2_created.clone(),
    ];
    // Ties on created_at are broken by id; insert them in reverse id order.
    batch.extend(same_ms.iter().rev().cloned());
    assert_eq!(store.insert_batch(&batch).await.unwrap(), vec![true; 7]);

    let find = |user_id, order_id, limit| {
        let store = store.clone();
        async move {
            store
                .find(&Filter {
                    user_id,
                    order_id,
                    page: PageRequest::first(limit),
                })
                .await
                .unwrap()
                .items
        }
    };
    assert_eq!(
        find(Some(ada), None, 100).await,
        vec![
            ada_o1_created.clone(),
            ada_o1_paid.clone(),
            ada_o2_created.clone()
        ]
    );
    assert_eq!(
        find(None, Some(o1), 100).await,
        vec![ada_o1_created.clone(), ada_o1_paid.clone()]
    );
    assert_eq!(
        find(Some(ada), Some(o2), 100).await,
        vec![ada_o2_created.clone()]
    );
    assert_eq!(find(Some(bob), Some(o1), 100).await, vec![]);
    let mut bob_all = vec![bob_o3_created.clone()];
    bob_all.extend(same_ms.iter().cloned());
    assert_eq!(find(Some(bob), None, 100).await, bob_all);
    assert_eq!(find(None, Some(o3), 2).await, bob_all[..2]);
    assert_eq!(find(Some(Uuid::new_v4()), None, 100).await, vec![]);

    // Following the cursor visits each record once, in order, for any page size: by user, by
    // order, by both, and (an operator's view) everything, in the store's own order.
    let everything = walk(&store, None, None, 100).await;
    assert_eq!(everything.len(), 7);
    for limit in [1, 2, 3, 4] {
        assert_eq!(
            walk(&store, Some(bob), None, limit).await,
            bob_all,
            "{limit}"
        );
        assert_eq!(
            walk(&store, None, Some(o3), limit).await,
            bob_all,
            "{limit}"
        );
        assert_eq!(
            walk(&store, Some(ada), Some(o1), limit).await,
            vec![ada_o1_created.clone(), ada_o1_paid.clone()]
        );
        assert_eq!(walk(&store, None, None, limit).await, everything);
    }
    let foreign = Filter {
        user_id: Some(ada),
        order_id: None,
        page: PageRequest {
            limit: 2,
            start: Start::After(Cursor::from_text("not a row")),
        },
    };
    assert!(matches!(
        store.find(&foreign).await,
        Err(notifications::store::StoreError::BadCursor(_))
    ));
}

/// Every page from the first, following `next` to the end.
async fn walk(
    store: &Arc<dyn NotificationStore>,
    user_id: Option<Uuid>,
    order_id: Option<Uuid>,
    limit: u32,
) -> Vec<Notification> {
    let mut filter = Filter {
        user_id,
        order_id,
        page: PageRequest::first(limit),
    };
    let mut seen = Vec::new();
    loop {
        let page = store.find(&filter).await.unwrap();
        assert!(page.items.len() <= limit as usize);
        seen.extend(page.items);
        match page.next {
            Some(next) => filter.page.start = Start::After(next),
            None => return seen,
        }
    }
}

async fn answers_ping(store: Arc<dyn NotificationStore>) {
    store.ping().await.unwrap();
}
