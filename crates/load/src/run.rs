//! The driver: sets the stage (products with a known stock, signed-in customers), starts
//! journeys at the plan's arrival rate or with its fixed users, switches faults on and off on
//! schedule, shows progress, and hands back the measurements and the ledger.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt as _;
use kit::Money;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::LoadError;
use crate::journeys::{self, Account, Ledger, LedgerProduct, World};
use crate::plan::{Arrivals, FaultSpec, Plan};
use crate::stats::{Recorder, Stats, quantile_ms};

use crate::target::{Call, Target};

/// A fault switched on or off during the run, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    /// Seconds after the start.
    pub at: f64,
    pub name: String,
    pub action: &'static str,
    pub params: serde_json::Map<String, serde_json::Value>,
    /// `None` when the platform took it; else what it answered.
    pub refused: Option<String>,
}

/// The platform's pipelines, sampled once a second from its metrics during the run.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineSample {
    /// Seconds after the start.
    pub at: f64,
    pub outbox_backlog: f64,
    pub queue_depth: f64,
}

/// What a run leaves: the measurements, the faults' history and the ledger.
pub struct Finished {
    pub stats: Stats,
    pub faults: Vec<FaultEvent>,
    pub pipeline: Vec<PipelineSample>,
    pub ledger: Ledger,
    pub duration: Duration,
    /// Journeys still running when the run's grace period ended (cut off).
    pub unfinished: usize,
}

/// Signs the administrator in; the account the operator journeys use.
pub async fn sign_in_admin(
    target: &Target,
    email: &str,
    password: &str,
) -> Result<Account, LoadError> {
    let (token, id) = journeys::request_tokens(target, email, password)
        .await
        .map_err(|failure| LoadError::Target {
            what: format!("{failure} to the administrator's sign-in ({email})"),
            detail: "give --admin-email and --admin-password (or MERCATO_AUTH__ADMIN_EMAIL and \
                     MERCATO_AUTH__ADMIN_PASSWORD) of an administrator"
                .into(),
        })?;
    Ok(Account::new(
        id,
        email.to_owned(),
        password.to_owned(),
        token,
    ))
}

/// Runs `plan` against `target` as `admin`, sampling the outbox and queue gauges of the
/// `metrics` endpoints each second.
pub async fn run(
    plan: &Plan,
    target: Target,
    admin: Account,
    metrics: &[String],
) -> Result<Finished, LoadError> {
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    say(format_args!(
        "load run {run_id}: setting up {} products and {} customers",
        plan.products, plan.customers
    ));
    let products = create_products(&target, &admin, &run_id, plan).await?;
    let customers = register_customers(&target, &run_id, plan.customers).await?;
    let ledger = Ledger {
        target: target.base().to_owned(),
        run_id: run_id.clone(),
        started_at: Some(Utc::now()),
        ended_at: None,
        products: products.clone(),
        users: customers.iter().map(|c| c.id).collect(),
        accepted_orders: Vec::new(),
        uncertain_orders: Default::default(),
    };
    let world = Arc::new(World::new(
        target.clone(),
        run_id,
        admin,
        customers,
        products,
        plan.think,
        ledger,
    ));

    let started = Instant::now();
    let recorder = Recorder::new(started)?;
    let faults = tokio::spawn(schedule_faults(world.clone(), plan.faults.clone(), started));
    let (stop_sampler, sampler_stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample_pipeline(
        target.clone(),
        metrics.to_vec(),
        started,
        sampler_stopped,
    ));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(show_progress(
        recorder.clone(),
        in_flight.clone(),
        plan.duration,
    ));
    say(format_args!(
        "load: {} for {}s against {}",
        plan.arrivals,
        plan.duration.as_secs(),
        target.base()
    ));

    let end = started + plan.duration;
    let mut journeys = JoinSet::new();
    match plan.arrivals {
        Arrivals::Rate(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.0);
            let mut n: u32 = 0;
            loop {
                let due = started + interval.mul_f64(f64::from(n));
                if due >= end {
                    break;
                }
                n = n.saturating_add(1);
                tokio::time::sleep_until(due.into()).await;
                while journeys.try_join_next().is_some() {}
                if in_flight.load(Ordering::Relaxed) >= plan.max_in_flight {
                    recorder.arrival_dropped();
                    continue;
                }
                let journey = plan.pick(fastrand::u32(..plan.total_weight()));
                let (world, recorder, in_flight) =
                    (world.clone(), recorder.clone(), in_flight.clone());
                in_flight.fetch_add(1, Ordering::Relaxed);
                journeys.spawn(async move {
                    journeys::run(&world, &recorder, journey, due).await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
        Arrivals::Users(users) => {
            for _ in 0..users {
                let (world, recorder, in_flight, plan) = (
                    world.clone(),
                    recorder.clone(),
                    in_flight.clone(),
                    plan.clone(),
                );
                journeys.spawn(async move {
                    let mut due = Instant::now();
                    while due < end {
                        let journey = plan.pick(fastrand::u32(..plan.total_weight()));
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        journeys::run(&world, &recorder, journey, due).await;
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        due = Instant::now() + plan.think.draw();
                        tokio::time::sleep_until(due.into()).await;
                    }
                });
            }
            tokio::time::sleep_until(end.into()).await;
        }
    }
    // Journeys under way finish (their steps are measured); past the grace period they are cut.
    let grace = plan.timeout + plan.think.max * 4 + Duration::from_secs(2);
    let _ = tokio::time::timeout(grace, async {
        while journeys.join_next().await.is_some() {}
    })
    .await;
    let unfinished = journeys.len();
    journeys.abort_all();
    let duration = started.elapsed();
    progress.abort();
    let _ = stop_sampler.send(());
    let pipeline = sampler.await.unwrap_or_default();
    let mut fault_events = faults.await.unwrap_or_default();
    fault_events.extend(clear_faults(&world, &plan.faults, started).await);

    let world = Arc::try_unwrap(world)
        .map_err(|_| LoadError::Setup("journeys still hold the run".into()))?;
    let mut ledger = world
        .ledger
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ledger.ended_at = Some(Utc::now());
    let stats = recorder.with(Stats::take);
    Ok(Finished {
        stats,
        faults: fault_events,
        pipeline,
        ledger,
        duration,
        unfinished,
    })
}

/// Prints a line to standard error (the report goes to standard output).
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Products for the run, each with `plan.stock` units: the verifier's known starting point.
async fn create_products(
    target: &Target,
    admin: &Account,
    run_id: &str,
    plan: &Plan,
) -> Result<Vec<LedgerProduct>, LoadError> {
    #[derive(Deserialize)]
    struct Created {
        id: Uuid,
        price: Money,
        on_hand: i64,
    }
    let mut products = Vec::new();
    for i in 0..plan.products {
        let sku = format!("LOAD-{run_id}-{i}");
        let name = format!("Load item {i} {run_id}");
        // Prices from 49.00 to 4,999.00 in whole rupees and paise, exact as kit::Money.
        let cents = 4_900 + u64::from(fastrand::u32(..495_000));
        // A float here is exact on the wire: serde_json writes the shortest text that reads
        // back as the same float, which for two decimals is those two decimals.
        let price = cents as f64 / 100.0;
        let body = json!({
            "name": name,
            "description": format!("A product of load run {run_id}"),
            "price": price,
            "stock": plan.stock,
            "sku": sku,
            "category": "load",
        });
        let reply = target
            .call(
                Call::send(Method::POST, "/api/v1/products", Some(admin.token()), body)
                    .expecting(&[201]),
            )
            .await;
        if let Some(failure) = &reply.failure {
            return Err(LoadError::Target {
                what: format!("{failure} to creating product {sku}"),
                detail: String::from_utf8_lossy(&reply.body)
                    .chars()
                    .take(300)
                    .collect(),
            });
        }
        let created: Created = reply.json().map_err(|detail| LoadError::Target {
            what: format!("creating product {sku}"),
            detail,
        })?;
        products.push(LedgerProduct {
            id: created.id,
            sku,
            name,
            price: created.price,
            initial_on_hand: created.on_hand,
        });
    }
    Ok(products)
}

/// Registers and signs in `count` customers, eight at a time.
async fn register_customers(
    target: &Target,
    run_id: &str,
    count: u32,
) -> Result<Vec<Account>, LoadError> {
    #[derive(Deserialize)]
    struct Created {
        id: Uuid,
    }
    let results: Vec<Result<Account, LoadError>> = futures_util::stream::iter(0..count)
        .map(|i| async move {
            let email = format!("load-{run_id}-{i}@example.com");
            let password = format!("load password {}", Uuid::new_v4().simple());
            let reply = target
                .call(
                    Call::send(
                        Method::POST,
                        "/api/v1/users",
                        None,
                        json!({"name": format!("Load customer {i}"), "email": email, "password": password}),
                    )
                    .expecting(&[201]),
                )
                .await;
            let created: Created = match &reply.failure {
                None => reply.json().map_err(|detail| LoadError::Target {
                    what: format!("registering {email}"),
                    detail,
                })?,
                Some(failure) => {
                    return Err(LoadError::Target {
                        what: format!("{failure} to registering {email}"),
                        detail: String::from_utf8_lossy(&reply.body).chars().take(300).collect(),
                    });
                }
            };
            let account = Account::new(created.id, email, password, String::new());
            journeys::sign_in(target, &account)
                .await
                .map_err(|failure| LoadError::Target {
                    what: format!("{failure} to signing in {}", account.email),
                    detail: "a customer the run just registered".into(),
                })?;
            Ok(account)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Samples the backlog gauges each second until `stop` fires.
async fn sample_pipeline(
    target: Target,
    metrics: Vec<String>,
    started: Instant,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<PipelineSample> {
    let mut samples = Vec::new();
    if metrics.is_empty() {
        return samples;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => return samples,
            _ = tick.tick() => {}
        }
        let (mut outbox, mut queue) = (0.0, 0.0);
        for url in &metrics {
            if let Ok(text) = target.get_text(url).await {
                let (o, q) = crate::verify::backlog_sums(&text);
                outbox += o;
                queue += q;
            }
        }
        samples.push(PipelineSample {
            at: started.elapsed().as_secs_f64(),
            outbox_backlog: outbox,
            queue_depth: queue,
        });
    }
}

/// Switches each fault on at its time; what the platform answered goes into the report.
async fn schedule_faults(
    world: Arc<World>,
    mut faults: Vec<FaultSpec>,
    started: Instant,
) -> Vec<FaultEvent> {
    faults.sort_by_key(|f| f.at);
    let mut events = Vec::new();
    for fault in faults {
        tokio::time::sleep_until((started + fault.at).into()).await;
        let reply = world
            .target
            .call(
                Call::send(
                    Method::PUT,
                    format!("/api/v1/admin/faults/{}", fault.name),
                    Some(world.admin.token()),
                    serde_json::Value::Object(fault.params.clone()),
                )
                .expecting(&[200]),
            )
            .await;
        let refused = reply.failure.as_ref().map(|failure| {
            let detail: String = String::from_utf8_lossy(&reply.body)
                .chars()
                .take(300)
                .collect();
            format!("{failure}: {detail}")
        });
        match &refused {
            None => say(format_args!(
                "load: fault {} on at {:.1}s",
                fault.name,
                started.elapsed().as_secs_f64()
            )),
            Some(why) => say(format_args!(
                "load: the platform refused fault {}: {why}",
                fault.name
            )),
        }
        events.push(FaultEvent {
            at: started.elapsed().as_secs_f64(),
            name: fault.name,
            action: "on",
            params: fault.params,
            refused,
        });
    }
    events
}

/// Switches off every fault the run switched on (timed ones may have ended by themselves).
async fn clear_faults(world: &World, faults: &[FaultSpec], started: Instant) -> Vec<FaultEvent> {
    let mut events = Vec::new();
    let mut names: Vec<&str> = faults.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let reply = world
            .target
            .call(Call {
                method: Method::DELETE,
                path: format!("/api/v1/admin/faults/{name}"),
                token: Some(world.admin.token()),
                body: None,
                idempotency_key: None,
                expect: &[204, 404],
            })
            .await;
        events.push(FaultEvent {
            at: started.elapsed().as_secs_f64(),
            name: name.to_owned(),
            action: "off",
            params: serde_json::Map::new(),
            refused: reply.failure,
        });
    }
    events
}

/// Once a second: the current rate, failures and latency of the last five seconds, on one
/// redrawn line on a terminal, or a plain line every five seconds otherwise.
async fn show_progress(recorder: Recorder, in_flight: Arc<AtomicUsize>, duration: Duration) {
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new(duration.as_secs());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:24}] {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut seconds = 0u64;
    loop {
        tick.tick().await;
        seconds += 1;
        let line = recorder.with(|s| progress_line(s, in_flight.load(Ordering::Relaxed)));
        match &bar {
            Some(bar) => {
                bar.set_position(seconds.min(duration.as_secs()));
                bar.set_message(line);
            }
            None if seconds.is_multiple_of(5) => say(format_args!("load: {seconds}s {line}")),
            None => {}
        }
    }
}

fn progress_line(stats: &Stats, in_flight: usize) -> String {
    let done = stats.started.elapsed().as_secs() as usize;
    let window = stats.seconds.iter().take(done).rev().take(5);
    let mut latency = None::<hdrhistogram::Histogram<u64>>;
    let (mut requests, mut failures, mut n) = (0u64, 0u64, 0u64);
    for second in window {
        requests += second.requests;
        failures += second.failures;
        n += 1;
        match &mut latency {
            Some(h) => {
                let _ = h.add(&second.latency);
            }
            None => latency = Some(second.latency.clone()),
        }
    }
    let (p50, p99) = latency
        .map(|h| (quantile_ms(&h, 0.5), quantile_ms(&h, 0.99)))
        .unwrap_or_default();
    format!(
        "{:.0} req/s, {failures} failed, p50 {p50:.1} ms, p99 {p99:.1} ms (last {n} s), {in_flight} in flight",
        requests as f64 / n.max(1) as f64
    )
}
