//! Run-time fault injection: named failures switched on and off while the platform runs (the
//! payment provider declining or unreachable, a service's routes slow or failing, the stream
//! or queue unreachable for a while, a consumer crashing mid-batch), to rehearse what the
//! platform does when a dependency misbehaves.
//!
//! Off by default, and only where [`allowed`] says: in a development or test `environment`,
//! or wherever `faults.allowed = true`. Each fault is a documented name ([`FaultName`]) with
//! typed parameters ([`Fault`], parsed from JSON by [`Fault::parse`]), in the spirit of feature
//! flags; at most one fault of each name is set at a time, and setting it again replaces it.
//! The hooks sit where the real failure would happen and ask this module whether to fail:
//!
//! | fault | hook |
//! |---|---|
//! | `payment-decline`, `payment-timeout` | the payments service's provider (`payments::faults`) |
//! | `route-latency`, `route-error` | every service's request middleware (`crate::server`) |
//! | `stream-publish`, `queue-publish` | the outbox relay (`bus::outbox`) |
//! | `consumer-crash` | the consumers' stream and queue (`bus::faults`) |
//!
//! Every failure a hook injects is counted in `faults_injected_total{fault}`, and
//! `faults_active{fault}` is 1 while a fault is set. The routes that switch them are in
//! [`admin`]: `GET/PUT/DELETE /api/v1/admin/faults[/{name}]`, for administrators.

pub mod admin;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::{DEVELOPMENT_ENVIRONMENTS, Settings};
use crate::problem::Problem;
use crate::wiring::Service;

pub use admin::FaultAdmin;

/// Whether this process may have faults set: `faults.allowed` when set, else only in a
/// development or test `environment` (the payment simulator's allow-list).
pub fn allowed(settings: &Settings) -> bool {
    settings
        .faults
        .allowed
        .unwrap_or_else(|| DEVELOPMENT_ENVIRONMENTS.contains(&settings.environment.as_str()))
}

/// The longest `route-latency` may add, in milliseconds (the default request timeout).
pub const MAX_LATENCY_MS: u64 = 30_000;
/// The longest `stream-publish` and `queue-publish` may last, in seconds.
pub const MAX_SECONDS: u64 = 3_600;
/// The most batches `consumer-crash` may be told to crash.
pub const MAX_COUNT: u64 = 1_000_000;

/// The faults there are, by their documented names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultName {
    PaymentDecline,
    PaymentTimeout,
    RouteLatency,
    RouteError,
    StreamPublish,
    QueuePublish,
    ConsumerCrash,
}

impl FaultName {
    pub const ALL: [FaultName; 7] = [
        FaultName::PaymentDecline,
        FaultName::PaymentTimeout,
        FaultName::RouteLatency,
        FaultName::RouteError,
        FaultName::StreamPublish,
        FaultName::QueuePublish,
        FaultName::ConsumerCrash,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            FaultName::PaymentDecline => "payment-decline",
            FaultName::PaymentTimeout => "payment-timeout",
            FaultName::RouteLatency => "route-latency",
            FaultName::RouteError => "route-error",
            FaultName::StreamPublish => "stream-publish",
            FaultName::QueuePublish => "queue-publish",
            FaultName::ConsumerCrash => "consumer-crash",
        }
    }

    pub fn parse(name: &str) -> Result<FaultName, FaultError> {
        FaultName::ALL
            .into_iter()
            .find(|f| f.as_str() == name)
            .ok_or_else(|| FaultError::Unknown(shown(name)))
    }

    /// Its bit in [`Registry`]'s set of names with a fault set.
    const fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl std::fmt::Display for FaultName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every fault's name, for messages.
fn all_names() -> String {
    FaultName::ALL.map(FaultName::as_str).join(", ")
}

/// A client's text as a message may repeat it: at most 64 characters.
fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Why a fault could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("there is no fault called `{0}`; the faults are {names}", names = all_names())]
    Unknown(String),
    #[error("{fault}: {message}")]
    Invalid { fault: FaultName, message: String },
}

impl FaultError {
    fn invalid(fault: FaultName, message: impl Into<String>) -> FaultError {
        FaultError::Invalid {
            fault,
            message: message.into(),
        }
    }
}

/// A fraction of calls, more than 0 and at most 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(f64);

impl Rate {
    /// Every call.
    pub const ALWAYS: Rate = Rate(1.0);

    pub fn new(rate: f64) -> Result<Rate, String> {
        if rate > 0.0 && rate <= 1.0 {
            Ok(Rate(rate))
        } else {
            Err(format!(
                "rate is a fraction of calls: more than 0 and at most 1, not {rate}"
            ))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether this call is one of the fraction.
    fn hit(self) -> bool {
        self.0 >= 1.0 || fastrand::f64() < self.0
    }
}

/// The services whose consumers `consumer-crash` may single out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumer {
    /// The analytics consumer of the `orders` stream.
    Analytics,
    /// The orders service's listener on the `payments` stream.
    Orders,
    /// The notifier, on the `order-events` queue.
    Notifications,
}

impl Consumer {
    pub const ALL: [Consumer; 3] = [
        Consumer::Analytics,
        Consumer::Orders,
        Consumer::Notifications,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Consumer::Analytics => "analytics",
            Consumer::Orders => "orders",
            Consumer::Notifications => "notifications",
        }
    }

    pub fn parse(name: &str) -> Option<Consumer> {
        Consumer::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// When `consumer-crash` crashes a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// That fraction of batches.
    Rate(Rate),
    /// The next this many batches, then the fault clears itself.
    Count(u64),
}

/// A fault with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The payment provider declines that fraction of charges, as a real decline: the payment
    /// fails, the order is cancelled and its stock released, the client gets 402.
    PaymentDecline { rate: Rate },
    /// The payment provider cannot be reached for that fraction of charges: nothing is
    /// charged and the client gets 503, as with the simulator's card 4000 0000 0000 0119.
    PaymentTimeout { rate: Rate },
    /// That fraction of the service's API requests wait `ms` before they are handled.
    RouteLatency {
        service: Service,
        ms: u64,
        rate: Rate,
    },
    /// That fraction of the service's API requests are answered 503 `fault-injected`.
    RouteError { service: Service, rate: Rate },
    /// The outbox relays cannot publish to the stream for `seconds` from when it is set.
    StreamPublish { seconds: u64 },
    /// The outbox relays cannot send to the queue for `seconds` from when it is set.
    QueuePublish { seconds: u64 },
    /// A consumer (any, or the one named) fails after handling a batch and acknowledging
    /// only its first half, as a crash would: the rest is delivered again.
    ConsumerCrash {
        trigger: Trigger,
        consumer: Option<Consumer>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateParams {
    rate: f64,
}

fn always() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyParams {
    service: String,
    ms: u64,
    #[serde(default = "always")]
    rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteErrorParams {
    service: String,
    #[serde(default = "always")]
    rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimedParams {
    seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrashParams {
    rate: Option<f64>,
    count: Option<u64>,
    consumer: Option<String>,
}

impl Fault {
    pub fn name(&self) -> FaultName {
        match self {
            Fault::PaymentDecline { .. } => FaultName::PaymentDecline,
            Fault::PaymentTimeout { .. } => FaultName::PaymentTimeout,
            Fault::RouteLatency { .. } => FaultName::RouteLatency,
            Fault::RouteError { .. } => FaultName::RouteError,
            Fault::StreamPublish { .. } => FaultName::StreamPublish,
            Fault::QueuePublish { .. } => FaultName::QueuePublish,
            Fault::ConsumerCrash { .. } => FaultName::ConsumerCrash,
        }
    }

    /// The fault `name` with `params` (a JSON object; `null` for none): unknown parameters,
    /// missing ones and values out of range are refused with a message saying which.
    pub fn parse(name: FaultName, params: &Value) -> Result<Fault, FaultError> {
        let rate = |r: f64| Rate::new(r).map_err(|m| FaultError::invalid(name, m));
        let service = |s: &str| {
            Service::from_name(s).ok_or_else(|| {
                FaultError::invalid(
                    name,
                    format!(
                        "service is one of {}, not `{}`",
                        Service::ALL.map(Service::as_str).join(", "),
                        shown(s)
                    ),
                )
            })
        };
        let fault = match name {
            FaultName::PaymentDecline => Fault::PaymentDecline {
                rate: rate(fields::<RateParams>(name, params)?.rate)?,
            },
            FaultName::PaymentTimeout => Fault::PaymentTimeout {
                rate: rate(fields::<RateParams>(name, params)?.rate)?,
            },
            FaultName::RouteLatency => {
                let p = fields::<LatencyParams>(name, params)?;
                if !(1..=MAX_LATENCY_MS).contains(&p.ms) {
                    return Err(FaultError::invalid(
                        name,
                        format!(
                            "ms is the delay added, 1 to {MAX_LATENCY_MS} milliseconds, not {}",
                            p.ms
                        ),
                    ));
                }
                Fault::RouteLatency {
                    service: service(&p.service)?,
                    ms: p.ms,
                    rate: rate(p.rate)?,
                }
            }
            FaultName::RouteError => {
                let p = fields::<RouteErrorParams>(name, params)?;
                Fault::RouteError {
                    service: service(&p.service)?,
                    rate: rate(p.rate)?,
                }
            }
            FaultName::StreamPublish | FaultName::QueuePublish => {
                let seconds = fields::<TimedParams>(name, params)?.seconds;
                if !(1..=MAX_SECONDS).contains(&seconds) {
                    return Err(FaultError::invalid(
                        name,
                        format!("seconds is how long it lasts, 1 to {MAX_SECONDS}, not {seconds}"),
                    ));
                }
                if name == FaultName::StreamPublish {
                    Fault::StreamPublish { seconds }
                } else {
                    Fault::QueuePublish { seconds }
                }
            }
            FaultName::ConsumerCrash => {
                let p = fields::<CrashParams>(name, params)?;
                let trigger = match (p.rate, p.count) {
                    (Some(r), None) => Trigger::Rate(rate(r)?),
                    (None, Some(n)) if (1..=MAX_COUNT).contains(&n) => Trigger::Count(n),
                    (None, Some(n)) => {
                        return Err(FaultError::invalid(
                            name,
                            format!("count is how many batches crash, 1 to {MAX_COUNT}, not {n}"),
                        ));
                    }
                    _ => {
                        return Err(FaultError::invalid(
                            name,
                            "give either rate (a fraction of batches) or count (how many batches), not both",
                        ));
                    }
                };
                let consumer = match p.consumer.as_deref() {
                    None => None,
                    Some(c) => Some(Consumer::parse(c).ok_or_else(|| {
                        FaultError::invalid(
                            name,
                            format!(
                                "consumer is one of {}, not `{}`",
                                Consumer::ALL.map(Consumer::as_str).join(", "),
                                shown(c)
                            ),
                        )
                    })?),
                };
                Fault::ConsumerCrash { trigger, consumer }
            }
        };
        Ok(fault)
    }

    /// Its parameters as JSON, as [`Fault::parse`] reads them.
    pub fn params(&self) -> Value {
        match self {
            Fault::PaymentDecline { rate } | Fault::PaymentTimeout { rate } => {
                json!({"rate": rate.get()})
            }
            Fault::RouteLatency { service, ms, rate } => {
                json!({"service": service.as_str(), "ms": ms, "rate": rate.get()})
            }
            Fault::RouteError { service, rate } => {
                json!({"service": service.as_str(), "rate": rate.get()})
            }
            Fault::StreamPublish { seconds } | Fault::QueuePublish { seconds } => {
                json!({"seconds": seconds})
            }
            Fault::ConsumerCrash { trigger, consumer } => {
                let mut params = match trigger {
                    Trigger::Rate(rate) => json!({"rate": rate.get()}),
                    Trigger::Count(count) => json!({"count": count}),
                };
                if let Some(consumer) = consumer {
                    params["consumer"] = consumer.as_str().into();
                }
                params
            }
        }
    }

    /// How long a timed fault lasts.
    fn lasts(&self) -> Option<Duration> {
        match self {
            Fault::StreamPublish { seconds } | Fault::QueuePublish { seconds } => {
                Some(Duration::from_secs(*seconds))
            }
            _ => None,
        }
    }
}

/// `params` read as `T`: a JSON object (or nothing), serde's message naming the field when not.
fn fields<T: DeserializeOwned>(name: FaultName, params: &Value) -> Result<T, FaultError> {
    let empty = Value::Object(Map::new());
    let params = match params {
        Value::Null => &empty,
        Value::Object(_) => params,
        _ => {
            return Err(FaultError::invalid(
                name,
                "the parameters are a JSON object, such as {\"rate\": 0.5}",
            ));
        }
    };
    T::deserialize(params).map_err(|e| FaultError::invalid(name, e.to_string()))
}

/// A fault as the admin routes show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultView {
    pub name: String,
    pub params: Value,
    /// When it was set.
    pub since: DateTime<Utc>,
    /// When a timed fault ends by itself.
    pub until: Option<DateTime<Utc>>,
    /// Failures injected so far.
    pub injected: u64,
}

/// What `GET /api/v1/admin/faults` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultList {
    /// Whether faults may be set here ([`allowed`]).
    pub allowed: bool,
    pub faults: Vec<FaultView>,
}

/// One fault while it is set.
#[derive(Debug)]
struct Active {
    fault: Fault,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    deadline: Option<Instant>,
    injected: AtomicU64,
    /// Firings left of a count-based fault.
    left: AtomicU64,
    /// Which setting this is: a timer or a last firing clears only the setting it belongs to.
    id: u64,
}

impl Active {
    fn view(&self) -> FaultView {
        FaultView {
            name: self.fault.name().as_str().to_owned(),
            params: self.fault.params(),
            since: self.since,
            until: self.until,
            injected: self.injected.load(Ordering::Relaxed),
        }
    }

    fn over(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| now >= deadline)
    }
}

/// What a service's API request must suffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteFault {
    /// Wait this long first.
    pub latency: Option<Duration>,
    /// Then answer 503 `fault-injected` instead of handling it.
    pub error: bool,
}

/// The faults set, and the hooks' questions. The process has one ([`registry`]); tests make
/// their own.
#[derive(Debug, Default)]
pub struct Registry {
    faults: RwLock<BTreeMap<FaultName, Arc<Active>>>,
    /// A bit per name with a fault set: the hooks' whole cost while none is.
    set: AtomicU32,
    /// The next setting's id.
    next_id: AtomicU64,
}

const ROUTE_FAULTS: u32 = FaultName::RouteLatency.bit() | FaultName::RouteError.bit();

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<FaultName, Arc<Active>>> {
        self.faults.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<FaultName, Arc<Active>>> {
        self.faults.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets `fault`, replacing any of its name (its count of injected failures starts again).
    pub fn set(&self, fault: Fault) -> FaultView {
        self.insert(fault).view()
    }

    fn insert(&self, fault: Fault) -> Arc<Active> {
        let name = fault.name();
        let since = Utc::now();
        let lasts = fault.lasts();
        let left = match fault {
            Fault::ConsumerCrash {
                trigger: Trigger::Count(n),
                ..
            } => n,
            _ => 0,
        };
        let active = Arc::new(Active {
            until: lasts
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| since + d),
            deadline: lasts.map(|d| Instant::now() + d),
            injected: AtomicU64::new(0),
            left: AtomicU64::new(left),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            fault,
            since,
        });
        let mut faults = self.write();
        faults.insert(name, active.clone());
        self.set.fetch_or(name.bit(), Ordering::SeqCst);
        drop(faults);
        active_gauge(name, true);
        active
    }

    /// Clears the fault `name`; whether one was set.
    pub fn clear(&self, name: FaultName) -> bool {
        let mut faults = self.write();
        let removed = faults.remove(&name).is_some();
        self.set.fetch_and(!name.bit(), Ordering::SeqCst);
        drop(faults);
        if removed {
            active_gauge(name, false);
        }
        removed
    }

    /// Clears every fault.
    pub fn clear_all(&self) {
        for name in FaultName::ALL {
            self.clear(name);
        }
    }

    /// The faults set, in name order (timed ones past their end cleared first).
    pub fn list(&self) -> Vec<FaultView> {
        let now = Instant::now();
        let over: Vec<(FaultName, u64)> = self
            .read()
            .iter()
            .filter(|(_, a)| a.over(now))
            .map(|(name, a)| (*name, a.id))
            .collect();
        for (name, id) in over {
            self.end(name, id, "its time is up");
        }
        self.read().values().map(|a| a.view()).collect()
    }

    /// Clears setting `id` of `name` if it is still the one set.
    fn end(&self, name: FaultName, id: u64, why: &str) {
        let mut faults = self.write();
        if faults.get(&name).is_none_or(|a| a.id != id) {
            return;
        }
        faults.remove(&name);
        self.set.fetch_and(!name.bit(), Ordering::SeqCst);
        drop(faults);
        active_gauge(name, false);
        tracing::info!(fault = name.as_str(), "fault cleared by itself: {why}");
    }

    /// The fault `name` if it is set and not over.
    fn live(&self, name: FaultName) -> Option<Arc<Active>> {
        if self.set.load(Ordering::Relaxed) & name.bit() == 0 {
            return None;
        }
        let active = self.read().get(&name).cloned()?;
        if active.over(Instant::now()) {
            self.end(name, active.id, "its time is up");
            return None;
        }
        Some(active)
    }

    /// Counts one injected failure of `active`.
    fn injected(&self, active: &Active) {
        active.injected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("faults_injected_total", "fault" => active.fault.name().as_str())
            .increment(1);
    }

    /// A payment fault of `name` fires for this charge.
    fn payment(&self, name: FaultName) -> bool {
        let Some(active) = self.live(name) else {
            return false;
        };
        let (Fault::PaymentDecline { rate } | Fault::PaymentTimeout { rate }) = active.fault else {
            return false;
        };
        let fires = rate.hit();
        if fires {
            self.injected(&active);
        }
        fires
    }

    /// Whether the payment provider declines this charge (`payment-decline`).
    pub fn payment_declines(&self) -> bool {
        self.payment(FaultName::PaymentDecline)
    }

    /// Whether the payment provider cannot be reached for this charge (`payment-timeout`).
    pub fn payment_times_out(&self) -> bool {
        self.payment(FaultName::PaymentTimeout)
    }

    /// Whether a route fault is set at all (one atomic load: the cost on every request).
    pub fn routes_touched(&self) -> bool {
        self.set.load(Ordering::Relaxed) & ROUTE_FAULTS != 0
    }

    /// What an API request to `service` (its name) must suffer now.
    pub fn route(&self, service: &str) -> RouteFault {
        let mut fault = RouteFault::default();
        if !self.routes_touched() {
            return fault;
        }
        if let Some(active) = self.live(FaultName::RouteLatency)
            && let Fault::RouteLatency {
                service: target,
                ms,
                rate,
            } = active.fault
            && target.as_str() == service
            && rate.hit()
        {
            self.injected(&active);
            fault.latency = Some(Duration::from_millis(ms));
        }
        if let Some(active) = self.live(FaultName::RouteError)
            && let Fault::RouteError {
                service: target,
                rate,
            } = active.fault
            && target.as_str() == service
            && rate.hit()
        {
            self.injected(&active);
            fault.error = true;
        }
        fault
    }

    fn timed(&self, name: FaultName) -> bool {
        let Some(active) = self.live(name) else {
            return false;
        };
        self.injected(&active);
        true
    }

    /// Whether a publish to the stream fails now (`stream-publish`).
    pub fn stream_publish_fails(&self) -> bool {
        self.timed(FaultName::StreamPublish)
    }

    /// Whether a send to the queue fails now (`queue-publish`).
    pub fn queue_publish_fails(&self) -> bool {
        self.timed(FaultName::QueuePublish)
    }

    /// Whether `consumer` (of a known service, or `None`) crashes before acknowledging the
    /// batch in hand (`consumer-crash`). A count-based fault clears itself at its last firing.
    pub fn consumer_crashes(&self, consumer: Option<Consumer>) -> bool {
        let Some(active) = self.live(FaultName::ConsumerCrash) else {
            return false;
        };
        let Fault::ConsumerCrash {
            trigger,
            consumer: target,
        } = active.fault
        else {
            return false;
        };
        if target.is_some() && target != consumer {
            return false;
        }
        let fires = match trigger {
            Trigger::Rate(rate) => rate.hit(),
            Trigger::Count(_) => {
                match active
                    .left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                {
                    Ok(1) => {
                        self.end(FaultName::ConsumerCrash, active.id, "its count is used up");
                        true
                    }
                    Ok(_) => true,
                    Err(_) => false,
                }
            }
        };
        if fires {
            self.injected(&active);
        }
        fires
    }
}

fn active_gauge(name: FaultName, on: bool) {
    metrics::gauge!("faults_active", "fault" => name.as_str()).set(if on { 1.0 } else { 0.0 });
}

/// Makes the fault metrics exist at zero, so a dashboard's `increase()` sees their first rise.
pub fn describe_metrics() {
    for name in FaultName::ALL {
        metrics::counter!("faults_injected_total", "fault" => name.as_str()).increment(0);
        if registry().live(name).is_none() {
            active_gauge(name, false);
        }
    }
}

// Process-scoped, like the metrics recorder: a process's faults are what all its hooks see,
// and the hooks sit deep in the bus and the payment provider, where threading a handle through
// would touch every constructor on the way.
static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// The process's faults.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Sets `fault` in the process (a timed one is cleared at its end, even with no hook asking).
pub fn set(fault: Fault) -> FaultView {
    let name = fault.name();
    let params = fault.params();
    let lasts = fault.lasts();
    let active = REGISTRY.insert(fault);
    tracing::warn!(fault = name.as_str(), %params, "fault injection: fault set");
    if let (Some(lasts), Ok(runtime)) = (lasts, tokio::runtime::Handle::try_current()) {
        let id = active.id;
        runtime.spawn(async move {
            tokio::time::sleep(lasts).await;
            REGISTRY.end(name, id, "its time is up");
        });
    }
    active.view()
}

/// Clears the fault `name` in the process; whether one was set.
pub fn clear(name: FaultName) -> bool {
    let cleared = REGISTRY.clear(name);
    if cleared {
        tracing::warn!(fault = name.as_str(), "fault injection: fault cleared");
    }
    cleared
}

/// Clears every fault in the process.
pub fn clear_all() {
    for name in FaultName::ALL {
        clear(name);
    }
}

/// Whether the payment provider declines this charge.
pub fn payment_declines() -> bool {
    REGISTRY.payment_declines()
}

/// Whether the payment provider cannot be reached for this charge.
pub fn payment_times_out() -> bool {
    REGISTRY.payment_times_out()
}

/// Whether a publish to the stream fails now.
pub fn stream_publish_fails() -> bool {
    REGISTRY.stream_publish_fails()
}

/// Whether a send to the queue fails now.
pub fn queue_publish_fails() -> bool {
    REGISTRY.queue_publish_fails()
}

/// Whether `consumer` crashes before acknowledging the batch in hand.
pub fn consumer_crashes(consumer: Option<Consumer>) -> bool {
    REGISTRY.consumer_crashes(consumer)
}

/// The fault-injection admin routes: never slowed or failed by a route fault, or a drill could
/// not be stopped.
const ADMIN_PREFIX: &str = "/api/v1/admin/faults";

/// Whether a route fault may touch `path`: API routes (`/api/...`, `/internal/...`) only, never
/// `/health`, the pages, or the fault routes themselves.
fn touches(path: &str) -> bool {
    (path.starts_with("/api/") || path.starts_with("/internal/"))
        && !(path.starts_with(ADMIN_PREFIX)
            && matches!(path.as_bytes().get(ADMIN_PREFIX.len()), None | Some(b'/')))
}

/// The request middleware's hook: waits as `route-latency` says, then `Some(answer)` when
/// `route-error` fails the request. Costs one atomic load while no route fault is set.
pub async fn on_route(service: &str, path: &str) -> Option<Response> {
    if !REGISTRY.routes_touched() || !touches(path) {
        return None;
    }
    let fault = REGISTRY.route(service);
    if let Some(latency) = fault.latency {
        tokio::time::sleep(latency).await;
    }
    fault.error.then(|| injected_error(service).into_response())
}

/// What `route-error` answers.
pub fn injected_error(service: &str) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "fault-injected",
        "Fault injected: this failure was caused on purpose",
    )
    .with_detail(format!(
        "fault injection: route-error is set on {service}; DELETE /api/v1/admin/faults/route-error ends it"
    ))
    .with("fault", FaultName::RouteError.as_str())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(name: &str, params: Value) -> Result<Fault, FaultError> {
        Fault::parse(FaultName::parse(name)?, &params)
    }

    fn refusal(name: &str, params: Value) -> String {
        parse(name, params).unwrap_err().to_string()
    }

    #[test]
    fn every_fault_parses_and_shows_its_params_back() {
        for (name, params) in [
            ("payment-decline", json!({"rate": 0.25})),
            ("payment-timeout", json!({"rate": 1.0})),
            (
                "route-latency",
                json!({"service": "products", "ms": 250, "rate": 0.5}),
            ),
            ("route-error", json!({"service": "gateway", "rate": 1.0})),
            ("stream-publish", json!({"seconds": 30})),
            ("queue-publish", json!({"seconds": 3600})),
            ("consumer-crash", json!({"count": 3})),
            (
                "consumer-crash",
                json!({"rate": 0.1, "consumer": "notifications"}),
            ),
        ] {
            let fault = parse(name, params.clone()).unwrap();
            assert_eq!(fault.name().as_str(), name);
            assert_eq!(fault.params(), params, "{name}");
            assert_eq!(Fault::parse(fault.name(), &fault.params()), Ok(fault));
        }
        assert_eq!(
            parse("route-error", json!({"service": "orders"})).unwrap(),
            Fault::RouteError {
                service: Service::Orders,
                rate: Rate::ALWAYS
            },
            "rate defaults to every call"
        );
    }

    #[test]
    fn bad_names_and_params_are_refused_saying_why() {
        let unknown = FaultName::parse("disk-full").unwrap_err().to_string();
        assert!(unknown.contains("`disk-full`"), "{unknown}");
        assert!(
            unknown.contains("payment-decline, payment-timeout"),
            "{unknown}"
        );
        for (name, params, says) in [
            ("payment-decline", json!({}), "missing field `rate`"),
            (
                "payment-decline",
                json!({"rate": 0}),
                "more than 0 and at most 1",
            ),
            ("payment-decline", json!({"rate": 2}), "not 2"),
            ("payment-decline", json!({"rate": -0.5}), "more than 0"),
            ("payment-decline", json!({"rate": "half"}), "invalid type"),
            (
                "payment-decline",
                json!({"rate": 1, "rat": 1}),
                "unknown field `rat`",
            ),
            ("payment-timeout", json!([0.5]), "a JSON object"),
            ("payment-timeout", json!("0.5"), "a JSON object"),
            (
                "route-latency",
                json!({"service": "products", "ms": -5}),
                "invalid value",
            ),
            (
                "route-latency",
                json!({"service": "products", "ms": 30001}),
                "1 to 30000",
            ),
            (
                "route-latency",
                json!({"service": "products", "ms": 0}),
                "1 to 30000",
            ),
            (
                "route-latency",
                json!({"service": "products", "ms": 1e30}),
                "invalid type",
            ),
            (
                "route-latency",
                json!({"ms": 100}),
                "missing field `service`",
            ),
            (
                "route-error",
                json!({"service": "inventory"}),
                "service is one of gateway, users",
            ),
            (
                "route-error",
                json!({"service": "users", "rate": 0}),
                "more than 0",
            ),
            ("stream-publish", json!({"seconds": 0}), "1 to 3600"),
            ("queue-publish", json!({"seconds": 3601}), "1 to 3600"),
            ("queue-publish", json!(null), "missing field `seconds`"),
            ("consumer-crash", json!({}), "either rate"),
            (
                "consumer-crash",
                json!({"rate": 0.5, "count": 2}),
                "not both",
            ),
            ("consumer-crash", json!({"count": 0}), "1 to 1000000"),
            (
                "consumer-crash",
                json!({"count": 1, "consumer": "billing"}),
                "consumer is one of analytics",
            ),
        ] {
            let refused = refusal(name, params.clone());
            assert!(refused.starts_with(name), "{name} {params}: {refused}");
            assert!(refused.contains(says), "{name} {params}: {refused}");
        }
        let long = "x".repeat(10_000);
        assert!(FaultName::parse(&long).unwrap_err().to_string().len() < 300);
    }

    #[test]
    fn rate_one_always_fires_and_a_tiny_rate_rarely() {
        let registry = Registry::new();
        assert!(!registry.payment_declines(), "nothing set");
        registry.set(Fault::PaymentDecline { rate: Rate::ALWAYS });
        assert!((0..1000).all(|_| registry.payment_declines()));
        assert!(!registry.payment_times_out(), "another fault");
        registry.set(Fault::PaymentTimeout {
            rate: Rate::new(1e-6).unwrap(),
        });
        let fired = (0..10_000).filter(|_| registry.payment_times_out()).count();
        assert!(fired <= 2, "{fired}");
        let half = Rate::new(0.5).unwrap();
        registry.set(Fault::PaymentTimeout { rate: half });
        let fired = (0..10_000).filter(|_| registry.payment_times_out()).count();
        assert!((4_000..6_000).contains(&fired), "{fired}");
        let views = registry.list();
        assert_eq!(views.len(), 2);
        assert_eq!(views[0].name, "payment-decline");
        assert_eq!(views[0].injected, 1000);
        assert_eq!(views[1].injected, fired as u64, "counted from its setting");
        assert!(registry.clear(FaultName::PaymentDecline));
        assert!(!registry.clear(FaultName::PaymentDecline));
        assert!(!registry.payment_declines());
    }

    #[test]
    fn route_faults_touch_their_service_only() {
        let registry = Registry::new();
        assert!(!registry.routes_touched());
        registry.set(Fault::RouteError {
            service: Service::Products,
            rate: Rate::ALWAYS,
        });
        registry.set(Fault::RouteLatency {
            service: Service::Orders,
            ms: 40,
            rate: Rate::ALWAYS,
        });
        assert!(registry.routes_touched());
        assert_eq!(
            registry.route("products"),
            RouteFault {
                latency: None,
                error: true
            }
        );
        assert_eq!(
            registry.route("orders"),
            RouteFault {
                latency: Some(Duration::from_millis(40)),
                error: false
            }
        );
        assert_eq!(registry.route("users"), RouteFault::default());
        registry.clear_all();
        assert!(!registry.routes_touched());
        assert!(registry.list().is_empty());
    }

    #[test]
    fn only_api_routes_but_the_fault_routes_are_touched() {
        for path in [
            "/api/v1/products",
            "/internal/v1/reservations",
            "/api/v1/admin/faultsx",
        ] {
            assert!(touches(path), "{path}");
        }
        for path in [
            "/health",
            "/",
            "/admin/orders",
            "/api/v1/admin/faults",
            "/api/v1/admin/faults/route-error",
            "/.well-known/jwks.json",
        ] {
            assert!(!touches(path), "{path}");
        }
    }

    #[test]
    fn timed_faults_end_by_themselves() {
        let registry = Registry::new();
        let view = registry.set(Fault::StreamPublish { seconds: 1 });
        let until = view.until.unwrap();
        assert_eq!((until - view.since).num_milliseconds(), 1000);
        assert!(registry.stream_publish_fails());
        assert!(!registry.queue_publish_fails());
        std::thread::sleep(Duration::from_millis(1100));
        assert!(!registry.stream_publish_fails(), "over");
        assert!(registry.list().is_empty(), "and cleared");
        registry.set(Fault::QueuePublish { seconds: 1 });
        std::thread::sleep(Duration::from_millis(1100));
        assert!(registry.list().is_empty(), "listing clears what is over");
    }

    #[test]
    fn a_count_fires_exactly_that_many_times_for_its_consumer() {
        let registry = Registry::new();
        registry.set(Fault::ConsumerCrash {
            trigger: Trigger::Count(3),
            consumer: Some(Consumer::Notifications),
        });
        assert!(!registry.consumer_crashes(Some(Consumer::Analytics)));
        assert!(!registry.consumer_crashes(None));
        let fired = (0..10)
            .filter(|_| registry.consumer_crashes(Some(Consumer::Notifications)))
            .count();
        assert_eq!(fired, 3);
        assert!(registry.list().is_empty(), "used up");

        registry.set(Fault::ConsumerCrash {
            trigger: Trigger::Count(50),
            consumer: None,
        });
        let fired = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter(|_| registry.consumer_crashes(Some(Consumer::Orders)))
                            .count()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .sum::<usize>()
        });
        assert_eq!(fired, 50, "exactly, however many ask at once");
    }

    #[test]
    fn setting_again_replaces_and_restarts_the_count() {
        let registry = Registry::new();
        registry.set(Fault::ConsumerCrash {
            trigger: Trigger::Count(1),
            consumer: None,
        });
        let first = registry.read().get(&FaultName::ConsumerCrash).unwrap().id;
        registry.set(Fault::ConsumerCrash {
            trigger: Trigger::Count(2),
            consumer: None,
        });
        // The first setting's end (a stale timer, a last firing) leaves the second alone.
        registry.end(FaultName::ConsumerCrash, first, "test");
        assert!(registry.consumer_crashes(None));
        assert!(registry.consumer_crashes(None));
        assert!(!registry.consumer_crashes(None));
    }

    #[test]
    fn faults_are_allowed_in_development_and_test_unless_settings_say() {
        let mut settings = Settings::default();
        assert!(allowed(&settings));
        settings.environment = "test".into();
        assert!(allowed(&settings));
        for elsewhere in ["production", "staging", "Production"] {
            settings.environment = elsewhere.into();
            assert!(!allowed(&settings), "{elsewhere}");
        }
        settings.faults.allowed = Some(true);
        assert!(allowed(&settings), "explicitly");
        settings.environment = "development".into();
        settings.faults.allowed = Some(false);
        assert!(!allowed(&settings), "never");
    }
}
