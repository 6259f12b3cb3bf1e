//! Final windows leave the service here: as records on the `analytics-results` stream (the
//! seed's fields) and as JSON lines in an object store (`file://`, `s3://`, `gs://`),
//! partitioned by date. Each record carries the instance's mergeable partial window, so the
//! outputs of N instances in one consumer group merge ([`merge_objects`]) into exactly what one
//! instance would have written.
//!
//! Delivery is at least once: a window is marked emitted only after every sink took it. A
//! repeat after a crash carries the same event id and overwrites the same object, and mergers
//! keep one record per (instance, window).

use std::collections::BTreeMap;
use std::sync::Arc;

use bus::{Event, Stream};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::engine::{MergeError, PartialWindow, ProductSales, Windows, merge_partials};
use crate::revenue::Revenue;
use crate::store::{AnalyticsStore, StoreError};

pub const RESULTS_TOPIC: &str = "analytics-results";
pub const RESULT_EVENT_TYPE: &str = "analytics.window.final";
/// Namespace of result event ids: one id per (instance, window), stable across repeats.
const RESULT_IDS: Uuid = Uuid::from_u128(0x6d65_7263_6174_6f00_0000_0000_0000_0003);
/// Final windows handed to the sinks per round.
const EMIT_BATCH: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("results url `{0}` is not usable: {1}")]
    Url(String, String),
    #[error("object store: {0}")]
    Objects(#[from] object_store::Error),
    #[error("publishing results: {0}")]
    Stream(#[from] bus::BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("result object {path} line {line}: {reason}")]
    BadRecord {
        path: String,
        line: usize,
        reason: String,
    },
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error("encoding a result: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One final window as published: the seed's fields first, then Mercato's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultRecord {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub order_count: i64,
    pub unique_users: i64,
    pub total_revenue: Revenue,
    pub avg_order_value: Revenue,
    pub processed_at: DateTime<Utc>,
    pub metric_type: String,
    pub window_type: String,
    pub items_sold: i64,
    pub late_events: i64,
    pub unique_users_estimate: i64,
    pub top_products: Vec<ProductSales>,
    pub event_counts: BTreeMap<String, i64>,
    /// Which instance computed this (partial) window.
    pub instance: String,
    /// The state to merge with other instances' records of the same window.
    pub partial: PartialWindow,
}

impl ResultRecord {
    pub fn new(partial: PartialWindow, windows: Windows, instance: &str) -> ResultRecord {
        let r = partial.report(true);
        ResultRecord {
            window_start: r.window_start,
            window_end: r.window_end,
            order_count: r.order_count,
            unique_users: r.unique_users,
            total_revenue: r.total_revenue,
            avg_order_value: r.avg_order_value,
            processed_at: Utc::now(),
            metric_type: "order_metrics".into(),
            window_type: windows.label(),
            items_sold: r.items_sold,
            late_events: r.late_events,
            unique_users_estimate: r.unique_users_estimate,
            top_products: r.top_products,
            event_counts: r.event_counts,
            instance: instance.to_owned(),
            partial,
        }
    }
}

/// JSON lines in an object store under a prefix, one object per emission round and date:
/// `date=YYYY-MM-DD/<instance>-<first window start ms>.jsonl`.
#[derive(Clone)]
pub struct ObjectSink {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

impl std::fmt::Debug for ObjectSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectSink({}, {})", self.store, self.prefix)
    }
}

impl ObjectSink {
    /// `file:///abs/dir`, `s3://bucket/prefix` (feature `aws`), `gs://bucket/prefix` (feature
    /// `gcp`); cloud credentials and options come from the usual environment variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true` for an
    /// S3-compatible server, `GOOGLE_SERVICE_ACCOUNT`, ...).
    pub fn from_url(url: &str) -> Result<ObjectSink, ResultsError> {
        Self::from_url_with(url, std::iter::empty::<(String, String)>())
    }

    /// Like [`Self::from_url`], with `options` (object_store's keys, such as `aws_endpoint`
    /// or `aws_allow_http`) taking precedence over the environment's.
    pub fn from_url_with(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ObjectSink, ResultsError> {
        let parsed =
            url::Url::parse(url).map_err(|e| ResultsError::Url(url.into(), e.to_string()))?;
        if parsed.scheme() == "file" {
            let dir = parsed
                .to_file_path()
                .map_err(|()| ResultsError::Url(url.into(), "not an absolute path".into()))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| ResultsError::Url(url.into(), e.to_string()))?;
        }
        // Later keys win: the explicit options override the environment.
        let options = std::env::vars()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .chain(options);
        let (store, prefix) = object_store::parse_url_opts(&parsed, options)
            .map_err(|e| ResultsError::Url(url.into(), e.to_string()))?;
        Ok(ObjectSink {
            store: Arc::from(store),
            prefix,
        })
    }

    /// A directory on this machine, created when missing.
    pub fn local_dir(dir: &std::path::Path) -> Result<ObjectSink, ResultsError> {
        let shown = dir.display().to_string();
        std::fs::create_dir_all(dir)
            .map_err(|e| ResultsError::Url(shown.clone(), e.to_string()))?;
        let absolute = std::fs::canonicalize(dir)
            .map_err(|e| ResultsError::Url(shown.clone(), e.to_string()))?;
        let url = url::Url::from_directory_path(&absolute)
            .map_err(|()| ResultsError::Url(shown, "not an absolute path".into()))?;
        ObjectSink::from_url(url.as_str())
    }

    /// Writes `records` grouped by their window's date. Object names depend only on the
    /// instance and the windows, so a repeat overwrites rather than duplicates.
    pub async fn write(&self, records: &[ResultRecord]) -> Result<(), ResultsError> {
        let mut by_date: BTreeMap<String, Vec<&ResultRecord>> = BTreeMap::new();
        for r in records {
            by_date
                .entry(r.window_start.format("%Y-%m-%d").to_string())
                .or_default()
                .push(r);
        }
        for (date, group) in by_date {
            let Some(first) = group.first() else { continue };
            let mut body = Vec::new();
            for r in &group {
                serde_json::to_writer(&mut body, r)?;
                body.push(b'\n');
            }
            let name = format!(
                "{}-{}.jsonl",
                first.instance,
                first.window_start.timestamp_millis()
            );
            let path = self.prefix.clone().join(format!("date={date}")).join(name);
            self.store.put(&path, PutPayload::from(body)).await?;
        }
        Ok(())
    }

    /// Every record under the prefix, in object-name order.
    pub async fn read_all(&self) -> Result<Vec<ResultRecord>, ResultsError> {
        let mut objects: Vec<Path> = self
            .store
            .list(Some(&self.prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?;
        objects.sort();
        let mut records = Vec::new();
        for path in objects {
            if !path.as_ref().ends_with(".jsonl") {
                continue;
            }
            let bytes = self.store.get(&path).await?.bytes().await?;
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                records.push(serde_json::from_slice(line).map_err(|e| {
                    ResultsError::BadRecord {
                        path: path.to_string(),
                        line: i + 1,
                        reason: e.to_string(),
                    }
                })?);
            }
        }
        Ok(records)
    }
}

/// Merges result records from any number of instances: one record per (instance, window) is
/// kept (the latest processed), then the partials of each window are merged.
pub fn merge_records(
    records: impl IntoIterator<Item = ResultRecord>,
) -> Result<Vec<PartialWindow>, MergeError> {
    let mut latest: BTreeMap<(String, DateTime<Utc>), ResultRecord> = BTreeMap::new();
    for r in records {
        let key = (r.instance.clone(), r.window_start);
        match latest.get(&key) {
            Some(kept) if kept.processed_at >= r.processed_at => {}
            _ => {
                latest.insert(key, r);
            }
        }
    }
    merge_partials(latest.into_values().map(|r| r.partial))
}

/// Reads every instance's results under `sink` and merges them per window.
pub async fn merge_objects(sink: &ObjectSink) -> Result<Vec<PartialWindow>, ResultsError> {
    Ok(merge_records(sink.read_all().await?)?)
}

/// Hands final windows to the sinks and marks them emitted.
#[derive(Clone)]
pub struct Emitter {
    pub store: AnalyticsStore,
    pub objects: Option<ObjectSink>,
    pub stream: Option<Arc<dyn Stream>>,
    pub instance: String,
}

impl Emitter {
    /// Emits every final window not emitted yet; returns how many.
    pub async fn emit_final(&self) -> Result<usize, ResultsError> {
        let mut total = 0;
        loop {
            let partials = self.store.unemitted_final(EMIT_BATCH).await?;
            if partials.is_empty() {
                return Ok(total);
            }
            let starts: Vec<DateTime<Utc>> = partials.iter().map(|p| p.window_start).collect();
            let windows = self.store.windows();
            let records: Vec<ResultRecord> = partials
                .into_iter()
                .map(|p| ResultRecord::new(p, windows, &self.instance))
                .collect();
            if let Some(objects) = &self.objects {
                objects.write(&records).await?;
            }
            if let Some(stream) = &self.stream {
                let events = records
                    .iter()
                    .map(|r| {
                        let key = r.window_start.to_rfc3339();
                        let id =
                            Uuid::new_v5(&RESULT_IDS, format!("{}/{}", r.instance, key).as_bytes());
                        Event::new(id, RESULT_EVENT_TYPE, "mercato/analytics", key, r)
                            .map(|e| e.to_record())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                stream.publish(RESULTS_TOPIC, &events).await?;
            }
            total += starts.len();
            metrics::counter!("analytics_windows_emitted_total").increment(starts.len() as u64);
            self.store.mark_emitted(starts).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Lateness, WindowReport};
    use bus::embedded::{EmbeddedBus, EmbeddedOptions};
    use bus::event::{OrderEvent, OrderEventItem, types};
    use kit::Money;
    use std::time::Duration;

    /// Order events over ~6 minutes of event time, slightly out of order, with repeat buyers.
    fn events(n: u64) -> Vec<OrderEvent> {
        let start = DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
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

    async fn store(dir: &std::path::Path, name: &str) -> AnalyticsStore {
        AnalyticsStore::open(
            &format!("sqlite://{}/{name}.db", dir.display()),
            &Default::default(),
            Windows::of_secs(60).unwrap(),
            Lateness::of_secs(30).unwrap(),
        )
        .await
        .unwrap()
    }

    /// Applies `events` in batches of 50 (as a consumer polls) and emits after each batch.
    async fn consume(emitter: &Emitter, events: &[OrderEvent]) {
        for batch in events.chunks(50) {
            emitter.store.apply(batch).await.unwrap();
            emitter.emit_final().await.unwrap();
        }
    }

    fn reports(partials: &[PartialWindow]) -> Vec<WindowReport> {
        partials.iter().map(|p| p.report(true)).collect()
    }

    #[tokio::test]
    async fn three_instances_merge_into_what_one_instance_computes() {
        let dir = tempfile::tempdir().unwrap();
        let all = events(400);

        let single_sink = ObjectSink::local_dir(&dir.path().join("single")).unwrap();
        let single = Emitter {
            store: store(dir.path(), "single").await,
            objects: Some(single_sink.clone()),
            stream: None,
            instance: "solo".into(),
        };
        consume(&single, &all).await;

        // Three instances, each consuming the partitions one key (the order id) maps to.
        let shared = ObjectSink::local_dir(&dir.path().join("scaled")).unwrap();
        for part in 0..3_u128 {
            let instance = Emitter {
                store: store(dir.path(), &format!("i{part}")).await,
                objects: Some(shared.clone()),
                stream: None,
                instance: format!("analytics-{part}"),
            };
            let mine: Vec<OrderEvent> = all
                .iter()
                .filter(|e| e.order_id.as_u128() % 3 == part)
                .cloned()
                .collect();
            consume(&instance, &mine).await;
        }

        let one = merge_objects(&single_sink).await.unwrap();
        let merged = merge_objects(&shared).await.unwrap();
        assert!(one.len() >= 5, "{} windows", one.len());
        assert_eq!(reports(&merged), reports(&one));
        let users: i64 = reports(&one).iter().map(|r| r.unique_users).max().unwrap();
        assert!(users > 50, "windows hold many users: {users}");
        // Objects are partitioned by date.
        let listed = std::fs::read_dir(dir.path().join("scaled/date=2026-11-24"))
            .unwrap()
            .count();
        assert!(listed >= 3, "{listed} objects");
    }

    #[tokio::test]
    async fn final_windows_reach_the_results_stream_once_with_the_seed_fields() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(
            &format!("sqlite://{}/bus.db", dir.path().display()),
            &Default::default(),
            EmbeddedOptions::default(),
        )
        .await
        .unwrap();
        let stream: Arc<dyn Stream> = Arc::new(bus);
        let emitter = Emitter {
            store: store(dir.path(), "a").await,
            objects: None,
            stream: Some(stream.clone()),
            instance: "a".into(),
        };
        let all = events(200);
        consume(&emitter, &all).await;
        // A second emission round finds nothing new to send.
        assert_eq!(emitter.emit_final().await.unwrap(), 0);

        let mut consumer = stream.subscribe(RESULTS_TOPIC, "test").await.unwrap();
        let got = consumer
            .poll(1_000, Duration::from_millis(200))
            .await
            .unwrap();
        let finals = emitter
            .store
            .partials_between(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC)
            .await
            .unwrap();
        let watermark = emitter.store.watermark().await.unwrap().unwrap();
        let expected = finals
            .iter()
            .filter(|p| p.window_end.timestamp_millis() <= watermark)
            .count();
        assert_eq!(got.len(), expected);
        assert!(expected < finals.len(), "the last window is still open");
        let first: serde_json::Value = serde_json::from_slice(&got[0].record.payload).unwrap();
        for field in [
            "window_start",
            "window_end",
            "order_count",
            "unique_users",
            "total_revenue",
            "avg_order_value",
            "processed_at",
            "metric_type",
            "window_type",
        ] {
            assert!(first.get(field).is_some(), "{field} missing: {first}");
        }
        assert_eq!(first["metric_type"], "order_metrics");
        assert_eq!(first["window_type"], "tumbling_1m");
        let event = bus::Event::from_parts(&got[0].record.headers, &got[0].record.payload).unwrap();
        assert_eq!(event.event_type, RESULT_EVENT_TYPE);
    }

    #[tokio::test]
    async fn a_bad_results_url_or_record_is_named() {
        assert!(matches!(
            ObjectSink::from_url("nope"),
            Err(ResultsError::Url(..))
        ));
        assert!(matches!(
            ObjectSink::from_url("ftp://x/y"),
            Err(ResultsError::Url(..))
        ));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("date=2026-11-24")).unwrap();
        std::fs::write(dir.path().join("date=2026-11-24/x.jsonl"), "{}\n").unwrap();
        let sink = ObjectSink::local_dir(dir.path()).unwrap();
        let err = sink.read_all().await.unwrap_err();
        assert!(
            matches!(err, ResultsError::BadRecord { line: 1, .. }),
            "{err}"
        );
    }
}
