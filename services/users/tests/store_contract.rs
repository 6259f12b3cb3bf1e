//! The users store contract: every behaviour the API and start-up rely on, written once
//! against `Arc<dyn UserStore>` and run unchanged against SQLite and, with feature
//! `postgres`, PostgreSQL (a schema of its own per test, dropped afterwards).
//!
//! PostgreSQL is `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! when it is unreachable these tests fail, never skip: a green run must mean both backends
//! were checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kit::auth::Role;
use kit::page::{Cursor, PageRequest, Start};
use users::domain::{Email, Phone, UserName};
use users::store::{RefreshRecord, RefreshUse, StoreError};
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
    credentials_and_roles_are_kept,
    refresh_tokens_rotate_once_and_a_replay_revokes_the_family,
    revoking_a_token_revokes_its_family_and_deleting_a_user_its_tokens,
    pruning_drops_only_families_past_their_last_expiry,
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
    assert_eq!(listed(&store, 0, 100).await, vec![first]);
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
    assert_eq!(listed(&store, 0, 100).await, created);
    assert_eq!(listed(&store, 0, 2).await, created[0..2]);
    assert_eq!(listed(&store, 2, 2).await, created[2..4]);
    assert_eq!(listed(&store, 4, 2).await, created[4..]);
    assert_eq!(listed(&store, 5, 2).await, vec![]);
    // The cursor visits every user once, in order, for any page size.
    for limit in [1, 2, 3, 5, 6] {
        let mut request = PageRequest::first(limit);
        let mut seen = Vec::new();
        loop {
            let page = store.list(&request).await.unwrap();
            seen.extend(page.items);
            match page.next {
                Some(next) => request.start = Start::After(next),
                None => break,
            }
        }
        assert_eq!(seen, created, "pages of {limit}");
    }
    let foreign = PageRequest {
        limit: 2,
        start: Start::After(Cursor::from_text("not a row")),
    };
    assert!(matches!(
        store.list(&foreign).await,
        Err(StoreError::BadCursor(_))
    ));
}

async fn listed(store: &Arc<dyn UserStore>, skip: u32, limit: u32) -> Vec<users::store::User> {
    let request = PageRequest::parse(limit, Some(skip), None).unwrap();
    store.list(&request).await.unwrap().items
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
    assert_eq!(listed(&store, 0, 100).await, vec![bob]);
    let again = store
        .create(&name("Ada"), &email("ada@example.com"), None)
        .await
        .unwrap();
    assert_ne!(again.id, ada.id);
}

async fn answers_ping(store: Arc<dyn UserStore>) {
    store.ping().await.unwrap();
}

async fn credentials_and_roles_are_kept(store: Arc<dyn UserStore>) {
    let ada = store
        .register(
            &name("Ada"),
            &email("ada@example.com"),
            None,
            Some("$argon2id$hash-a"),
            Role::Customer,
        )
        .await
        .unwrap();
    assert_eq!(ada.role, Role::Customer);
    let (found, hash) = store
        .credentials(&email("ADA@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.id, hash.as_deref()),
        (ada.id, Some("$argon2id$hash-a"))
    );
    assert_eq!(
        store
            .credentials(&email("nobody@example.com"))
            .await
            .unwrap(),
        None
    );
    let plain = store
        .create(&name("Bob"), &email("bob@example.com"), None)
        .await
        .unwrap();
    assert_eq!(
        store
            .credentials(&email("bob@example.com"))
            .await
            .unwrap()
            .unwrap()
            .1,
        None
    );

    // Promotion keeps the hash unless a new one is given.
    assert!(store.set_role(ada.id, Role::Admin, None).await.unwrap());
    let (admin, hash) = store
        .credentials(&email("ada@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (admin.role, hash.as_deref()),
        (Role::Admin, Some("$argon2id$hash-a"))
    );
    assert!(
        store
            .set_role(plain.id, Role::Admin, Some("$argon2id$hash-b"))
            .await
            .unwrap()
    );
    assert_eq!(
        store.get(plain.id).await.unwrap().unwrap().role,
        Role::Admin
    );
    assert!(
        !store
            .set_role(Uuid::new_v4(), Role::Admin, None)
            .await
            .unwrap()
    );
}

fn refresh(hash: &str, user: Uuid, expires_at_ms: i64) -> RefreshRecord {
    RefreshRecord {
        token_hash: hash.to_owned(),
        family: Uuid::now_v7(),
        user_id: user,
        expires_at_ms,
    }
}

const NOW: i64 = 1_800_000_000_000;

async fn refresh_tokens_rotate_once_and_a_replay_revokes_the_family(store: Arc<dyn UserStore>) {
    let ada = store
        .create(&name("Ada"), &email("ada@example.com"), None)
        .await
        .unwrap();
    store
        .issue_refresh(&refresh("h1", ada.id, NOW + 60_000))
        .await
        .unwrap();
    let rotated = store
        .use_refresh("h1", &refresh("h2", Uuid::nil(), NOW + 60_000), NOW)
        .await
        .unwrap();
    assert_eq!(rotated, RefreshUse::Rotated(ada.clone()));
    // The new token works once too.
    let again = store
        .use_refresh("h2", &refresh("h3", Uuid::nil(), NOW + 60_000), NOW)
        .await
        .unwrap();
    assert_eq!(again, RefreshUse::Rotated(ada.clone()));
    // h1 presented again: a replay; the whole family (h3 included) is revoked.
    let replay = store
        .use_refresh("h1", &refresh("h4", Uuid::nil(), NOW + 60_000), NOW)
        .await
        .unwrap();
    assert_eq!(replay, RefreshUse::Reused);
    let after = store
        .use_refresh("h3", &refresh("h5", Uuid::nil(), NOW + 60_000), NOW)
        .await
        .unwrap();
    assert_eq!(after, RefreshUse::Invalid);
    // Unknown and expired tokens are invalid.
    assert_eq!(
        store
            .use_refresh("nope", &refresh("h6", Uuid::nil(), NOW), NOW)
            .await
            .unwrap(),
        RefreshUse::Invalid
    );
    store
        .issue_refresh(&refresh("old", ada.id, NOW - 1))
        .await
        .unwrap();
    assert_eq!(
        store
            .use_refresh("old", &refresh("h7", Uuid::nil(), NOW), NOW)
            .await
            .unwrap(),
        RefreshUse::Invalid
    );
}

async fn revoking_a_token_revokes_its_family_and_deleting_a_user_its_tokens(
    store: Arc<dyn UserStore>,
) {
    let ada = store
        .create(&name("Ada"), &email("ada@example.com"), None)
        .await
        .unwrap();
    store
        .issue_refresh(&refresh("a1", ada.id, NOW + 60_000))
        .await
        .unwrap();
    let rotated = store
        .use_refresh("a1", &refresh("a2", Uuid::nil(), NOW + 60_000), NOW)
        .await
        .unwrap();
    assert!(matches!(rotated, RefreshUse::Rotated(_)));
    // Signing out with the first token of the family revokes the current one too.
    assert!(store.revoke_refresh("a1").await.unwrap());
    assert!(!store.revoke_refresh("unknown").await.unwrap());
    assert_eq!(
        store
            .use_refresh("a2", &refresh("a3", Uuid::nil(), NOW + 60_000), NOW)
            .await
            .unwrap(),
        RefreshUse::Invalid
    );
    // A user's tokens go with the user.
    store
        .issue_refresh(&refresh("b1", ada.id, NOW + 60_000))
        .await
        .unwrap();
    assert!(store.delete(ada.id).await.unwrap());
    assert_eq!(
        store
            .use_refresh("b1", &refresh("b2", Uuid::nil(), NOW + 60_000), NOW)
            .await
            .unwrap(),
        RefreshUse::Invalid
    );
}

async fn pruning_drops_only_families_past_their_last_expiry(store: Arc<dyn UserStore>) {
    let ada = store
        .create(&name("Ada"), &email("ada@example.com"), None)
        .await
        .unwrap();
    store
        .issue_refresh(&refresh("gone", ada.id, NOW - 1))
        .await
        .unwrap();
    // A family rotated once: its first token is past, its current one is not.
    store
        .issue_refresh(&refresh("r1", ada.id, NOW + 60_000))
        .await
        .unwrap();
    store
        .use_refresh("r1", &refresh("r2", Uuid::nil(), NOW + 120_000), NOW)
        .await
        .unwrap();
    assert_eq!(store.prune_refresh(NOW).await.unwrap(), 1);
    assert_eq!(
        store.prune_refresh(NOW).await.unwrap(),
        0,
        "nothing left to prune"
    );
    // The live family still works, and still detects a replay of its used token.
    assert!(matches!(
        store
            .use_refresh("r2", &refresh("r3", Uuid::nil(), NOW + 120_000), NOW)
            .await
            .unwrap(),
        RefreshUse::Rotated(_)
    ));
    assert_eq!(
        store
            .use_refresh("r1", &refresh("r4", Uuid::nil(), NOW + 120_000), NOW)
            .await
            .unwrap(),
        RefreshUse::Reused
    );
    // Past every expiry, the whole family goes.
    assert_eq!(store.prune_refresh(NOW + 200_000).await.unwrap(), 3);
}
