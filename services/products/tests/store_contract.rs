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
use kit::page::{Cursor, PageRequest, Start};
use products::domain::ReservationLines;
use products::store::{
    CatalogFilter, Hold, NewProduct, Product, ProductChanges, ReleaseIf, ReservationStatus, Stock,
    StockChange, StockLevel, StoreError,
};
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
    search_finds_text_in_name_sku_or_description,
    update_changes_only_what_is_given,
    delete_removes_once,
    concurrent_reservations_never_oversell,
    concurrent_multi_product_reservations_never_oversell_or_deadlock,
    reservation_is_all_or_nothing,
    re_reserving_for_the_same_order_takes_nothing,
    concurrent_retries_of_one_order_reserve_once,
    release_gives_stock_back_once,
    commit_keeps_stock_taken,
    expired_holds_are_released,
    unknown_products,
    answers_ping,
    on_hand_and_reserved_follow_reserve_release_and_commit,
    operators_set_and_adjust_on_hand_never_below_reserved,
    concurrent_counts_and_reservations_never_oversell,
    a_renewal_takes_a_released_reservation_again_all_or_nothing,
    a_failed_attempt_releases_only_its_own_hold,
    renewal_extends_the_hold_past_the_sweeper,
    settled_reservations_are_pruned_after_their_retention_and_held_ones_never,
);

fn widget(sku: &str, stock: i64) -> NewProduct {
    NewProduct {
        name: format!("Widget {sku}"),
        description: "A widget".into(),
        price: Money::from_cents(1_999).unwrap(),
        on_hand: stock,
        sku: sku.into(),
        category: "tools".into(),
    }
}

fn lines(items: &[(Uuid, i64)]) -> ReservationLines {
    ReservationLines::parse(items).unwrap()
}

/// (available, reserved)
async fn level(store: &Arc<dyn ProductStore>, id: Uuid) -> (i64, i64) {
    let StockLevel { stock, .. } = store.stock(id).await.unwrap().unwrap();
    (stock.available(), stock.reserved)
}

/// (on hand, reserved), as the product and its stock level both say.
async fn shelf(store: &Arc<dyn ProductStore>, id: Uuid) -> (i64, i64) {
    let StockLevel { stock, .. } = store.stock(id).await.unwrap().unwrap();
    assert_eq!(store.get(id).await.unwrap().unwrap().stock, stock);
    (stock.on_hand, stock.reserved)
}

fn renewing(attempt: Uuid) -> Hold {
    Hold {
        until_ms: i64::MAX,
        attempt: Some(attempt),
        renew: true,
    }
}

async fn created_products_read_back_exactly(store: Arc<dyn ProductStore>) {
    assert_eq!(store.count().await.unwrap(), 0);
    let p = store.create(widget("W-1", 7)).await.unwrap();
    assert_eq!(p.name, "Widget W-1");
    assert_eq!(p.description, "A widget");
    assert_eq!(p.price.cents(), 1_999);
    assert_eq!(
        (p.stock, p.sku.as_str(), p.category.as_str()),
        (
            Stock {
                on_hand: 7,
                reserved: 0
            },
            "W-1",
            "tools"
        )
    );
    assert_eq!(p.created_at, p.updated_at);
    assert_eq!(store.get(p.id).await.unwrap(), Some(p.clone()));
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(
        store.stock(p.id).await.unwrap(),
        Some(StockLevel {
            product_id: p.id,
            sku: "W-1".into(),
            stock: Stock {
                on_hand: 7,
                reserved: 0
            },
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
        on_hand: Some(99),
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
    assert_eq!(listed(&store, 0, 100, None).await, all);
    assert_eq!(listed(&store, 0, 4, None).await, all[..4]);
    assert_eq!(listed(&store, 4, 4, None).await, all[4..]);
    assert_eq!(listed(&store, 6, 4, None).await, vec![]);
    let odd: Vec<_> = all
        .iter()
        .filter(|p| p.category == "odd")
        .cloned()
        .collect();
    assert_eq!(listed(&store, 0, 100, Some("odd")).await, odd);
    assert_eq!(listed(&store, 1, 1, Some("odd")).await, odd[1..2]);
    assert_eq!(listed(&store, 0, 100, Some("none")).await, vec![]);

    // Following the cursor visits every product once, in order, whatever the page size
    // (products made in the same millisecond are ordered by id), and the last page says so.
    for limit in [1, 2, 3, 4, 6, 7] {
        assert_eq!(walk(&store, limit, None).await, all, "pages of {limit}");
    }
    assert_eq!(walk(&store, 1, Some("odd")).await, odd);
    // A cursor from somewhere else is the client's error, not the store's.
    let foreign = PageRequest {
        limit: 2,
        start: Start::After(Cursor::from_text("LastEvaluatedKey")),
    };
    assert!(matches!(
        store.list(&foreign, &CatalogFilter::default()).await,
        Err(StoreError::BadCursor(_))
    ));
}

fn in_category(category: Option<&str>) -> CatalogFilter {
    CatalogFilter {
        category: category.map(str::to_owned),
        search: None,
    }
}

/// The search matches name, SKU and description in any letter case, with SQL's wildcards as
/// plain characters, and pages like the rest of the catalog.
async fn search_finds_text_in_name_sku_or_description(store: Arc<dyn ProductStore>) {
    let mut made = Vec::new();
    for (sku, name, description) in [
        ("TEA-1", "Darjeeling Tea", "first flush"),
        ("MUG-1", "Mug", "holds tea"),
        ("TEAPOT", "Pot", "cast iron"),
        ("PCT-1", "Cup 100%", "porcelain"),
        ("PLAIN", "Plate", "porcelain_white"),
    ] {
        let mut new = widget(sku, 1);
        new.name = name.into();
        new.description = description.into();
        made.push(store.create(new).await.unwrap());
    }
    let search = |text: &str| CatalogFilter {
        category: None,
        search: Some(text.to_owned()),
    };
    let found = |filter: CatalogFilter, limit: u32| {
        let store = store.clone();
        async move {
            let request = PageRequest::parse(limit, None, None).unwrap();
            let page = store.list(&request, &filter).await.unwrap();
            (
                page.items.into_iter().map(|p| p.sku).collect::<Vec<_>>(),
                page.next.is_some(),
            )
        }
    };
    assert_eq!(
        found(search("TEA"), 10).await,
        (vec!["TEA-1".into(), "MUG-1".into(), "TEAPOT".into()], false)
    );
    assert_eq!(
        found(search("  tEa "), 2).await,
        (vec!["TEA-1".into(), "MUG-1".into()], true)
    );
    assert_eq!(found(search("%"), 10).await, (vec!["PCT-1".into()], false));
    assert_eq!(found(search("_"), 10).await, (vec!["PLAIN".into()], false));
    assert_eq!(found(search("nothing"), 10).await, (vec![], false));
    assert_eq!(found(search(""), 10).await.0.len(), made.len());
    let mut in_other = search("tea");
    in_other.category = Some("elsewhere".into());
    assert_eq!(found(in_other, 10).await, (vec![], false));
}

async fn listed(
    store: &Arc<dyn ProductStore>,
    skip: u32,
    limit: u32,
    category: Option<&str>,
) -> Vec<Product> {
    let request = PageRequest::parse(limit, Some(skip), None).unwrap();
    store
        .list(&request, &in_category(category))
        .await
        .unwrap()
        .items
}

/// Every page from the first, following `next` to the end.
async fn walk(store: &Arc<dyn ProductStore>, limit: u32, category: Option<&str>) -> Vec<Product> {
    let mut request = PageRequest::first(limit);
    let mut seen = Vec::new();
    loop {
        let page = store.list(&request, &in_category(category)).await.unwrap();
        assert!(page.items.len() <= limit as usize);
        seen.extend(page.items);
        match page.next {
            Some(next) => request.start = Start::After(next),
            None => return seen,
        }
    }
}

async fn update_changes_only_what_is_given(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("U-1", 3)).await.unwrap();
    let changed = store
        .update(
            p.id,
            ProductChanges {
                price: Some(Money::from_cents(2_500).unwrap()),
                on_hand: Some(12),
                name: Some("Better widget".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.name, "Better widget");
    assert_eq!(changed.price.cents(), 2_500);
    assert_eq!(changed.stock.on_hand, 12);
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
    assert_eq!(listed(&store, 0, 100, None).await, vec![kept]);
    // The sku is free again.
    store.create(widget("D-1", 1)).await.unwrap();
}

async fn concurrent_reservations_never_oversell(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("HOT", 30)).await.unwrap();
    let one = lines(&[(p.id, 1)]);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (store, one) = (store.clone(), one.clone());
            tokio::spawn(async move {
                store
                    .reserve(Uuid::new_v4(), &one, Hold::until(i64::MAX))
                    .await
            })
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

/// Orders of overlapping sets of products at once (on PostgreSQL they are batched into shared
/// transactions): every product ends with exactly the units of the reservations that won, never
/// more than its stock, each reservation whole or absent, and nothing deadlocks.
async fn concurrent_multi_product_reservations_never_oversell_or_deadlock(
    store: Arc<dyn ProductStore>,
) {
    let mut products = Vec::new();
    for (i, stock) in [40, 25, 60, 10].into_iter().enumerate() {
        products.push(
            store
                .create(widget(&format!("MIX-{i}"), stock))
                .await
                .unwrap()
                .id,
        );
    }
    // Every non-empty subset of the four products, in both orders of listing, 300 orders.
    let baskets: Vec<Vec<(Uuid, i64)>> = (0..300usize)
        .map(|n| {
            let subset = n % 15 + 1;
            let mut basket: Vec<(Uuid, i64)> = (0..4)
                .filter(|bit| subset & (1 << bit) != 0)
                .map(|bit| (products[bit], (n % 3 + 1) as i64))
                .collect();
            if n % 2 == 1 {
                basket.reverse();
            }
            basket
        })
        .collect();
    let tasks: Vec<_> = baskets
        .iter()
        .map(|basket| {
            let (store, basket) = (store.clone(), lines(basket));
            tokio::spawn(async move {
                store
                    .reserve(Uuid::new_v4(), &basket, Hold::until(i64::MAX))
                    .await
            })
        })
        .collect();
    let mut taken: std::collections::HashMap<Uuid, i64> = Default::default();
    let mut won = 0;
    for (task, basket) in tasks.into_iter().zip(&baskets) {
        match task.await.unwrap() {
            Ok((reservation, true)) => {
                won += 1;
                assert_eq!(reservation.items.len(), basket.len(), "a whole reservation");
                for (product, quantity) in basket {
                    *taken.entry(*product).or_default() += quantity;
                }
            }
            Err(StoreError::InsufficientStock { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(won > 0, "some orders fit");
    for (product, stock) in products.iter().zip([40, 25, 60, 10]) {
        let reserved = taken.get(product).copied().unwrap_or(0);
        assert!(reserved <= stock, "{reserved} reserved of {stock}");
        assert_eq!(
            level(&store, *product).await,
            (stock - reserved, reserved),
            "available and reserved are what the winners took"
        );
    }
}

async fn reservation_is_all_or_nothing(store: Arc<dyn ProductStore>) {
    let plenty = store.create(widget("A", 10)).await.unwrap();
    let scarce = store.create(widget("B", 1)).await.unwrap();
    let order = Uuid::new_v4();
    let too_many = lines(&[(plenty.id, 3), (scarce.id, 2)]);
    match store.reserve(order, &too_many, Hold::until(i64::MAX)).await {
        Err(StoreError::InsufficientStock {
            product_id,
            requested: 2,
            available: 1,
        }) => assert_eq!(product_id, scarce.id),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(level(&store, plenty.id).await, (10, 0), "nothing kept");
    assert_eq!(level(&store, scarce.id).await, (1, 0));
    assert_eq!(
        store.release(order, ReleaseIf::Held).await.unwrap(),
        None,
        "no reservation"
    );

    // The failed attempt left no trace: the same order can reserve what fits.
    let fits = lines(&[(plenty.id, 3), (scarce.id, 1)]);
    let (held, created) = store
        .reserve(order, &fits, Hold::until(i64::MAX))
        .await
        .unwrap();
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
        .reserve(order, &lines(&[(p.id, 4)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    assert!(created);
    let (again, created) = store
        .reserve(order, &lines(&[(p.id, 4)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again, first);
    // Even a retry with other lines gets the original reservation, not a second one.
    let (other, created) = store
        .reserve(order, &lines(&[(p.id, 1)]), Hold::until(i64::MAX))
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
            tokio::spawn(async move { store.reserve(order, &two, Hold::until(i64::MAX)).await })
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
        .reserve(
            order,
            &lines(&[(a.id, 2), (b.id, 5)]),
            Hold::until(i64::MAX),
        )
        .await
        .unwrap();
    assert_eq!(level(&store, a.id).await, (3, 2));
    assert_eq!(level(&store, b.id).await, (0, 5));
    // Racing releases of one order: stock comes back once.
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.release(order, ReleaseIf::Held).await })
        })
        .collect();
    for t in tasks {
        let released = t.await.unwrap().unwrap().unwrap();
        assert_eq!(released.status, ReservationStatus::Released);
    }
    assert_eq!(
        store
            .release(order, ReleaseIf::Held)
            .await
            .unwrap()
            .unwrap()
            .status,
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
        .reserve(order, &lines(&[(a.id, 2)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.status, ReservationStatus::Released);
    assert_eq!(level(&store, a.id).await, (5, 0));
    assert_eq!(
        store
            .release(Uuid::new_v4(), ReleaseIf::Held)
            .await
            .unwrap(),
        None
    );
}

async fn settled_reservations_are_pruned_after_their_retention_and_held_ones_never(
    store: Arc<dyn ProductStore>,
) {
    let p = store.create(widget("PR-1", 20)).await.unwrap();
    let (held, sold, released, sold_too) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    for order in [held, sold, released, sold_too] {
        store
            .reserve(order, &lines(&[(p.id, 2)]), Hold::until(now_ms() + 60_000))
            .await
            .unwrap();
    }
    store.commit(sold).await.unwrap().unwrap();
    store.commit(sold_too).await.unwrap().unwrap();
    store
        .release(released, ReleaseIf::Held)
        .await
        .unwrap()
        .unwrap();
    let before = level(&store, p.id).await;
    assert_eq!(before, (14, 2), "20 on hand, 4 sold, 2 held");

    // Settled just now: younger than any retention.
    assert_eq!(
        store
            .prune_settled(now_ms() - 3_600_000, 100)
            .await
            .unwrap(),
        0
    );
    // Past the retention: the settled ones go, in batches; the held one stays.
    let later = now_ms() + 1_000;
    assert_eq!(store.prune_settled(later, 2).await.unwrap(), 2);
    assert_eq!(store.prune_settled(later, 2).await.unwrap(), 1);
    assert_eq!(store.prune_settled(later, 2).await.unwrap(), 0);
    assert_eq!(level(&store, p.id).await, before, "stock is untouched");
    assert_eq!(store.commit(sold).await.unwrap(), None, "forgotten");
    assert_eq!(
        store.release(released, ReleaseIf::Held).await.unwrap(),
        None
    );
    // The held reservation still holds, and still settles.
    let kept = store.release(held, ReleaseIf::Held).await.unwrap().unwrap();
    assert_eq!(kept.status, ReservationStatus::Released);
    assert_eq!(level(&store, p.id).await, (16, 0));
    // The forgotten order's id may reserve again (a new reservation).
    let (again, taken) = store
        .reserve(
            released,
            &lines(&[(p.id, 1)]),
            Hold::until(now_ms() + 60_000),
        )
        .await
        .unwrap();
    assert!(taken);
    assert_eq!(again.status, ReservationStatus::Held);
}

async fn commit_keeps_stock_taken(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("C-1", 5)).await.unwrap();
    let order = Uuid::new_v4();
    store
        .reserve(order, &lines(&[(p.id, 3)]), Hold::until(now_ms() - 1))
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
    // Sold for good: off the shelf, not reserved any more, not given back by release or expiry.
    assert_eq!(level(&store, p.id).await, (2, 0));
    assert_eq!(shelf(&store, p.id).await, (2, 0));
    assert!(matches!(
        store.release(order, ReleaseIf::Held).await,
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
        .reserve(expired, &lines(&[(p.id, 3)]), Hold::until(now_ms() - 1))
        .await
        .unwrap();
    store
        .reserve(Uuid::new_v4(), &lines(&[(p.id, 1)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    assert_eq!(level(&store, p.id).await, (0, 4));
    assert_eq!(store.held().await.unwrap(), (2, 4), "two holds, four units");
    assert_eq!(store.release_expired(100).await.unwrap(), 1);
    assert_eq!(store.release_expired(100).await.unwrap(), 0);
    assert_eq!(level(&store, p.id).await, (3, 1));
    assert_eq!(store.held().await.unwrap(), (1, 1));
    assert_eq!(
        store
            .release(expired, ReleaseIf::Held)
            .await
            .unwrap()
            .unwrap()
            .status,
        ReservationStatus::Released
    );
    assert_eq!(level(&store, p.id).await, (3, 1), "not given back twice");

    // `limit` bounds one sweep.
    for _ in 0..3 {
        store
            .reserve(
                Uuid::new_v4(),
                &lines(&[(p.id, 1)]),
                Hold::until(now_ms() - 1),
            )
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
        .reserve(
            order,
            &lines(&[(p.id, 1), (ghost, 1)]),
            Hold::until(i64::MAX),
        )
        .await
    {
        Err(StoreError::UnknownProduct(id)) => assert_eq!(id, ghost),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(level(&store, p.id).await, (5, 0), "nothing kept");
    assert_eq!(store.release(order, ReleaseIf::Held).await.unwrap(), None);
}

async fn answers_ping(store: Arc<dyn ProductStore>) {
    store.ping().await.unwrap();
}

async fn on_hand_and_reserved_follow_reserve_release_and_commit(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("OH-1", 10)).await.unwrap();
    let (released, sold) = (Uuid::new_v4(), Uuid::new_v4());
    store
        .reserve(released, &lines(&[(p.id, 3)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    store
        .reserve(sold, &lines(&[(p.id, 2)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    assert_eq!(shelf(&store, p.id).await, (10, 5));
    assert_eq!(level(&store, p.id).await, (5, 5));
    store.release(released, ReleaseIf::Held).await.unwrap();
    assert_eq!(shelf(&store, p.id).await, (10, 2), "released: back to sale");
    store.commit(sold).await.unwrap();
    assert_eq!(shelf(&store, p.id).await, (8, 0), "sold: off the shelf");
    assert_eq!(level(&store, p.id).await, (8, 0));
}

async fn operators_set_and_adjust_on_hand_never_below_reserved(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("OH-2", 5)).await.unwrap();
    store
        .reserve(Uuid::new_v4(), &lines(&[(p.id, 3)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    let set = store
        .change_stock(p.id, StockChange::Set(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        set.stock,
        Stock {
            on_hand: 4,
            reserved: 3
        }
    );
    for change in [StockChange::Set(2), StockChange::Adjust(-2)] {
        match store.change_stock(p.id, change).await {
            Err(StoreError::BelowReserved {
                product_id,
                reserved: 3,
                on_hand: 2,
            }) => assert_eq!(product_id, p.id),
            other => panic!("{change:?}: unexpected {other:?}"),
        }
    }
    let adjusted = store
        .change_stock(p.id, StockChange::Adjust(6))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (adjusted.stock.on_hand, adjusted.stock.available()),
        (10, 7)
    );
    let below = ProductChanges {
        on_hand: Some(1),
        name: Some("Renamed".into()),
        ..Default::default()
    };
    assert!(matches!(
        store.update(p.id, below).await,
        Err(StoreError::BelowReserved { reserved: 3, .. })
    ));
    assert_eq!(shelf(&store, p.id).await, (10, 3), "nothing changed");
    assert_eq!(store.get(p.id).await.unwrap().unwrap().name, "Widget OH-2");
    let exact = ProductChanges {
        on_hand: Some(3),
        ..Default::default()
    };
    store.update(p.id, exact).await.unwrap().unwrap();
    assert_eq!(level(&store, p.id).await, (0, 3));
    for change in [
        StockChange::Set(products::domain::MAX_STOCK + 1),
        StockChange::Adjust(products::domain::MAX_STOCK),
    ] {
        assert!(
            matches!(
                store.change_stock(p.id, change).await,
                Err(StoreError::StockOutOfRange)
            ),
            "{change:?}"
        );
    }
    assert_eq!(
        store
            .change_stock(Uuid::new_v4(), StockChange::Set(1))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .update(
                Uuid::new_v4(),
                ProductChanges {
                    on_hand: Some(1),
                    ..Default::default()
                }
            )
            .await
            .unwrap(),
        None
    );
}

async fn concurrent_counts_and_reservations_never_oversell(store: Arc<dyn ProductStore>) {
    // 60 claims on 50 units: 40 orders of one, and 20 units written off one at a time.
    let p = store.create(widget("OH-3", 50)).await.unwrap();
    let one = lines(&[(p.id, 1)]);
    let orders: Vec<_> = (0..40)
        .map(|_| {
            let (store, one) = (store.clone(), one.clone());
            tokio::spawn(async move {
                store
                    .reserve(Uuid::new_v4(), &one, Hold::until(i64::MAX))
                    .await
            })
        })
        .collect();
    let write_offs: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.change_stock(p.id, StockChange::Adjust(-1)).await })
        })
        .collect();
    let mut reserved = 0;
    for t in orders {
        match t.await.unwrap() {
            Ok((_, true)) => reserved += 1,
            Err(StoreError::InsufficientStock { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut written_off = 0;
    for t in write_offs {
        match t.await.unwrap() {
            Ok(Some(_)) => written_off += 1,
            Err(StoreError::BelowReserved { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        reserved + written_off,
        50,
        "every unit claimed exactly once"
    );
    assert_eq!(shelf(&store, p.id).await, (50 - written_off, reserved));
    assert_eq!(level(&store, p.id).await, (0, reserved));
}

async fn a_renewal_takes_a_released_reservation_again_all_or_nothing(store: Arc<dyn ProductStore>) {
    let a = store.create(widget("RN-A", 5)).await.unwrap();
    let b = store.create(widget("RN-B", 5)).await.unwrap();
    let order = Uuid::new_v4();
    let both = lines(&[(a.id, 2), (b.id, 1)]);
    store
        .reserve(order, &both, renewing(Uuid::new_v4()))
        .await
        .unwrap();
    store.release(order, ReleaseIf::Held).await.unwrap();
    assert_eq!(shelf(&store, a.id).await, (5, 0));

    // Without renewal a released reservation is answered as it is.
    let (as_is, taken) = store
        .reserve(order, &both, Hold::until(i64::MAX))
        .await
        .unwrap();
    assert_eq!((as_is.status, taken), (ReservationStatus::Released, false));
    assert_eq!(shelf(&store, a.id).await, (5, 0));

    // Renewed: held again, at today's price, and taken only once however often it is asked.
    store
        .update(
            a.id,
            ProductChanges {
                price: Some(Money::from_cents(2_100).unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (renewed, taken) = store
        .reserve(order, &both, renewing(Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!((renewed.status, taken), (ReservationStatus::Held, true));
    let got: Vec<(Uuid, i64, i64)> = renewed
        .items
        .iter()
        .map(|l| (l.product_id, l.quantity, l.unit_price.cents()))
        .collect();
    let mut expected = vec![(a.id, 2, 2_100), (b.id, 1, 1_999)];
    expected.sort();
    assert_eq!(got, expected);
    let (again, taken) = store
        .reserve(order, &both, renewing(Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!((again.status, taken), (ReservationStatus::Held, false));
    assert_eq!(again.items, renewed.items);
    assert_eq!(shelf(&store, a.id).await, (5, 2));
    assert_eq!(shelf(&store, b.id).await, (5, 1));

    // Released again, and b sold out meanwhile: the renewal takes nothing and stays released.
    store.release(order, ReleaseIf::Held).await.unwrap();
    store
        .reserve(Uuid::new_v4(), &lines(&[(b.id, 5)]), Hold::until(i64::MAX))
        .await
        .unwrap();
    match store.reserve(order, &both, renewing(Uuid::new_v4())).await {
        Err(StoreError::InsufficientStock {
            product_id,
            requested: 1,
            available: 0,
        }) => assert_eq!(product_id, b.id),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(shelf(&store, a.id).await, (5, 0), "nothing kept");
    let (still, _) = store
        .reserve(order, &both, Hold::until(i64::MAX))
        .await
        .unwrap();
    assert_eq!(still.status, ReservationStatus::Released);

    // A sold reservation is never renewed.
    let sold = Uuid::new_v4();
    let one_a = lines(&[(a.id, 1)]);
    store
        .reserve(sold, &one_a, Hold::until(i64::MAX))
        .await
        .unwrap();
    store.commit(sold).await.unwrap();
    let (committed, taken) = store
        .reserve(sold, &one_a, renewing(Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(
        (committed.status, taken),
        (ReservationStatus::Committed, false)
    );
    assert_eq!(shelf(&store, a.id).await, (4, 0));
}

async fn a_failed_attempt_releases_only_its_own_hold(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("AT-1", 5)).await.unwrap();
    let order = Uuid::new_v4();
    let two = lines(&[(p.id, 2)]);
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    store.reserve(order, &two, renewing(first)).await.unwrap();
    // The retry arrives before the failed first attempt's clean-up does.
    let (held, _) = store.reserve(order, &two, renewing(second)).await.unwrap();
    assert_eq!(held.status, ReservationStatus::Held);
    let late = store
        .release(order, ReleaseIf::HeldBy(first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        late.status,
        ReservationStatus::Held,
        "the retry's hold stays"
    );
    assert_eq!(shelf(&store, p.id).await, (5, 2));
    let own = store
        .release(order, ReleaseIf::HeldBy(second))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(own.status, ReservationStatus::Released);
    assert_eq!(shelf(&store, p.id).await, (5, 0));
    assert_eq!(
        store
            .release(Uuid::new_v4(), ReleaseIf::HeldBy(first))
            .await
            .unwrap(),
        None
    );
}

async fn renewal_extends_the_hold_past_the_sweeper(store: Arc<dyn ProductStore>) {
    let p = store.create(widget("EX-1", 5)).await.unwrap();
    let order = Uuid::new_v4();
    let one = lines(&[(p.id, 1)]);
    let deadline = now_ms() - 1;
    let (held, _) = store
        .reserve(order, &one, Hold::until(deadline))
        .await
        .unwrap();
    assert_eq!(
        held.expires_at.map(|t| t.timestamp_millis()),
        Some(deadline)
    );
    let later = now_ms() + 60_000;
    let (renewed, taken) = store
        .reserve(
            order,
            &one,
            Hold {
                until_ms: later,
                attempt: None,
                renew: true,
            },
        )
        .await
        .unwrap();
    assert!(!taken);
    assert_eq!(
        renewed.expires_at.map(|t| t.timestamp_millis()),
        Some(later)
    );
    assert_eq!(
        store.release_expired(100).await.unwrap(),
        0,
        "renewed in time"
    );
    assert_eq!(shelf(&store, p.id).await, (5, 1));
    let (forever, _) = store
        .reserve(Uuid::new_v4(), &one, Hold::until(i64::MAX))
        .await
        .unwrap();
    assert_eq!(forever.expires_at, None, "never expires");
}

/// A database written before on-hand and reserved were separate: what could be sold plus what
/// held reservations have is on hand; released and sold reservations count for nothing.
mod migration {
    use super::*;

    #[tokio::test]
    async fn sqlite_stock_carries_over() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/products.db", dir.path().display());
        let before: &'static [kit::db::Step] = &products::store::MIGRATIONS[..2];
        let old = kit::db::Db::open(&url, &Default::default(), before)
            .await
            .unwrap();
        let (p, q) = (Uuid::new_v4(), Uuid::new_v4());
        old.write(move |tx| {
            tx.execute_batch(&format!(
                "INSERT INTO products VALUES ('{p}', 'P', '', 100, 3, 'P-1', 'x', 1, 1);
                 INSERT INTO products VALUES ('{q}', 'Q', '', 100, 7, 'Q-1', 'x', 1, 1);
                 INSERT INTO reservations VALUES ('h', 'held', 1, 1, 9223372036854775807);
                 INSERT INTO reservations VALUES ('r', 'released', 1, 1, 1);
                 INSERT INTO reservations VALUES ('c', 'committed', 1, 1, 1);
                 INSERT INTO reservation_items VALUES ('h', '{p}', 2, 100);
                 INSERT INTO reservation_items VALUES ('r', '{p}', 1, 100);
                 INSERT INTO reservation_items VALUES ('c', '{p}', 4, 100);"
            ))?;
            Ok::<_, StoreError>(())
        })
        .await
        .unwrap();
        old.close().await;
        let store: Arc<dyn ProductStore> = Arc::new(
            SqliteProductStore::open(&url, &Default::default())
                .await
                .unwrap(),
        );
        assert_eq!(shelf(&store, p).await, (5, 2));
        assert_eq!(shelf(&store, q).await, (7, 0));
        store.close().await;
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_stock_carries_over() {
        let url = kit::pg::test_database_url();
        let schema = kit::pg::unique_schema("products");
        let before: &'static [kit::pg::PgStep] = &products::pg::PG_MIGRATIONS[..1];
        let old = kit::pg::Pg::open(&url, &schema, &Default::default(), before)
            .await
            .unwrap();
        let (p, q) = (Uuid::new_v4(), Uuid::new_v4());
        let (held, released, sold) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for sql in [
            format!("INSERT INTO products VALUES ('{p}', 'P', '', 100, 3, 'P-1', 'x', 1, 1)"),
            format!("INSERT INTO products VALUES ('{q}', 'Q', '', 100, 7, 'Q-1', 'x', 1, 1)"),
            format!(
                "INSERT INTO reservations VALUES ('{held}', 'held', 1, 1, 9223372036854775807)"
            ),
            format!("INSERT INTO reservations VALUES ('{released}', 'released', 1, 1, 1)"),
            format!("INSERT INTO reservations VALUES ('{sold}', 'committed', 1, 1, 1)"),
            format!("INSERT INTO reservation_items VALUES ('{held}', '{p}', 2, 100)"),
            format!("INSERT INTO reservation_items VALUES ('{released}', '{p}', 1, 100)"),
            format!("INSERT INTO reservation_items VALUES ('{sold}', '{p}', 4, 100)"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(old.pool())
                .await
                .unwrap();
        }
        old.close().await;
        let new = products::pg::PgProductStore::open(&url, &schema, &Default::default())
            .await
            .unwrap();
        let pg = new.pg().clone();
        let store: Arc<dyn ProductStore> = Arc::new(new);
        assert_eq!(shelf(&store, p).await, (5, 2));
        assert_eq!(shelf(&store, q).await, (7, 0));
        pg.drop_schema().await.unwrap();
    }
}
