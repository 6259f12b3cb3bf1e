//! Replay: the same windowing engine and store over a file of order events (the seed's JSON,
//! one per line), for backfills and benchmarks. Lines are parsed on every core; events are
//! applied in large batches, each one transaction, exactly as the stream consumer applies them.

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use bus::event::OrderEvent;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::engine::{Lateness, Windows};
use crate::store::{AnalyticsStore, StoreError};

/// Namespace of event ids derived from a line's content when the event carries none (the
/// seed's events do not): a duplicated line is then deduplicated like a redelivered event.
const LINE_IDS: Uuid = Uuid::from_u128(0x6d65_7263_6174_6f00_0000_0000_0000_0002);
const BATCH: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read or write {0}: {1}")]
    Io(String, std::io::Error),
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open the replay store: {0}")]
    Open(#[from] kit::db::DbError),
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

fn parse_line(number: usize, line: &str) -> Result<OrderEvent, ReplayError> {
    let bad = |reason: String| ReplayError::BadLine {
        line: number,
        reason,
    };
    let mut value: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
    if let Value::Object(map) = &mut value
        && !map.contains_key("event_id")
    {
        let id = Uuid::new_v5(&LINE_IDS, line.as_bytes());
        map.insert("event_id".into(), Value::String(id.to_string()));
        map.entry("currency")
            .or_insert_with(|| Value::String("USD".into()));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
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

/// Replays `input` into a fresh store under `output` and writes `output/windows.jsonl`: every
/// window, since the end of the input closes them all. The watermark moves per batch of
/// lines exactly as it moves per polled batch in the service.
pub async fn replay(
    input: &Path,
    output: &Path,
    windows: Windows,
    lateness: Lateness,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let file =
        std::fs::File::open(input).map_err(|e| ReplayError::Io(input.display().to_string(), e))?;
    std::fs::create_dir_all(output)
        .map_err(|e| ReplayError::Io(output.display().to_string(), e))?;
    let db = output.join("replay.db");
    for stale in ["replay.db", "replay.db-wal", "replay.db-shm"] {
        let _ = std::fs::remove_file(output.join(stale));
    }
    let settings = kit::config::SqliteSettings {
        synchronous: "off".into(),
        ..Default::default()
    };
    let store = AnalyticsStore::open(
        &format!("sqlite://{}", db.display()),
        &settings,
        windows,
        lateness,
    )
    .await?;
    // Streamed in batches, so memory stays flat whatever the file's size.
    let mut reader = std::io::BufReader::new(file).lines();
    let (mut count, mut applied, mut late, mut number) = (0, 0, 0, 0);
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        for line in reader.by_ref() {
            number += 1;
            let line = line.map_err(|e| ReplayError::Io(input.display().to_string(), e))?;
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
        let outcome = store.apply(&parse_all(&borrowed)?).await?;
        applied += outcome.fresh;
        late += outcome.late;
    }
    let all = store
        .windows_between(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC)
        .await?;
    let path = output.join("windows.jsonl");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&path).map_err(|e| ReplayError::Io(path.display().to_string(), e))?,
    );
    for mut window in all.iter().cloned() {
        window.is_final = true;
        let line = serde_json::to_string(&window).map_err(|e| ReplayError::BadLine {
            line: 0,
            reason: e.to_string(),
        })?;
        writeln!(file, "{line}").map_err(|e| ReplayError::Io(path.display().to_string(), e))?;
    }
    file.flush()
        .map_err(|e| ReplayError::Io(path.display().to_string(), e))?;
    store.db().close().await;
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
