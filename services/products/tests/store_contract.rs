//! The products store contract: catalog, stock arithmetic and reservations, written once
//! against `Arc<dyn ProductStore>` and run unchanged against SQLite and, with feature
//! `postgres`, PostgreSQL (a schema of its own per test, dropped afterwards).
//!
//! PostgreSQL is `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! when it is unreachable these tests fail, never skip: a green run must mean both backends
//! were checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kit::Money;
use kit::db::now_ms;
use products::domain::ReservationLines;
use products::store::{NewProduct, ProductChanges, ReservationStatus, StockLevel, StoreError};
use products::{ProductStore, SqliteProductStore};
use uuid::Uuid;

async fn sqlite() -> (tempfile::TempDir, Arc<dyn ProductStore>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/products.db", dir.path().display());
    let store = SqliteProductStore::open(&url, &Default::default())
        .await
        .unwrap();
    (dir, Arc::new(store))
}

#[cfg(feature = "postgres")]
async fn postgres() -> (kit::pg::Pg, Arc<dyn ProductStore>) {
    let url = kit::pg::test_database_url();
    let schema = kit::pg::unique_schema("products");
    let store = products::pg::PgProductStore::open(&url, &schema, &Default::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {url} (TEST_DATABASE_URL) is needed for these tests: {e}. \
                 Start one with scripts/test, or point TEST_DATABASE_URL at a server."
            )
        });
    (store.pg().clone(), Arc::new(store))
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
    created_products_read_back_exactly,
    a_taken_sku_is_a_duplicate,
    lists_page_in_creation_order_and_filter_by_category,
    update_changes_only_what_is_given,
    delete_removes_once,
    concurrent_reservations_never_oversell,
    reservation_is_all_or_nothing,
    re_reserving_for_the_same_order_takes_nothing,
    concurrent_retries_of_one_order_reserve_once,
    release_gives_stock_back_once,
    commit_keeps_stock_taken,
    expired_holds_are_released,
    unknown_products,
    answers_ping,
);

fn widget(sku: &str, stock: i64) -> NewProduct {
    NewProduct {
        name: format!("Widget {sku}"),
        description: "A widget".into(),
        price: Money::from_cents(1_999).unwrap(),
        stock,
        sku: sku.into(),
        category: "tools".into(),
    }
}

fn lines(items: &[(Uuid, i64)]) -> ReservationLines {
    ReservationLines::parse(items).unwrap()
}

async fn level(store: &Arc<dyn ProductStore>, id: Uuid) -> (i64, i64) {
    let StockLevel {
        stock, reserved, ..
    } = store.stock(id).await.unwrap().unwrap();
    (stock, reserved)
}

async fn created_products_read_back_exactly(store: Arc<dyn ProductStore>) {
    assert_eq!(store.count().await.unwrap(), 0);
    let p = store.create(widget("W-1", 7)).await.unwrap();
    assert_eq!(p.name, "Widget W-1");
    assert_eq!(p.description, "A widget");
    assert_eq!(p.price.cents(), 1_999);
    assert_eq!(
        (p.stock, p.sku.as_str(), p.category.as_str()),
        (7, "W-1", "tools")
    );
    assert_eq!(p.created_at, p.updated_at);
    assert_eq!(store.get(p.id).await.unwrap(), Some(p.clone()));
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(
        store.stock(p.id).await.unwrap(),
        Some(StockLevel {
            product_id: p.id,
            sku: "W-1".into(),
            stock: 7,
            reserved: 0
        })
    );
    assert_eq!(store.get(Uuid::new_v4()).await.unwrap(), None);
    assert_eq!(store.stock(Uuid::new_v4()).await.unwrap(), None);
}

async fn a_taken_sku_is_a_duplicate(store: Arc<dyn ProductStore>) {
    let first = store.create(widget("DUP", 1)).await.unwrap();
    let other = store.create(widget("OTHER", 1)).await.unwrap();
    assert!(matches!(
        store.create(widget("DUP", 5)).await,
        Err(StoreError::DuplicateSku)
    ));
    // Renaming onto a taken sku is the same conflict, and changes nothing.
    let rename = ProductChanges {
        sku: Some("DUP".into()),
        stock: Some(99),
        ..Default::default()
    };
    assert!(matches!(
        store.update(other.id, rename).await,
        Err(StoreError::DuplicateSku)
    ));
    assert_eq!(store.get(other.id).await.unwrap(), Some(other));
    assert_eq!(store.get(first.id).await.unwrap(), Some(first));
    assert_eq!(store.count().await.unwrap(), 2);
}

async fn lists_page_in_creation_order_and_filter_by_category(store: Arc<dyn ProductStore>) {
    let mut all = Vec::new();
    for i in 0..6 {
        let mut new = widget(&format!("L-{i}"), i);
        new.category = if i % 2 == 0 { "even" } else { "odd" }.into();
        all.push(store.create(new).await.unwrap());
    }
    assert_eq!(store.list(0, 100, None).await.unwrap(), all);
    assert_eq!(store.list(0, 4, None).await.unwrap(), all[..4]);
    assert_eq!(store.list(4, 4, None).await.unwrap(), all[4..]);
    assert_eq!(store.list(6, 4, None).await.unwrap(), vec![]);
    let odd: Vec<_> = all
        .iter()
        .filter(|p| p.category == "odd")
        .cloned()
        .collect();
    assert_eq!(store.list(0, 100, Some("odd".into())).await.unwrap(), odd);
    assert_eq!(
        store.list(1, 1, Some("odd".into())).await.unwrap(),
        odd[1..2]
    );
    assert_eq!(
        store.list(0, 100, Some("none".into())).await.unwrap(),
        vec![]
    );
}

async fn update_changes_only_what_is_given(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("U-1", 3)).await.unwrap();
    let changed = store
        .update(
            p.id,
            ProductChanges {
                price: Some(Money::from_cents(2_500).unwrap()),
                stock: Some(12),
                name: Some("Better widget".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.name, "Better widget");
    assert_eq!(changed.price.cents(), 2_500);
    assert_eq!(changed.stock, 12);
    assert_eq!(
        (
            changed.sku.as_str(),
            changed.category.as_str(),
            changed.description.as_str()
        ),
        ("U-1", "tools", "A widget")
    );
    assert_eq!(changed.created_at, p.created_at);
    assert!(changed.updated_at >= p.updated_at);
    assert_eq!(store.get(p.id).await.unwrap(), Some(changed));
    assert_eq!(
        store
            .update(Uuid::new_v4(), ProductChanges::default())
            .await
            .unwrap(),
        None
    );
}

async fn delete_removes_once(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("D-1", 3)).await.unwrap();
    let kept = store.create(widget("D-2", 3)).await.unwrap();
    assert!(store.delete(p.id).await.unwrap());
    assert!(!store.delete(p.id).await.unwrap());
    assert_eq!(store.get(p.id).await.unwrap(), None);
    assert_eq!(store.list(0, 100, None).await.unwrap(), vec![kept]);
    // The sku is free again.
    store.create(widget("D-1", 1)).await.unwrap();
}

async fn concurrent_reservations_never_oversell(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("HOT", 30)).await.unwrap();
    let one = lines(&[(p.id, 1)]);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (store, one) = (store.clone(), one.clone());
            tokio::spawn(async move { store.reserve(Uuid::new_v4(), &one, i64::MAX).await })
        })
        .collect();
    let (mut ok, mut short) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok((_, true)) => ok += 1,
            Err(StoreError::InsufficientStock {
                requested: 1,
                available: 0,
                ..
            }) => short += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, short), (30, 70));
    assert_eq!(level(&store, p.id).await, (0, 30));
}

async fn reservation_is_all_or_nothing(store: Arc<dyn ProductStore>) {
    let plenty = store.create(widget("A", 10)).await.unwrap();
    let scarce = store.create(widget("B", 1)).await.unwrap();
    let order = Uuid::new_v4();
    let too_many = lines(&[(plenty.id, 3), (scarce.id, 2)]);
    match store.reserve(order, &too_many, i64::MAX).await {
        Err(StoreError::InsufficientStock {
            product_id,
            requested: 2,
            available: 1,
        }) => assert_eq!(product_id, scarce.id),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(level(&store, plenty.id).await, (10, 0), "nothing kept");
    assert_eq!(level(&store, scarce.id).await, (1, 0));
    assert_eq!(store.release(order).await.unwrap(), None, "no reservation");

    // The failed attempt left no trace: the same order can reserve what fits.
    let fits = lines(&[(plenty.id, 3), (scarce.id, 1)]);
    let (held, created) = store.reserve(order, &fits, i64::MAX).await.unwrap();
    assert!(created);
    assert_eq!(held.order_id, order);
    assert_eq!(held.status, ReservationStatus::Held);
    let mut expected: Vec<(Uuid, i64, i64)> = vec![(plenty.id, 3, 1_999), (scarce.id, 1, 1_999)];
    expected.sort();
    let got: Vec<(Uuid, i64, i64)> = held
        .items
        .iter()
        .map(|l| (l.product_id, l.quantity, l.unit_price.cents()))
        .collect();
    assert_eq!(
        got, expected,
        "lines in product id order, at the price of the moment"
    );
    assert_eq!(level(&store, plenty.id).await, (7, 3));
    assert_eq!(level(&store, scarce.id).await, (0, 1));
}

async fn re_reserving_for_the_same_order_takes_nothing(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("R-1", 10)).await.unwrap();
    let order = Uuid::new_v4();
    let (first, created) = store
        .reserve(order, &lines(&[(p.id, 4)]), i64::MAX)
        .await
        .unwrap();
    assert!(created);
    let (again, created) = store
        .reserve(order, &lines(&[(p.id, 4)]), i64::MAX)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again, first);
    // Even a retry with other lines gets the original reservation, not a second one.
    let (other, created) = store
        .reserve(order, &lines(&[(p.id, 1)]), i64::MAX)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(other, first);
    assert_eq!(level(&store, p.id).await, (6, 4));
}

async fn concurrent_retries_of_one_order_reserve_once(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("R-2", 100)).await.unwrap();
    let order = Uuid::new_v4();
    let two = lines(&[(p.id, 2)]);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, two) = (store.clone(), two.clone());
            tokio::spawn(async move { store.reserve(order, &two, i64::MAX).await })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        let (reservation, made_now) = t.await.unwrap().unwrap();
        assert_eq!(reservation.items.len(), 1);
        assert_eq!(reservation.items[0].quantity, 2);
        created += usize::from(made_now);
    }
    assert_eq!(created, 1);
    assert_eq!(level(&store, p.id).await, (98, 2));
}

async fn release_gives_stock_back_once(store: Arc<dyn ProductStore>) {
    let a = store.create(widget("REL-A", 5)).await.unwrap();
    let b = store.create(widget("REL-B", 5)).await.unwrap();
    let order = Uuid::new_v4();
    store
        .reserve(order, &lines(&[(a.id, 2), (b.id, 5)]), i64::MAX)
        .await
        .unwrap();
    assert_eq!(level(&store, a.id).await, (3, 2));
    assert_eq!(level(&store, b.id).await, (0, 5));
    // Racing releases of one order: stock comes back once.
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.release(order).await })
        })
        .collect();
    for t in tasks {
        let released = t.await.unwrap().unwrap().unwrap();
        assert_eq!(released.status, ReservationStatus::Released);
    }
    assert_eq!(
        store.release(order).await.unwrap().unwrap().status,
        ReservationStatus::Released
    );
    assert_eq!(level(&store, a.id).await, (5, 0), "released exactly once");
    assert_eq!(level(&store, b.id).await, (5, 0));
    assert!(matches!(
        store.commit(order).await,
        Err(StoreError::WrongState(ReservationStatus::Released))
    ));
    // A released order stays released: reserving again returns it and takes nothing.
    let (again, created) = store
        .reserve(order, &lines(&[(a.id, 2)]), i64::MAX)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.status, ReservationStatus::Released);
    assert_eq!(level(&store, a.id).await, (5, 0));
    assert_eq!(store.release(Uuid::new_v4()).await.unwrap(), None);
}

async fn commit_keeps_stock_taken(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("C-1", 5)).await.unwrap();
    let order = Uuid::new_v4();
    store
        .reserve(order, &lines(&[(p.id, 3)]), now_ms() - 1)
        .await
        .unwrap();
    let committed = store.commit(order).await.unwrap().unwrap();
    assert_eq!(committed.status, ReservationStatus::Committed);
    assert_eq!(committed.items[0].quantity, 3);
    assert_eq!(
        store.commit(order).await.unwrap().unwrap().status,
        ReservationStatus::Committed,
        "committing twice is a no-op"
    );
    // Sold for good: not reserved any more, not given back by release or expiry.
    assert_eq!(level(&store, p.id).await, (2, 0));
    assert!(matches!(
        store.release(order).await,
        Err(StoreError::WrongState(ReservationStatus::Committed))
    ));
    assert_eq!(store.release_expired(100).await.unwrap(), 0);
    assert_eq!(level(&store, p.id).await, (2, 0));
    assert_eq!(store.commit(Uuid::new_v4()).await.unwrap(), None);
}

async fn expired_holds_are_released(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("EXP", 4)).await.unwrap();
    let expired = Uuid::new_v4();
    store
        .reserve(expired, &lines(&[(p.id, 3)]), now_ms() - 1)
        .await
        .unwrap();
    store
        .reserve(Uuid::new_v4(), &lines(&[(p.id, 1)]), i64::MAX)
        .await
        .unwrap();
    assert_eq!(level(&store, p.id).await, (0, 4));
    assert_eq!(store.release_expired(100).await.unwrap(), 1);
    assert_eq!(store.release_expired(100).await.unwrap(), 0);
    assert_eq!(level(&store, p.id).await, (3, 1));
    assert_eq!(
        store.release(expired).await.unwrap().unwrap().status,
        ReservationStatus::Released
    );
    assert_eq!(level(&store, p.id).await, (3, 1), "not given back twice");

    // `limit` bounds one sweep.
    for _ in 0..3 {
        store
            .reserve(Uuid::new_v4(), &lines(&[(p.id, 1)]), now_ms() - 1)
            .await
            .unwrap();
    }
    assert_eq!(store.release_expired(2).await.unwrap(), 2);
    assert_eq!(store.release_expired(2).await.unwrap(), 1);
    assert_eq!(level(&store, p.id).await, (3, 1));
}

async fn unknown_products(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("K-1", 5)).await.unwrap();
    let ghost = Uuid::new_v4();
    let order = Uuid::new_v4();
    match store
        .reserve(order, &lines(&[(p.id, 1), (ghost, 1)]), i64::MAX)
        .await
    {
        Err(StoreError::UnknownProduct(id)) => assert_eq!(id, ghost),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(level(&store, p.id).await, (5, 0), "nothing kept");
    assert_eq!(store.release(order).await.unwrap(), None);
}

async fn answers_ping(store: Arc<dyn ProductStore>) {
    store.ping().await.unwrap();
}
