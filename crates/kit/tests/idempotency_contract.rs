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

/// A POST route that counts its runs and answers 500 when the body says `fail`.
fn app(idem: Idempotency, runs: Arc<AtomicUsize>) -> Router {
    let handler = move |body: String| {
        let runs = runs.clone();
        async move {
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

/// In a table of its own (as a payments table: partition key `payment_id`), deleted afterwards.
#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn dynamodb_keeps_the_contract() {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
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
    client
        .create_table()
        .table_name(&table)
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
        .unwrap_or_else(|e| panic!("DynamoDB at {endpoint}: {e:?}"));
    keeps_the_contract(
        Idempotency::on_dynamo(client.clone(), &table, "payment_id", TTL, LIMIT),
        Idempotency::on_dynamo(client.clone(), &table, "payment_id", Duration::ZERO, LIMIT),
        Purge::ByTheTable,
    )
    .await;
    client
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
}
