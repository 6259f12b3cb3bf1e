//! The run's report: per step requests, failures by kind and latency percentiles; a timeline
//! per second; the faults switched on and off. Written as text (standard output), JSON, and a
//! self-contained HTML page with latency and throughput charts (inline SVG, no script).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::run::{FaultEvent, Finished, PipelineSample};
use crate::stats::{CREATE_ORDER, quantile_ms};

#[derive(Debug, Serialize)]
pub struct StepReport {
    pub step: String,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct SecondReport {
    pub second: usize,
    pub requests: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub create_order_p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub run_id: String,
    pub target: String,
    pub model: String,
    pub duration_s: f64,
    pub requests: u64,
    pub failed: u64,
    pub per_second: f64,
    pub journeys: BTreeMap<String, u64>,
    pub journeys_skipped: BTreeMap<String, u64>,
    pub arrivals_dropped: u64,
    pub unfinished: usize,
    pub orders_accepted: usize,
    pub steps: Vec<StepReport>,
    pub timeline: Vec<SecondReport>,
    pub faults: Vec<FaultEvent>,
    /// The outbox backlog and queue depth each second (when `--metrics` was given).
    pub pipeline: Vec<PipelineSample>,
    /// The outbox backlog's peak, and when it fell back under a tenth of it (recovered).
    pub outbox_peak: Option<PipelineSample>,
    pub outbox_recovered_at: Option<f64>,
}

impl Report {
    pub fn new(finished: &Finished, model: String) -> Report {
        let stats = &finished.stats;
        let seconds = finished.duration.as_secs_f64().max(0.001);
        let steps: Vec<StepReport> = stats
            .steps
            .iter()
            .map(|(name, s)| {
                let failed: u64 = s.failures.values().sum();
                StepReport {
                    step: (*name).to_owned(),
                    requests: s.requests(),
                    ok: s.ok,
                    failed,
                    failures: s.failures.clone(),
                    per_second: s.requests() as f64 / seconds,
                    p50_ms: quantile_ms(&s.latency, 0.5),
                    p90_ms: quantile_ms(&s.latency, 0.9),
                    p99_ms: quantile_ms(&s.latency, 0.99),
                    p999_ms: quantile_ms(&s.latency, 0.999),
                    max_ms: quantile_ms(&s.latency, 1.0),
                }
            })
            .collect();
        let requests = steps.iter().map(|s| s.requests).sum();
        let failed = steps.iter().map(|s| s.failed).sum();
        let timeline = stats
            .seconds
            .iter()
            .enumerate()
            .map(|(i, s)| SecondReport {
                second: i,
                requests: s.requests,
                failed: s.failures,
                p50_ms: quantile_ms(&s.latency, 0.5),
                p99_ms: quantile_ms(&s.latency, 0.99),
                create_order_p99_ms: quantile_ms(&s.orders, 0.99),
            })
            .collect();
        Report {
            run_id: finished.ledger.run_id.clone(),
            target: finished.ledger.target.clone(),
            model,
            duration_s: seconds,
            requests,
            failed,
            per_second: requests as f64 / seconds,
            journeys: named(&stats.journeys_started),
            journeys_skipped: named(&stats.journeys_skipped),
            arrivals_dropped: stats.arrivals_dropped,
            unfinished: finished.unfinished,
            orders_accepted: finished.ledger.accepted_orders.len(),
            steps,
            timeline,
            faults: finished.faults.clone(),
            pipeline: finished.pipeline.clone(),
            outbox_peak: None,
            outbox_recovered_at: None,
        }
        .with_recovery()
    }

    /// Finds the backlog's peak and the first sample after it under a tenth of it (the gauges
    /// are sampled, so a quiet pipeline still shows the few rows in flight at that moment).
    fn with_recovery(mut self) -> Report {
        let peak = self
            .pipeline
            .iter()
            .filter(|p| p.outbox_backlog > 0.0)
            .max_by(|a, b| a.outbox_backlog.total_cmp(&b.outbox_backlog))
            .cloned();
        if let Some(peak) = &peak {
            self.outbox_recovered_at = self
                .pipeline
                .iter()
                .find(|p| p.at > peak.at && p.outbox_backlog <= peak.outbox_backlog / 10.0)
                .map(|p| p.at);
        }
        self.outbox_peak = peak;
        self
    }

    /// The create-order step's p99, the figure the benchmarks quote.
    pub fn create_order_p99_ms(&self) -> Option<f64> {
        self.steps
            .iter()
            .find(|s| s.step == CREATE_ORDER)
            .map(|s| s.p99_ms)
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "load run {} against {}: {}, {:.1} s",
            self.run_id, self.target, self.model, self.duration_s
        );
        let _ = writeln!(
            out,
            "{} requests ({:.1}/s), {} failed; {} orders accepted; journeys: {}",
            self.requests,
            self.per_second,
            self.failed,
            self.orders_accepted,
            self.journeys
                .iter()
                .map(|(j, n)| format!("{j} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if self.arrivals_dropped > 0 || self.unfinished > 0 {
            let _ = writeln!(
                out,
                "client saturated: {} arrivals not started, {} journeys cut off at the end",
                self.arrivals_dropped, self.unfinished
            );
        }
        let _ = writeln!(
            out,
            "\n{:<28} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "step",
            "requests",
            "failed",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        );
        for s in &self.steps {
            let _ = writeln!(
                out,
                "{:<28} {:>8} {:>8} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.step,
                s.requests,
                s.failed,
                s.per_second,
                s.p50_ms,
                s.p90_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms
            );
        }
        let failing: Vec<_> = self.steps.iter().filter(|s| s.failed > 0).collect();
        if !failing.is_empty() {
            let _ = writeln!(out, "\nfailures by kind:");
            for s in failing {
                for (kind, n) in &s.failures {
                    let _ = writeln!(out, "  {:<28} {kind}: {n}", s.step);
                }
            }
        }
        if let Some(peak) = &self.outbox_peak {
            let recovered = self
                .outbox_recovered_at
                .map_or("still above a tenth of it at the end".to_owned(), |at| {
                    format!("back under a tenth of it at {at:.0} s")
                });
            let _ = writeln!(
                out,
                "\noutbox backlog: peak {:.0} events at {:.0} s, {recovered}",
                peak.outbox_backlog, peak.at
            );
        }
        if !self.faults.is_empty() {
            let _ = writeln!(out, "\nfaults:");
            for f in &self.faults {
                let params = serde_json::Value::Object(f.params.clone());
                let _ = match &f.refused {
                    None => writeln!(out, "  {:>6.1}s {} {} {params}", f.at, f.name, f.action),
                    Some(why) => writeln!(
                        out,
                        "  {:>6.1}s {} {} REFUSED: {why}",
                        f.at, f.name, f.action
                    ),
                };
            }
        }
        out
    }

    pub fn html(&self) -> String {
        let mut page = String::new();
        let _ = write!(
            page,
            r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Load run {run}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2rem;color:#222}}table{{border-collapse:collapse}}td,th{{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:right}}td:first-child,th:first-child{{text-align:left}}.fault{{fill:#f4c7c3;opacity:.6}}svg{{background:#fafafa;border:1px solid #ddd}}.legend span{{margin-right:1rem}}</style></head><body>
<h1>Load run {run}</h1><p>{target}: {model}, {dur:.1} s. {req} requests ({rps:.1}/s), {failed} failed, {orders} orders accepted.</p>"#,
            run = escape(&self.run_id),
            target = escape(&self.target),
            model = escape(&self.model),
            dur = self.duration_s,
            req = self.requests,
            rps = self.per_second,
            failed = self.failed,
            orders = self.orders_accepted,
        );
        page.push_str("<h2>Latency (ms, from the intended start)</h2><p class=legend><span style=\"color:#1f77b4\">p50</span><span style=\"color:#d62728\">p99</span><span style=\"color:#2ca02c\">create order p99</span></p>");
        let periods = self.fault_periods();
        page.push_str(&chart(
            &self.timeline,
            &periods,
            &[
                ("#1f77b4", &|s: &SecondReport| s.p50_ms),
                ("#d62728", &|s: &SecondReport| s.p99_ms),
                ("#2ca02c", &|s: &SecondReport| s.create_order_p99_ms),
            ],
        ));
        page.push_str("<h2>Requests per second</h2><p class=legend><span style=\"color:#1f77b4\">requests</span><span style=\"color:#d62728\">failed</span></p>");
        page.push_str(&chart(
            &self.timeline,
            &periods,
            &[
                ("#1f77b4", &|s: &SecondReport| s.requests as f64),
                ("#d62728", &|s: &SecondReport| s.failed as f64),
            ],
        ));
        if !self.pipeline.is_empty() {
            page.push_str("<h2>Pipeline backlog</h2><p class=legend><span style=\"color:#9467bd\">outbox rows</span><span style=\"color:#8c564b\">queue messages</span></p>");
            let as_seconds: Vec<SecondReport> = self
                .pipeline
                .iter()
                .map(|p| SecondReport {
                    second: p.at.round() as usize,
                    requests: p.outbox_backlog as u64,
                    failed: p.queue_depth as u64,
                    p50_ms: 0.0,
                    p99_ms: 0.0,
                    create_order_p99_ms: 0.0,
                })
                .collect();
            page.push_str(&chart(
                &as_seconds,
                &self.fault_periods(),
                &[
                    ("#9467bd", &|s: &SecondReport| s.requests as f64),
                    ("#8c564b", &|s: &SecondReport| s.failed as f64),
                ],
            ));
        }
        page.push_str("<h2>Steps</h2><table><tr><th>step</th><th>requests</th><th>failed</th><th>req/s</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max (ms)</th><th>failures by kind</th></tr>");
        for s in &self.steps {
            let kinds: Vec<String> = s
                .failures
                .iter()
                .map(|(k, n)| format!("{}: {n}", escape(k)))
                .collect();
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>",
                escape(&s.step),
                s.requests,
                s.failed,
                s.per_second,
                s.p50_ms,
                s.p90_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms,
                kinds.join(", ")
            );
        }
        page.push_str("</table>");
        if !self.faults.is_empty() {
            page.push_str("<h2>Faults</h2><ul>");
            for f in &self.faults {
                let _ = write!(
                    page,
                    "<li>{:.1} s: {} {} {}{}</li>",
                    f.at,
                    escape(&f.name),
                    f.action,
                    escape(&serde_json::Value::Object(f.params.clone()).to_string()),
                    f.refused
                        .as_ref()
                        .map(|r| format!(" (refused: {})", escape(r)))
                        .unwrap_or_default()
                );
            }
            page.push_str("</ul>");
        }
        page.push_str("</body></html>\n");
        page
    }

    /// (start, end) seconds of each fault that was on, for shading.
    fn fault_periods(&self) -> Vec<(f64, f64)> {
        let end = self.duration_s;
        self.faults
            .iter()
            .filter(|f| f.action == "on" && f.refused.is_none())
            .map(|f| {
                let seconds = f.params.get("seconds").and_then(serde_json::Value::as_f64);
                let off = self
                    .faults
                    .iter()
                    .find(|g| g.action == "off" && g.name == f.name && g.at >= f.at)
                    .map_or(end, |g| g.at);
                (f.at, seconds.map_or(off, |s| (f.at + s).min(off)))
            })
            .collect()
    }
}

/// A line chart of the timeline: one polyline per series, fault periods shaded.
#[allow(clippy::type_complexity)] // a series is a colour and how to read a second
fn chart(
    timeline: &[SecondReport],
    periods: &[(f64, f64)],
    series: &[(&str, &dyn Fn(&SecondReport) -> f64)],
) -> String {
    let (width, height, pad) = (900.0, 240.0, 40.0);
    let n = timeline
        .last()
        .map_or(2.0, |s| (s.second + 1).max(2) as f64);
    let max = timeline
        .iter()
        .flat_map(|s| series.iter().map(move |(_, f)| f(s)))
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let x = |i: f64| pad + i / (n - 1.0) * (width - 2.0 * pad);
    let y = |v: f64| height - pad - v / max * (height - 2.0 * pad);
    let mut svg = format!(
        r#"<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">"#
    );
    for &(on, off) in periods {
        let _ = write!(
            svg,
            r#"<rect class="fault" x="{:.1}" y="{pad}" width="{:.1}" height="{:.1}"><title>fault</title></rect>"#,
            x(on),
            (x(off.min(n - 1.0)) - x(on)).max(2.0),
            height - 2.0 * pad
        );
    }
    let _ = write!(
        svg,
        r##"<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#999"/><text x="2" y="{t}" font-size="11">{max:.1}</text><text x="2" y="{b}" font-size="11">0</text><text x="{r}" y="{lb}" font-size="11" text-anchor="end">{n:.0} s</text>"##,
        b = height - pad,
        r = width - pad,
        t = pad + 4.0,
        lb = height - pad + 16.0,
    );
    for (colour, f) in series {
        let points: Vec<String> = timeline
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.second as f64), y(f(s))))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
    }
    svg.push_str("</svg>");
    svg
}

fn named(map: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    map.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
