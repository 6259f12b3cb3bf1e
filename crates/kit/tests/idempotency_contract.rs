//! The `Idempotency-Key` contract, run unchanged against each place the keys can live: the
//! service's SQLite database, (feature `postgres`) its PostgreSQL schema and (feature
//! `dynamodb`) its DynamoDB table, on the server at `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws
//! starts moto): the PostgreSQL and DynamoDB tests fail, never skip, without their server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::routing::post;
use kit::idempotency::{self, Idempotency};
use tower::ServiceExt as _;

/// A POST route that counts its runs and answers 500 when the body says `fail`; 400 for a
/// body that is not JSON and 403 when it says `forbidden`, without a run.
fn app(idem: Idempotency, runs: Arc<AtomicUsize>) -> Router {
    let handler = move |body: String| {
        let runs = runs.clone();
        async move {
            if serde_json::from_str::<serde_json::Value>(&body).is_err() {
                return (StatusCode::BAD_REQUEST, "not JSON".to_owned());
            }
            if body.contains("forbidden") {
                return (StatusCode::FORBIDDEN, "not yours".to_owned());
            }
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            if body.contains("fail") {
                return (StatusCode::INTERNAL_SERVER_ERROR, "broken".to_owned());
            }
            // Slow enough that concurrent duplicates really overlap.
            tokio::time::sleep(Duration::from_millis(50)).await;
            (StatusCode::CREATED, format!("run {n}"))
        }
    };
    Router::new().route(
        "/things",
        post(handler).layer(middleware::from_fn_with_state(idem, idempotency::guard)),
    )
}

async fn call(app: &Router, key: &str, body: &str) -> (StatusCode, bool, String) {
    let response = app
        .clone()
        .oneshot(
            Request::post("/things")
                .header(idempotency::HEADER, key)
                .header("content-type", "application/json")
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await
        .unwrap();
    let replayed = response
        .headers()
        .contains_key(idempotency::REPLAYED_HEADER);
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, replayed, String::from_utf8(body.to_vec()).unwrap())
}

/// Whether `purge_expired` itself removes expired keys (DynamoDB leaves that to the table's TTL).
#[derive(Clone, Copy, PartialEq)]
enum Purge {
    ByTheService,
    #[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
    ByTheTable,
}

async fn keeps_the_contract(idem: Idempotency, expired: Idempotency, purge: Purge) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(idem.clone(), runs.clone());

    assert_eq!(
        call(&app, "k1", r#"{"a":1}"#).await,
        (StatusCode::CREATED, false, "run 1".into())
    );
    // The same request again, formatted differently: the stored answer, no second run.
    assert_eq!(
        call(&app, "k1", r#"{ "a": 1 }"#).await,
        (StatusCode::CREATED, true, "run 1".into())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The same key for a different request is refused.
    let (status, _, body) = call(&app, "k1", r#"{"a":2}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("idempotency-key-reused"), "{body}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Twenty concurrent requests with one key: one run, twenty identical answers.
    let answers = futures_join_all((0..20).map(|_| {
        let app = app.clone();
        async move { call(&app, "k2", r#"{"b":1}"#).await }
    }))
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert!(
        answers
            .iter()
            .all(|(s, _, b)| *s == StatusCode::CREATED && b == "run 2")
    );
    assert_eq!(
        answers.iter().filter(|(_, replayed, _)| !replayed).count(),
        1
    );

    // A 5xx is not an answer worth keeping: the retry runs again.
    assert_eq!(
        call(&app, "k3", r#"{"fail":1}"#).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        call(&app, "k3", r#"{"fail":1}"#).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);

    // A malformed key is a 400, not a run.
    assert_eq!(call(&app, "bad key", "{}").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 4);

    // Keys stored with a zero time-to-live are purged, and the key then runs afresh (before
    // any purge too: an expired key is as good as absent).
    let expiring = self::app(expired.clone(), runs.clone());
    assert_eq!(call(&expiring, "k4", "{}").await.0, StatusCode::CREATED);
    let purged = expired.purge_expired().await.unwrap();
    match purge {
        Purge::ByTheService => assert!(purged >= 1, "{purged} purged"),
        Purge::ByTheTable => assert_eq!(purged, 0),
    }
    assert_eq!(
        call(&expiring, "k4", "{}").await,
        (StatusCode::CREATED, false, "run 6".into())
    );

    // A request whose client went away mid-handler frees its key at once: the retry runs
    // rather than waiting for the claim to count as abandoned (a minute).
    let gone = tokio::spawn({
        let app = app.clone();
        async move { call(&app, "gone", r#"{"g":1}"#).await }
    });
    tokio::time::sleep(Duration::from_millis(25)).await;
    gone.abort();
    let retried = tokio::time::timeout(Duration::from_secs(10), call(&app, "gone", r#"{"g":1}"#))
        .await
        .expect("the retry is not held up by the request that went away");
    assert_eq!((retried.0, retried.1), (StatusCode::CREATED, false));
}

/// Direct access to where the records live, behind the guard's back.
enum Raw {
    Sqlite(kit::db::Db),
    #[cfg(feature = "postgres")]
    Postgres(kit::pg::Pg),
    #[cfg(feature = "dynamodb")]
    Dynamo(aws_sdk_dynamodb::Client, String),
}

impl Raw {
    /// A finished record as the guard wrote them before fingerprints were hashed: the
    /// canonical request itself.
    async fn insert_legacy(&self, key: &str, request: &str) {
        let (key, request) = (key.to_owned(), request.to_owned());
        let expires = kit::db::now_ms() + 3_600_000;
        match self {
            Raw::Sqlite(db) => db
                .write(move |tx| -> Result<(), kit::db::DbError> {
                    tx.execute(
                        "INSERT INTO idempotency_keys (key, fingerprint, status, content_type, body, created_at, expires_at)
                         VALUES (?1, ?2, 201, 'text/plain', CAST('legacy answer' AS BLOB), 0, ?3)",
                        rusqlite::params![key, request, expires],
                    )?;
                    Ok(())
                })
                .await
                .unwrap(),
            #[cfg(feature = "postgres")]
            Raw::Postgres(pg) => {
                sqlx::query(
                    "INSERT INTO idempotency_keys (key, fingerprint, status, content_type, body, created_at, expires_at)
                     VALUES ($1, $2, 201, 'text/plain', 'legacy answer'::bytea, 0, $3)",
                )
                .bind(key)
                .bind(request)
                .bind(expires)
                .execute(pg.pool())
                .await
                .unwrap();
            }
            #[cfg(feature = "dynamodb")]
            Raw::Dynamo(client, table) => {
                use aws_sdk_dynamodb::types::AttributeValue;
                let n = |v: i64| AttributeValue::N(v.to_string());
                client
                    .put_item()
                    .table_name(table)
                    .item("payment_id", AttributeValue::S(format!("idempotency#{key}")))
                    .item("kind", AttributeValue::S("idempotency".into()))
                    .item("fingerprint", AttributeValue::S(request))
                    .item("claimed_at", n(0))
                    .item("expires_ms", n(expires))
                    .item("purge_at", n(expires / 1000 + 1))
                    .item("status_code", n(201))
                    .item("content_type", AttributeValue::S("text/plain".into()))
                    .item(
                        "body",
                        AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(
                            b"legacy answer".to_vec(),
                        )),
                    )
                    .send()
                    .await
                    .unwrap();
            }
        }
    }

    /// Every stored fingerprint.
    async fn fingerprints(&self) -> Vec<String> {
        match self {
            Raw::Sqlite(db) => db
                .read(|conn| -> Result<Vec<String>, kit::db::DbError> {
                    Ok(conn
                        .prepare("SELECT fingerprint FROM idempotency_keys")?
                        .query_map([], |r| r.get(0))?
                        .collect::<Result<_, _>>()?)
                })
                .await
                .unwrap(),
            #[cfg(feature = "postgres")]
            Raw::Postgres(pg) => sqlx::query_scalar("SELECT fingerprint FROM idempotency_keys")
                .fetch_all(pg.pool())
                .await
                .unwrap(),
            #[cfg(feature = "dynamodb")]
            Raw::Dynamo(client, table) => client
                .scan()
                .table_name(table)
                .consistent_read(true)
                .send()
                .await
                .unwrap()
                .items()
                .iter()
                .filter_map(|item| item.get("fingerprint")?.as_s().ok().cloned())
                .collect(),
        }
    }
}

/// What a record keeps of its request is a hash: never the body (a card number), so a
/// store's tables, files and backups hold no copy of it. Records from before hashing, which
/// held the canonical request, still replay for their retry, and `hash_legacy_fingerprints`
/// turns them into hashes (except on DynamoDB, where the table's TTL removes them).
async fn keeps_only_a_hash(idem: Idempotency, raw: Raw, rewrites_legacy: bool) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(idem.clone(), runs.clone());
    let secret = r#"{"card_number":"4242 4242 4242 4242","order_id":"o-1"}"#;
    assert_eq!(
        call(&app, "card", secret).await,
        (StatusCode::CREATED, false, "run 1".into())
    );
    let legacy = "POST /things\n{\"card_number\":\"4000 0000 0000 0002\"}";
    raw.insert_legacy("anonymous/old", legacy).await;
    assert_eq!(
        call(&app, "old", r#"{ "card_number": "4000 0000 0000 0002" }"#).await,
        (StatusCode::CREATED, true, "legacy answer".into()),
        "an old record replays for the same request"
    );
    assert_eq!(
        call(&app, "old", r#"{"card_number":"4000 0000 0000 0119"}"#)
            .await
            .0,
        StatusCode::UNPROCESSABLE_ENTITY,
        "and refuses another"
    );
    let rewritten = idem.hash_legacy_fingerprints().await.unwrap();
    assert_eq!(rewritten, usize::from(rewrites_legacy));
    assert_eq!(idem.hash_legacy_fingerprints().await.unwrap(), 0, "once");
    let stored = raw.fingerprints().await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    for fingerprint in &stored {
        if fingerprint == legacy && !rewrites_legacy {
            continue;
        }
        assert!(!fingerprint.contains("4242"), "{fingerprint}");
        assert!(!fingerprint.contains("0002"), "{fingerprint}");
        assert!(
            fingerprint.starts_with("sha256:") && fingerprint.len() == 7 + 64,
            "{fingerprint}"
        );
    }
    assert_eq!(
        call(&app, "old", r#"{"card_number":"4000 0000 0000 0002"}"#).await,
        (StatusCode::CREATED, true, "legacy answer".into()),
        "a rewritten record still replays"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // What a key costs is bounded: 1,000 bodies that are not JSON and 50 requests refused
    // for rights, each under a key of its own, leave no record; the refused key is free again.
    for i in 0..1_000 {
        let (status, _, _) = call(&app, &format!("junk-{i}"), "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    for i in 0..50 {
        let (status, _, _) = call(&app, &format!("refused-{i}"), r#"{"forbidden":1}"#).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    assert_eq!(raw.fingerprints().await.len(), 2);
    assert_eq!(
        call(&app, "refused-0", r#"{"fixed":1}"#).await,
        (StatusCode::CREATED, false, "run 2".into())
    );
}

/// `join_all` without a futures dependency in this crate: spawn and await in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

const TTL: Duration = Duration::from_secs(3600);
const LIMIT: usize = 1 << 20;

#[tokio::test]
async fn sqlite_keeps_the_contract() {
    static STEPS: &[kit::db::Step] = &[(1, "idempotency", idempotency::MIGRATION)];
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/svc.db", dir.path().display());
    let db = kit::db::Db::open(&url, &Default::default(), STEPS)
        .await
        .unwrap();
    keeps_the_contract(
        Idempotency::new(db.clone(), TTL, LIMIT),
        Idempotency::new(db, Duration::ZERO, LIMIT),
        Purge::ByTheService,
    )
    .await;
}

#[tokio::test]
async fn sqlite_keeps_only_a_hash() {
    static STEPS: &[kit::db::Step] = &[(1, "idempotency", idempotency::MIGRATION)];
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/svc.db", dir.path().display());
    let db = kit::db::Db::open(&url, &Default::default(), STEPS)
        .await
        .unwrap();
    keeps_only_a_hash(
        Idempotency::new(db.clone(), TTL, LIMIT),
        Raw::Sqlite(db.clone()),
        true,
    )
    .await;
    db.close().await;
    // Closed, the database is checkpointed: the rewritten text is gone from its pages too.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for card in ["4242 4242 4242 4242", "4000 0000 0000 0002"] {
            assert!(
                !bytes.windows(card.len()).any(|w| w == card.as_bytes()),
                "{card} in {}",
                path.display()
            );
        }
    }
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_keeps_the_contract() {
    static STEPS: &[kit::pg::PgStep] = &[(1, "idempotency", idempotency::PG_MIGRATION)];
    let url = kit::pg::test_database_url();
    let pg = kit::pg::Pg::open(
        &url,
        &kit::pg::unique_schema("idem"),
        &Default::default(),
        STEPS,
    )
    .await
    .unwrap_or_else(|e| {
        panic!("PostgreSQL at {url} (TEST_DATABASE_URL): {e}; scripts/test starts one")
    });
    keeps_the_contract(
        Idempotency::on_postgres(pg.clone(), TTL, LIMIT),
        Idempotency::on_postgres(pg.clone(), Duration::ZERO, LIMIT),
        Purge::ByTheService,
    )
    .await;
    pg.drop_schema().await.unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_keeps_only_a_hash() {
    static STEPS: &[kit::pg::PgStep] = &[(1, "idempotency", idempotency::PG_MIGRATION)];
    let url = kit::pg::test_database_url();
    let pg = kit::pg::Pg::open(
        &url,
        &kit::pg::unique_schema("idemhash"),
        &Default::default(),
        STEPS,
    )
    .await
    .unwrap_or_else(|e| {
        panic!("PostgreSQL at {url} (TEST_DATABASE_URL): {e}; scripts/test starts one")
    });
    keeps_only_a_hash(
        Idempotency::on_postgres(pg.clone(), TTL, LIMIT),
        Raw::Postgres(pg.clone()),
        true,
    )
    .await;
    pg.drop_schema().await.unwrap();
}

/// In a table of its own (as a payments table: partition key `payment_id`), deleted afterwards.
#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn dynamodb_keeps_the_contract() {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    let endpoint = std::env::var("TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "TEST_DYNAMODB_ENDPOINT is not set: run scripts/check-aws (it starts \
             moto[server]==5.2.1), or point it at a DynamoDB-compatible server"
        )
    });
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    let table = format!("idempotency-{}", uuid::Uuid::new_v4().simple());
    create_payments_table(&client, &table).await;
    keeps_the_contract(
        Idempotency::on_dynamo(client.clone(), &table, "payment_id", TTL, LIMIT),
        Idempotency::on_dynamo(client.clone(), &table, "payment_id", Duration::ZERO, LIMIT),
        Purge::ByTheTable,
    )
    .await;
    // A table of its own again: `keeps_only_a_hash` reads every record.
    let hashes = format!("{table}-hash");
    create_payments_table(&client, &hashes).await;
    keeps_only_a_hash(
        Idempotency::on_dynamo(client.clone(), &hashes, "payment_id", TTL, LIMIT),
        Raw::Dynamo(client.clone(), hashes.clone()),
        false,
    )
    .await;
    client
        .delete_table()
        .table_name(&hashes)
        .send()
        .await
        .unwrap();
    client
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
}

/// A table keyed by `payment_id`, as the payments service's.
#[cfg(feature = "dynamodb")]
async fn create_payments_table(client: &aws_sdk_dynamodb::Client, table: &str) {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("payment_id")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("payment_id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("DynamoDB at {table}: {e:?}"));
}
