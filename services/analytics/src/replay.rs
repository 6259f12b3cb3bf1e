//! Replay: the same windowing rules (windows, watermark, lateness, dedup by event id,
//! mergeable partial windows) over a file of order events (one JSON per line, in Mercato's
//! shape or the seed's: [`bus::event::order`]), for backfills and benchmarks. A bounded file
//! needs no crash recovery, so state is held in memory instead of the service's SQLite store:
//! lines are parsed on every core by the decoder the service uses, and folded batch by batch,
//! the watermark moving per batch exactly as it moves per polled batch in the service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use bus::event::{OrderEvent, types};
use chrono::DateTime;
use uuid::Uuid;

use crate::engine::{Lateness, PartialWindow, ProductSales, Windows, add_count, is_final};
use crate::revenue::Revenue;
use crate::sketch::UserSketch;
use crate::store::Applied;

const BATCH: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read or write {0}: {1}")]
    Io(String, std::io::Error),
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    pub lines: usize,
    pub applied: usize,
    /// Events whose window was already final when their batch was applied.
    pub late: usize,
    pub windows: usize,
    pub elapsed: Duration,
}

/// A line in either order-event shape (Mercato's or the seed's), decoded as every consumer
/// decodes it. A line carries no transport id, so one without an event id of its own is
/// identified by its text: a duplicated line counts once, like a redelivered event.
fn parse_line(number: usize, line: &str) -> Result<OrderEvent, ReplayError> {
    OrderEvent::from_json(line).map_err(|e| ReplayError::BadLine {
        line: number,
        reason: e.to_string(),
    })
}

/// One window's state while replaying.
#[derive(Debug, Default)]
struct WindowState {
    orders: i64,
    revenue: Revenue,
    items: i64,
    late: i64,
    event_counts: BTreeMap<String, i64>,
    users: HashSet<Uuid>,
    sketch: UserSketch,
    /// product → (quantity, revenue)
    products: HashMap<Uuid, (i64, Revenue)>,
}

/// Windows folded in memory, with the same rules as [`crate::store::AnalyticsStore::apply`].
#[derive(Debug)]
struct Fold {
    windows: Windows,
    lateness: Lateness,
    seen: HashSet<Uuid>,
    max_event_ms: Option<i64>,
    state: BTreeMap<i64, WindowState>,
}

impl Fold {
    fn new(windows: Windows, lateness: Lateness) -> Fold {
        Fold {
            windows,
            lateness,
            seen: HashSet::new(),
            max_event_ms: None,
            state: BTreeMap::new(),
        }
    }

    fn apply(&mut self, events: &[OrderEvent]) -> Applied {
        let watermark = self.lateness.watermark(self.max_event_ms);
        let mut applied = Applied::default();
        for e in events {
            if !self.seen.insert(e.event_id) {
                continue;
            }
            applied.fresh += 1;
            let at = e.created_at.timestamp_millis();
            self.max_event_ms = Some(self.max_event_ms.map_or(at, |m| m.max(at)));
            let start = self.windows.start_of(e.created_at);
            let window = self.state.entry(start).or_default();
            if is_final(start + self.windows.size_ms(), watermark) {
                applied.late += 1;
                window.late = add_count(window.late, 1);
                continue;
            }
            let kind = window.event_counts.entry(e.event_type.clone()).or_insert(0);
            *kind = add_count(*kind, 1);
            if e.event_type != types::ORDER_CREATED {
                continue;
            }
            // The same sums as the store's: 128-bit revenue, saturating counts.
            window.orders = add_count(window.orders, 1);
            window.revenue = window.revenue.plus(e.total_amount.into());
            window.items = add_count(window.items, e.items_count);
            if window.users.insert(e.user_id) {
                window.sketch.insert(e.user_id);
            }
            for item in &e.items {
                let p = window
                    .products
                    .entry(item.product_id)
                    .or_insert((0, Revenue::ZERO));
                p.0 = add_count(p.0, item.quantity);
                p.1 = p.1.plus(Revenue::of_line(item.unit_price, item.quantity));
            }
        }
        applied
    }

    fn partials(&self) -> Result<Vec<PartialWindow>, ReplayError> {
        let overflow = |what: &str| ReplayError::BadLine {
            line: 0,
            reason: format!("{what} out of range"),
        };
        self.state
            .iter()
            .map(|(start, w)| {
                let window_start =
                    DateTime::from_timestamp_millis(*start).ok_or_else(|| overflow("a window"))?;
                let mut products = w
                    .products
                    .iter()
                    .map(|(id, (quantity, revenue))| ProductSales {
                        product_id: id.to_string(),
                        quantity: *quantity,
                        revenue: *revenue,
                    })
                    .collect::<Vec<_>>();
                products.sort_by(|a, b| a.product_id.cmp(&b.product_id));
                Ok(PartialWindow {
                    window_start,
                    window_end: window_start
                        + chrono::Duration::milliseconds(self.windows.size_ms()),
                    order_count: w.orders,
                    total_revenue: w.revenue,
                    items_sold: w.items,
                    late_events: w.late,
                    event_counts: w.event_counts.clone(),
                    products,
                    users: w.users.iter().copied().collect(),
                    users_sketch: w.sketch.to_hex(),
                })
            })
            .collect()
    }
}

/// Parses `lines` on all cores, keeping their order.
fn parse_all(lines: &[(usize, &str)]) -> Result<Vec<OrderEvent>, ReplayError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = lines.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = lines
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(n, l)| parse_line(*n, l))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut events = Vec::with_capacity(lines.len());
        for handle in handles {
            match handle.join() {
                Ok(part) => events.extend(part?),
                Err(_) => {
                    return Err(ReplayError::BadLine {
                        line: 0,
                        reason: "a parser thread panicked".into(),
                    });
                }
            }
        }
        Ok(events)
    })
}

/// Replays `input` and writes `output/windows.jsonl`: every window, since the end of the
/// input closes them all.
pub async fn replay(
    input: &Path,
    output: &Path,
    windows: Windows,
    lateness: Lateness,
) -> Result<ReplayReport, ReplayError> {
    let (input, output) = (input.to_owned(), output.to_owned());
    tokio::task::spawn_blocking(move || replay_blocking(&input, &output, windows, lateness))
        .await
        .map_err(|e| ReplayError::BadLine {
            line: 0,
            reason: e.to_string(),
        })?
}

fn replay_blocking(
    input: &Path,
    output: &Path,
    windows: Windows,
    lateness: Lateness,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let io = |path: &Path| {
        let shown = path.display().to_string();
        move |e| ReplayError::Io(shown, e)
    };
    let file = std::fs::File::open(input).map_err(io(input))?;
    std::fs::create_dir_all(output).map_err(io(output))?;
    let mut fold = Fold::new(windows, lateness);
    // Streamed in batches, so memory stays flat whatever the file's size.
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file).lines();
    let (mut count, mut applied, mut late, mut number) = (0, 0, 0, 0);
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        for line in reader.by_ref() {
            number += 1;
            let line = line.map_err(io(input))?;
            if !line.trim().is_empty() {
                batch.push((number, line));
            }
            if batch.len() == BATCH {
                break;
            }
        }
        if batch.is_empty() {
            break;
        }
        count += batch.len();
        let borrowed: Vec<(usize, &str)> = batch.iter().map(|(n, l)| (*n, l.trim())).collect();
        let outcome = fold.apply(&parse_all(&borrowed)?);
        applied += outcome.fresh;
        late += outcome.late;
    }
    let all = fold.partials()?;
    let path = output.join("windows.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io(&path))?);
    for window in &all {
        let line =
            serde_json::to_string(&window.report(true)).map_err(|e| ReplayError::BadLine {
                line: 0,
                reason: e.to_string(),
            })?;
        writeln!(file, "{line}").map_err(io(&path))?;
    }
    file.flush().map_err(io(&path))?;
    Ok(ReplayReport {
        lines: count,
        applied,
        late,
        windows: all.len(),
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AnalyticsStore;
    use bus::event::OrderEventItem;
    use chrono::Utc;
    use kit::Money;
    use serde_json::Value;

    /// The in-memory fold and the service's SQLite store must agree on everything, late
    /// events, repeats and other event types included.
    #[tokio::test]
    async fn the_fold_and_the_service_store_compute_the_same_windows() {
        let start: DateTime<Utc> = "2026-11-24T10:00:00Z".parse().unwrap();
        let events: Vec<OrderEvent> = (0..900_u64)
            .map(|i| {
                // Mostly in order, some 20 s early, and every 50th from two minutes back (late).
                let offset = i as i64 * 700
                    - if i % 9 == 0 { 20_000 } else { 0 }
                    - if i % 50 == 49 { 120_000 } else { 0 };
                let cents = 100 + (i * 7919 % 9_000) as i64;
                OrderEvent {
                    event_id: Uuid::from_u128(u128::from(i % 850) + 1),
                    event_type: if i % 8 == 0 {
                        types::ORDER_CANCELLED.into()
                    } else {
                        types::ORDER_CREATED.into()
                    },
                    order_id: Uuid::new_v4(),
                    user_id: Uuid::from_u128(u128::from(i % 37)),
                    total_amount: Money::from_cents(cents * 3).unwrap(),
                    currency: Some("USD".into()),
                    status: "pending".into(),
                    items_count: 3,
                    created_at: start + chrono::Duration::milliseconds(offset),
                    occurred_at: None,
                    items: vec![OrderEventItem {
                        product_id: Uuid::from_u128(u128::from(i % 5)),
                        quantity: 3,
                        unit_price: Money::from_cents(cents).unwrap(),
                    }],
                }
            })
            .collect();
        let (windows, lateness) = (
            Windows::of_secs(60).unwrap(),
            Lateness::of_secs(30).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let store = AnalyticsStore::open(
            &format!("sqlite://{}/s.db", dir.path().display()),
            &Default::default(),
            windows,
            lateness,
        )
        .await
        .unwrap();
        let mut fold = Fold::new(windows, lateness);
        let (mut from_store, mut from_fold) = (Applied::default(), Applied::default());
        for batch in events.chunks(64) {
            let a = store.apply(batch).await.unwrap();
            let lines: Vec<String> = batch
                .iter()
                .map(|e| serde_json::to_string(e).unwrap())
                .collect();
            let parsed: Vec<OrderEvent> = lines
                .iter()
                .enumerate()
                .map(|(n, l)| parse_line(n, l).unwrap())
                .collect();
            let b = fold.apply(&parsed);
            from_store.fresh += a.fresh;
            from_store.late += a.late;
            from_fold.fresh += b.fresh;
            from_fold.late += b.late;
        }
        assert_eq!(from_fold, from_store);
        assert!(
            from_fold.late > 5,
            "the data has late events: {from_fold:?}"
        );
        assert_eq!(from_fold.fresh, 850, "repeated ids count once");
        let stored = store
            .partials_between(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC)
            .await
            .unwrap();
        assert_eq!(fold.partials().unwrap(), stored);
    }

    #[tokio::test]
    async fn replays_seed_events_into_windows_with_duplicates_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("events.jsonl");
        let seed = |user: &str, total: &str, at: &str| {
            format!(
                r#"{{"order_id":"{}","user_id":"{user}","total_amount":{total},"status":"pending","items_count":1,"event_type":"order.created","created_at":"{at}","items":[]}}"#,
                Uuid::new_v4()
            )
        };
        let u1 = Uuid::new_v4().to_string();
        let u2 = Uuid::new_v4().to_string();
        let a = seed(&u1, "10.00", "2026-11-24T10:00:05Z");
        let lines = [
            a.clone(),
            a,
            seed(&u2, "0.01", "2026-11-24T10:00:59.999Z"),
            seed(&u1, "5.50", "2026-11-24T10:01:00Z"),
        ];
        std::fs::write(&input, lines.join("\n")).unwrap();
        let out = dir.path().join("out");
        let report = replay(
            &input,
            &out,
            Windows::of_secs(60).unwrap(),
            Lateness::of_secs(30).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(
            (report.lines, report.applied, report.late, report.windows),
            (4, 3, 0, 2)
        );
        let written = std::fs::read_to_string(out.join("windows.jsonl")).unwrap();
        let windows: Vec<Value> = written
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(windows[0]["order_count"], 2);
        assert_eq!(windows[0]["unique_users"], 2);
        assert!(written.contains(r#""total_revenue":10.01"#), "{written}");
        assert!(
            written.contains(r#""total_revenue":5.50"#),
            "exact, two decimals: {written}"
        );
    }

    #[tokio::test]
    async fn a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("events.jsonl");
        std::fs::write(&input, "{}\n").unwrap();
        let err = replay(
            &input,
            &dir.path().join("o"),
            Windows::of_secs(60).unwrap(),
            Lateness::of_secs(30).unwrap(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ReplayError::BadLine { line: 1, .. }), "{err}");
    }
}
