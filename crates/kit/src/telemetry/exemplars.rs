//! Prometheus exemplars: for each bucket of the request-duration histogram, the trace of a
//! recent request that fell in it, written into the OpenMetrics text (the one exposition format
//! with exemplars) that `/metrics` serves when the scraper asks for it, as Prometheus does.
//!
//! Our own: `metrics-exporter-prometheus` renders only the 0.0.4 text format, without
//! exemplars; its text is turned into OpenMetrics here, and the exemplars added to the buckets.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::TraceId;

/// The request-duration histogram (per service, method, route template and status).
pub const REQUEST_DURATION: &str = "http_request_duration_seconds";

/// The buckets of every `*duration_seconds` histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The media type Prometheus asks for first, and what `/metrics` answers with it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An exemplar is replaced at most this often: a fresh trace for every bucket, without taking
/// the trace id of every request.
const REFRESH: Duration = Duration::from_secs(1);

/// The labels of a request histogram: service, method, route template, status.
pub type RequestLabels = [&'static str; 4];

#[derive(Debug, Clone, Copy)]
struct Exemplar {
    trace_id: TraceId,
    seconds: f64,
    at: SystemTime,
}

type Buckets = [Option<Exemplar>; DURATION_BUCKETS.len() + 1];

/// Label sets are a fixed set (interned routes, known statuses), so this map stays small. It
/// is keyed by the labels' addresses, as `server::request_metrics` keys its handles: every
/// label is a `'static` str from that set, and a request need not hash four strings.
type Recent = HashMap<[(usize, usize); 4], (RequestLabels, Buckets)>;

fn recent() -> &'static Mutex<Recent> {
    static RECENT: OnceLock<Mutex<Recent>> = OnceLock::new();
    RECENT.get_or_init(Mutex::default)
}

fn bucket_of(seconds: f64) -> usize {
    DURATION_BUCKETS
        .iter()
        .position(|bound| seconds <= *bound)
        .unwrap_or(DURATION_BUCKETS.len())
}

/// Keeps `trace` (asked for only when the bucket's exemplar is due for renewal, and outside
/// the lock) as the exemplar of the bucket a request of `seconds` falls in.
pub fn record_request(
    labels: RequestLabels,
    seconds: f64,
    trace: impl FnOnce() -> Option<TraceId>,
) {
    let key = labels.map(|label| (label.as_ptr() as usize, label.len()));
    let bucket = bucket_of(seconds);
    let now = SystemTime::now();
    let due = |recent: &Recent| {
        recent
            .get(&key)
            .and_then(|(_, buckets)| buckets[bucket])
            .is_none_or(|kept| now.duration_since(kept.at).unwrap_or_default() >= REFRESH)
    };
    if !due(&recent().lock().unwrap_or_else(PoisonError::into_inner)) {
        return;
    }
    let Some(trace_id) = trace() else {
        return;
    };
    let mut recent = recent().lock().unwrap_or_else(PoisonError::into_inner);
    recent
        .entry(key)
        .or_insert_with(|| (labels, Buckets::default()))
        .1[bucket] = Some(Exemplar {
        trace_id,
        seconds,
        at: now,
    });
}

/// Whether an `Accept` header asks for OpenMetrics (with a non-zero quality).
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        parts
            .next()
            .is_some_and(|media| media.eq_ignore_ascii_case("application/openmetrics-text"))
            && !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

/// The exporter's 0.0.4 text as OpenMetrics 1.0: counters' families named without `_total`
/// (their samples keep it), no blank lines, `# EOF` at the end, and the request-duration
/// buckets with their exemplars.
pub fn openmetrics(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let kept = recent()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let recent: HashMap<[&str; 4], &Buckets> = kept.values().map(|(k, v)| (*k, v)).collect();
    let mut out = String::with_capacity(text.len() + recent.len() * 200);
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let (keyword, rest) = comment.split_once(' ').unwrap_or((comment, ""));
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = counters.contains(&name);
            match (keyword, counter, name.strip_suffix("_total")) {
                ("HELP" | "TYPE", true, Some(family)) => {
                    let _ = writeln!(out, "# {keyword} {family} {tail}");
                }
                // A counter not named `*_total` cannot be an OpenMetrics counter.
                ("TYPE", true, None) => {
                    let _ = writeln!(out, "# TYPE {name} unknown");
                }
                ("HELP" | "TYPE", _, _) => {
                    out.push_str(line);
                    out.push('\n');
                }
                // OpenMetrics has no other comments.
                _ => {}
            }
            continue;
        }
        out.push_str(line);
        if let Some(exemplar) = exemplar_for(line, &recent) {
            let trace_id = exemplar.trace_id;
            let at = exemplar
                .at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let _ = write!(
                out,
                " # {{trace_id=\"{trace_id}\"}} {} {at:.3}",
                exemplar.seconds
            );
        }
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// The exemplar of a request-duration bucket line, if one was kept.
fn exemplar_for(line: &str, recent: &HashMap<[&str; 4], &Buckets>) -> Option<Exemplar> {
    let labels = line
        .strip_prefix(REQUEST_DURATION)?
        .strip_prefix("_bucket{")?;
    let labels = parse_labels(labels)?;
    let value = |key: &str| {
        labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    };
    let bucket = match value("le")? {
        "+Inf" => DURATION_BUCKETS.len(),
        le => {
            let le: f64 = le.parse().ok()?;
            DURATION_BUCKETS
                .iter()
                .position(|bound| (bound - le).abs() < 1e-9)?
        }
    };
    let key = [
        value("service")?,
        value("method")?,
        value("route")?,
        value("status")?,
    ];
    recent.get(&key).and_then(|buckets| buckets[bucket])
}

/// `k="v",k2="v2"}`: the label pairs, values unescaped, up to the closing brace.
fn parse_labels(text: &str) -> Option<Vec<(&str, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        if rest.starts_with('}') {
            return Some(labels);
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim_start_matches(','), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP http_requests_total Requests served.
# TYPE http_requests_total counter
http_requests_total{service=\"orders\",method=\"POST\",route=\"/api/v1/orders/{id}\",status=\"201\"} 3

# TYPE reservations_held gauge
reservations_held 2

# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{service=\"orders\",method=\"POST\",route=\"/api/v1/orders/{id}\",status=\"201\",le=\"0.0005\"} 0
http_request_duration_seconds_bucket{service=\"orders\",method=\"POST\",route=\"/api/v1/orders/{id}\",status=\"201\",le=\"0.001\"} 0
http_request_duration_seconds_bucket{service=\"orders\",method=\"POST\",route=\"/api/v1/orders/{id}\",status=\"201\",le=\"0.0025\"} 2
http_request_duration_seconds_bucket{service=\"orders\",method=\"POST\",route=\"/api/v1/orders/{id}\",status=\"201\",le=\"+Inf\"} 3
http_request_duration_seconds_sum{service=\"orders\",method=\"POST\",route=\"/api/v1/orders/{id}\",status=\"201\"} 20.004
http_request_duration_seconds_count{service=\"orders\",method=\"POST\",route=\"/api/v1/orders/{id}\",status=\"201\"} 3

# TYPE odd counter
odd 1
";

    #[test]
    fn the_text_becomes_openmetrics_with_an_exemplar_per_bucket_that_has_one() {
        let labels = ["orders", "POST", "/api/v1/orders/{id}", "201"];
        let trace = TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128);
        record_request(labels, 0.002, || Some(trace));
        record_request(labels, 20.0, || Some(TraceId::from(7)));
        // Within the refresh interval the exemplar stays, and the trace id is not even asked.
        record_request(labels, 0.0021, || panic!("not due"));
        let om = openmetrics(TEXT);
        let lines: Vec<&str> = om.lines().collect();
        assert_eq!(lines[0], "# HELP http_requests Requests served.");
        assert_eq!(lines[1], "# TYPE http_requests counter");
        assert!(lines[2].starts_with("http_requests_total{"), "{om}");
        assert!(!om.contains("\n\n"), "no blank lines: {om}");
        let bucket = lines.iter().find(|l| l.contains("le=\"0.0025\"")).unwrap();
        assert!(
            bucket.contains("} 2 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.002 "),
            "{bucket}"
        );
        let infinite = lines.iter().find(|l| l.contains("le=\"+Inf\"")).unwrap();
        assert!(
            infinite.contains("# {trace_id=\"00000000000000000000000000000007\"} 20 "),
            "{infinite}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("le=\"0.001\"") && l.contains('#')),
            "no exemplar where no request fell: {om}"
        );
        assert!(om.contains("# TYPE odd unknown\nodd 1\n"), "{om}");
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn openmetrics_is_served_only_when_asked_for() {
        // Prometheus 2.x's scrape header.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn labels_are_unescaped_and_braces_inside_values_do_not_end_them() {
        let labels = parse_labels(r#"route="/a/{id}",why="say \"no\"\\",le="+Inf"} 1"#).unwrap();
        assert_eq!(
            labels,
            vec![
                ("route", "/a/{id}".to_owned()),
                ("why", "say \"no\"\\".to_owned()),
                ("le", "+Inf".to_owned())
            ]
        );
        assert!(parse_labels(r#"route="unterminated"#).is_none());
    }
}
