//! What a run measured: an HDR histogram per step (latency from the step's intended start, so
//! time a request spent waiting for a slow server to take it is counted), successes and
//! failures by kind, and a per-second timeline for the progress line and the report's charts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, from 1 µs to 5 minutes, 3 significant digits.
const HIGHEST_MICROS: u64 = 300_000_000;

/// An empty histogram with the run's bounds (cloned, never rebuilt).
pub fn histogram() -> Result<Histogram<u64>, crate::LoadError> {
    Histogram::new_with_bounds(1, HIGHEST_MICROS, 3)
        .map_err(|e| crate::LoadError::Setup(format!("latency histogram: {e}")))
}

/// One step's totals.
pub struct StepStats {
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub failures: BTreeMap<String, u64>,
}

impl StepStats {
    fn new(template: &Histogram<u64>) -> StepStats {
        StepStats {
            latency: template.clone(),
            ok: 0,
            failures: BTreeMap::new(),
        }
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.failures.values().sum::<u64>()
    }
}

/// One second of the run.
pub struct Second {
    pub requests: u64,
    pub failures: u64,
    pub latency: Histogram<u64>,
    /// Order creation alone: the step the SLO is about.
    pub orders: Histogram<u64>,
}

impl Second {
    fn new(template: &Histogram<u64>) -> Second {
        Second {
            requests: 0,
            failures: 0,
            latency: template.clone(),
            orders: template.clone(),
        }
    }
}

pub struct Stats {
    template: Histogram<u64>,
    pub started: Instant,
    pub steps: BTreeMap<&'static str, StepStats>,
    pub seconds: Vec<Second>,
    pub journeys_started: BTreeMap<&'static str, u64>,
    pub journeys_skipped: BTreeMap<&'static str, u64>,
    /// Arrivals not started because too many journeys were in flight (client saturated).
    pub arrivals_dropped: u64,
}

impl Stats {
    /// Moves the measurements out, leaving empty ones.
    pub fn take(&mut self) -> Stats {
        let fresh = Stats {
            template: self.template.clone(),
            started: self.started,
            steps: BTreeMap::new(),
            seconds: Vec::new(),
            journeys_started: BTreeMap::new(),
            journeys_skipped: BTreeMap::new(),
            arrivals_dropped: 0,
        };
        std::mem::replace(self, fresh)
    }
}

/// The name order creation is recorded under.
pub const CREATE_ORDER: &str = "create order";

/// A handle every journey records into (cheap to clone).
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Stats>>,
}

impl Recorder {
    pub fn new(started: Instant) -> Result<Recorder, crate::LoadError> {
        Ok(Recorder {
            inner: Arc::new(Mutex::new(Stats {
                template: histogram()?,
                started,
                steps: BTreeMap::new(),
                seconds: Vec::new(),
                journeys_started: BTreeMap::new(),
                journeys_skipped: BTreeMap::new(),
                arrivals_dropped: 0,
            })),
        })
    }

    /// Records one request of `step` that should have started at `intended` and ended now.
    pub fn record(&self, step: &'static str, intended: Instant, failure: Option<&str>) {
        let now = Instant::now();
        let micros = now.saturating_duration_since(intended).as_micros();
        let micros = u64::try_from(micros)
            .unwrap_or(u64::MAX)
            .clamp(1, HIGHEST_MICROS);
        self.with(|stats| {
            let second = now.saturating_duration_since(stats.started).as_secs() as usize;
            if stats.seconds.len() <= second {
                let template = &stats.template;
                stats
                    .seconds
                    .resize_with(second + 1, || Second::new(template));
            }
            let template = &stats.template;
            let entry = stats
                .steps
                .entry(step)
                .or_insert_with(|| StepStats::new(template));
            let _ = entry.latency.record(micros);
            let slot = &mut stats.seconds[second];
            slot.requests += 1;
            let _ = slot.latency.record(micros);
            if step == CREATE_ORDER {
                let _ = slot.orders.record(micros);
            }
            match failure {
                None => entry.ok += 1,
                Some(kind) => {
                    slot.failures += 1;
                    *entry.failures.entry(kind.to_owned()).or_default() += 1;
                }
            }
        });
    }

    pub fn journey_started(&self, journey: &'static str) {
        self.with(|s| *s.journeys_started.entry(journey).or_default() += 1);
    }

    /// A journey that found nothing to do (an operator with no paid order to ship).
    pub fn journey_skipped(&self, journey: &'static str) {
        self.with(|s| *s.journeys_skipped.entry(journey).or_default() += 1);
    }

    pub fn arrival_dropped(&self) {
        self.with(|s| s.arrivals_dropped += 1);
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Stats) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Milliseconds at a quantile, for reports.
pub fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_counts_from_the_intended_start() {
        let started = Instant::now();
        let recorder = Recorder::new(started).unwrap();
        // A step that was due 50 ms ago and answered now took 50 ms for its user, however
        // quickly the server answered once the request was sent.
        let intended = Instant::now() - Duration::from_millis(50);
        recorder.record(CREATE_ORDER, intended, None);
        recorder.record(CREATE_ORDER, Instant::now(), Some("503 fault-injected"));
        recorder.with(|s| {
            let step = &s.steps[CREATE_ORDER];
            assert_eq!(step.ok, 1);
            assert_eq!(step.failures["503 fault-injected"], 1);
            assert!(quantile_ms(&step.latency, 1.0) >= 50.0);
            assert_eq!(s.seconds[0].requests, 2);
            assert_eq!(s.seconds[0].failures, 1);
            assert_eq!(s.seconds[0].orders.len(), 2);
        });
    }
}
