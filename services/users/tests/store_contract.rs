//! The users store contract: every behaviour the API and start-up rely on, written once
//! against `Arc<dyn UserStore>` and run unchanged against SQLite and, with feature
//! `postgres`, PostgreSQL (a schema of its own per test, dropped afterwards).
//!
//! PostgreSQL is `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! when it is unreachable these tests fail, never skip: a green run must mean both backends
//! were checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use users::domain::{Email, Phone, UserName};
use users::store::StoreError;
use users::{SqliteUserStore, UserStore};
use uuid::Uuid;

async fn sqlite() -> (tempfile::TempDir, Arc<dyn UserStore>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/users.db", dir.path().display());
    let store = SqliteUserStore::open(&url, &Default::default())
        .await
        .unwrap();
    (dir, Arc::new(store))
}

#[cfg(feature = "postgres")]
async fn postgres() -> (kit::pg::Pg, Arc<dyn UserStore>) {
    let url = kit::pg::test_database_url();
    let schema = kit::pg::unique_schema("users");
    let store = users::pg::PgUserStore::open(&url, &schema, &Default::default())
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
                #[tokio::test]
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
                #[tokio::test]
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
    created_users_read_back_exactly,
    a_taken_email_is_a_duplicate,
    lists_page_in_creation_order,
    delete_removes_once_and_frees_the_email,
    answers_ping,
);

fn name(s: &str) -> UserName {
    UserName::parse(s).unwrap()
}

fn email(s: &str) -> Email {
    Email::parse(s).unwrap()
}

async fn created_users_read_back_exactly(store: Arc<dyn UserStore>) {
    let phone = Phone::parse("+44 20 7946 0958").unwrap();
    let ada = store
        .create(
            &name("Ada Lovelace"),
            &email("Ada@Example.com"),
            Some(&phone),
        )
        .await
        .unwrap();
    assert_eq!(ada.name, "Ada Lovelace");
    assert_eq!(ada.email, "ada@example.com");
    assert_eq!(ada.phone.as_deref(), Some("+44 20 7946 0958"));
    assert_eq!(store.get(ada.id).await.unwrap(), Some(ada.clone()));

    let bob = store
        .create(&name("Bob"), &email("bob@example.com"), None)
        .await
        .unwrap();
    assert_eq!(store.get(bob.id).await.unwrap().unwrap().phone, None);
    assert_eq!(store.get(Uuid::new_v4()).await.unwrap(), None, "not found");
}

async fn a_taken_email_is_a_duplicate(store: Arc<dyn UserStore>) {
    let first = store
        .create(&name("Ada"), &email("ada@example.com"), None)
        .await
        .unwrap();
    // Emails are stored lower-cased, so case does not make a second address.
    let again = store
        .create(&name("Someone Else"), &email("ADA@example.com"), None)
        .await;
    assert!(
        matches!(again, Err(StoreError::DuplicateEmail)),
        "{again:?}"
    );
    assert_eq!(store.list(0, 100).await.unwrap(), vec![first]);
}

async fn lists_page_in_creation_order(store: Arc<dyn UserStore>) {
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(
            store
                .create(
                    &name(&format!("User {i}")),
                    &email(&format!("u{i}@example.com")),
                    None,
                )
                .await
                .unwrap(),
        );
    }
    assert_eq!(store.list(0, 100).await.unwrap(), created);
    assert_eq!(store.list(0, 2).await.unwrap(), created[0..2]);
    assert_eq!(store.list(2, 2).await.unwrap(), created[2..4]);
    assert_eq!(store.list(4, 2).await.unwrap(), created[4..]);
    assert_eq!(store.list(5, 2).await.unwrap(), vec![]);
}

async fn delete_removes_once_and_frees_the_email(store: Arc<dyn UserStore>) {
    let ada = store
        .create(&name("Ada"), &email("ada@example.com"), None)
        .await
        .unwrap();
    let bob = store
        .create(&name("Bob"), &email("bob@example.com"), None)
        .await
        .unwrap();
    assert!(store.delete(ada.id).await.unwrap());
    assert!(!store.delete(ada.id).await.unwrap(), "already gone");
    assert!(!store.delete(Uuid::new_v4()).await.unwrap());
    assert_eq!(store.get(ada.id).await.unwrap(), None);
    assert_eq!(store.list(0, 100).await.unwrap(), vec![bob]);
    let again = store
        .create(&name("Ada"), &email("ada@example.com"), None)
        .await
        .unwrap();
    assert_ne!(again.id, ada.id);
}

async fn answers_ping(store: Arc<dyn UserStore>) {
    store.ping().await.unwrap();
}
