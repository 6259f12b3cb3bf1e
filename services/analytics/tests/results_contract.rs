//! The results sink contract ([`ObjectSink`] write, read back, [`merge_objects`]), run unchanged
//! against a `file://` directory always and against `s3://` on an S3-compatible server (moto,
//! at `TEST_S3_ENDPOINT`) with feature `aws`. `scripts/check-aws` starts moto; without it the
//! S3 test fails, it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use analytics::AnalyticsStore;
use analytics::engine::{Lateness, PartialWindow, WindowReport, Windows};
use analytics::results::{Emitter, ObjectSink, merge_objects};
use bus::event::{OrderEvent, OrderEventItem, types};
use chrono::{DateTime, Utc};
use kit::Money;
use uuid::Uuid;

/// Order events over ~6 minutes of event time, slightly out of order, with repeat buyers.
fn events(n: u64) -> Vec<OrderEvent> {
    let start: DateTime<Utc> = "2026-11-24T10:00:00Z".parse().unwrap();
    (0..n)
        .map(|i| {
            let jitter = if i % 7 == 0 { -5_000 } else { 0 };
            let cents = 100 + (i * 7919 % 50_000) as i64;
            OrderEvent {
                event_id: Uuid::from_u128(u128::from(i) + 1),
                event_type: if i % 10 == 9 {
                    types::ORDER_PAID.into()
                } else {
                    types::ORDER_CREATED.into()
                },
                order_id: Uuid::from_u128(u128::from(i) * 31 + 7),
                user_id: Uuid::from_u128(u128::from(i % 97)),
                total_amount: Money::from_cents(cents * 2).unwrap(),
                currency: Some("USD".into()),
                status: "pending".into(),
                items_count: 2,
                created_at: start + chrono::Duration::milliseconds(i as i64 * 900 + jitter),
                occurred_at: None,
                items: vec![OrderEventItem {
                    product_id: Uuid::from_u128(u128::from(i % 13)),
                    quantity: 2,
                    unit_price: Money::from_cents(cents).unwrap(),
                }],
            }
        })
        .collect()
}

/// An instance that consumes `events` in batches of 50 and emits to `sink` after each batch;
/// returns how many final windows it emitted.
async fn run_instance(
    dir: &std::path::Path,
    name: &str,
    sink: &ObjectSink,
    events: &[OrderEvent],
) -> usize {
    let store = AnalyticsStore::open(
        &format!("sqlite://{}/{name}.db", dir.display()),
        &Default::default(),
        Windows::of_secs(60).unwrap(),
        Lateness::of_secs(30).unwrap(),
    )
    .await
    .unwrap();
    let emitter = Emitter {
        store,
        objects: Some(sink.clone()),
        stream: None,
        instance: name.to_owned(),
    };
    let mut emitted = 0;
    for batch in events.chunks(50) {
        emitter.store.apply(batch).await.unwrap();
        emitted += emitter.emit_final().await.unwrap();
    }
    emitted
}

fn reports(partials: &[PartialWindow]) -> Vec<WindowReport> {
    partials.iter().map(|p| p.report(true)).collect()
}

/// What every results sink must do. `sink` is empty.
async fn keeps_the_contract(sink: ObjectSink) {
    let dir = tempfile::tempdir().unwrap();
    assert!(sink.read_all().await.unwrap().is_empty());
    assert!(merge_objects(&sink).await.unwrap().is_empty());

    // The reference: one instance over every event, on a local directory.
    let all = events(400);
    let reference = ObjectSink::local_dir(&dir.path().join("reference")).unwrap();
    let solo_windows = run_instance(dir.path(), "solo", &reference, &all).await;
    assert!(solo_windows >= 5, "{solo_windows} windows");

    // Three instances, each consuming what one key (the order id) maps to, share `sink`.
    let mut emitted = 0;
    for part in 0..3_u128 {
        let mine: Vec<OrderEvent> = all
            .iter()
            .filter(|e| e.order_id.as_u128() % 3 == part)
            .cloned()
            .collect();
        emitted += run_instance(dir.path(), &format!("analytics-{part}"), &sink, &mine).await;
    }
    let written = sink.read_all().await.unwrap();
    assert_eq!(
        written.len(),
        emitted,
        "every emitted window read back once"
    );
    let instances: BTreeSet<&str> = written.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(
        instances,
        BTreeSet::from(["analytics-0", "analytics-1", "analytics-2"])
    );

    // Merged, the three equal the one.
    let one = merge_objects(&reference).await.unwrap();
    let merged = merge_objects(&sink).await.unwrap();
    assert_eq!(one.len(), solo_windows);
    assert_eq!(reports(&merged), reports(&one));

    // Records round-trip exactly, and a repeat overwrites rather than duplicates.
    let solo = reference.read_all().await.unwrap();
    sink.write(&solo).await.unwrap();
    sink.write(&solo).await.unwrap();
    let after = sink.read_all().await.unwrap();
    assert_eq!(
        after.len(),
        emitted + solo.len(),
        "the repeat was not stored twice"
    );
    let back: Vec<_> = after.into_iter().filter(|r| r.instance == "solo").collect();
    assert_eq!(back, solo);
}

#[tokio::test]
async fn file_results_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = url_of_dir(&dir.path().join("results"));
    keeps_the_contract(ObjectSink::from_url(&url).unwrap()).await;
}

fn url_of_dir(dir: &std::path::Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    format!("file://{}", std::fs::canonicalize(dir).unwrap().display())
}

#[cfg(feature = "aws")]
mod s3 {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const BUCKET: &str = "mercato-results";

    /// Creates `bucket` on the server (moto takes unsigned requests; a bucket that exists
    /// already is fine).
    async fn create_bucket(endpoint: &str, bucket: &str) {
        let authority = endpoint.trim_start_matches("http://").trim_end_matches('/');
        let mut conn = tokio::net::TcpStream::connect(authority).await.unwrap();
        let request = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.contains("BucketAlreadyOwnedByYou"),
            "creating bucket {bucket}: {answer}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_results_keep_the_contract() {
        let endpoint = std::env::var("TEST_S3_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "TEST_S3_ENDPOINT (URL of an S3-compatible server) is not set: run \
                 scripts/check-aws, which installs and starts moto (moto[server]==5.2.1)"
            )
        });
        create_bucket(&endpoint, BUCKET).await;
        // A prefix no earlier run used.
        let url = format!("s3://{BUCKET}/run-{}", Uuid::new_v4().simple());
        let options = [
            ("aws_endpoint", endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
            ("aws_region", "us-east-1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        keeps_the_contract(ObjectSink::from_url_with(&url, options).unwrap()).await;
    }
}
