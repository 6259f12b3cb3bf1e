//! The command lines `mercato load` and `mercato verify`: flags, the plan they make, and what
//! is written where (report on standard output, progress on standard error, files on request).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::LoadError;
use crate::journeys::Ledger;
use crate::plan::{self, Arrivals, FaultSpec, Plan, PlanFile, Rate, Span, Think};
use crate::report::Report;
use crate::run;
use crate::target::Target;
use crate::verify;

/// Where and as whom. `Debug` by hand: the password never reaches a log line.
#[derive(Clone, Args)]
pub struct Connection {
    /// The platform's public URL (the gateway, or an ingress in front of it).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub target: String,
    /// An administrator's e-mail (operator journeys, products, faults, the verifier).
    #[arg(long, env = "MERCATO_AUTH__ADMIN_EMAIL")]
    pub admin_email: String,
    /// The administrator's password.
    #[arg(long, env = "MERCATO_AUTH__ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: String,
    /// Per-request timeout.
    #[arg(long, default_value = "10s")]
    pub timeout: Span,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("admin_email", &self.admin_email)
            .field("admin_password", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What the verifier reads besides the API.
#[derive(Debug, Clone, Args)]
pub struct VerifyFlags {
    /// A services' /metrics URL whose outbox and queue gauges must reach 0 (repeatable; with
    /// `mercato up`, its operations listener's).
    #[arg(long = "metrics")]
    pub metrics: Vec<String>,
    /// How long the invariants may take to hold (events are asynchronous).
    #[arg(long, default_value = "60s")]
    pub settle: Span,
    /// How long past its expiry a pending order may stay before it counts as stuck.
    #[arg(long, default_value = "30s")]
    pub expiry_grace: Span,
    /// Write the verdict as JSON here.
    #[arg(long)]
    pub verdict_json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// A plan file (TOML): duration, rate or users, think, customers, products, stock, mix,
    /// faults. Flags override it.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// How long to generate load (default 60s).
    #[arg(long)]
    pub duration: Option<Span>,
    /// Open model: journeys started per second (`500/s`, `30/m`), whatever the server does.
    #[arg(long, conflicts_with = "users")]
    pub rate: Option<Rate>,
    /// Closed model: this many users, each starting a journey when the last one ends.
    #[arg(long)]
    pub users: Option<u32>,
    /// Think time between steps: `1s` or a range `200ms..2s` (default 200ms..1s).
    #[arg(long)]
    pub think: Option<Think>,
    /// Journeys and weights: `browse=40,buy=25,declined=5` (journeys: browse, register, buy,
    /// declined, network-failure, cancel, abandon, fulfil, refund, order).
    #[arg(long)]
    pub mix: Option<String>,
    /// Customers registered before the run, shared by its journeys (default 100).
    #[arg(long)]
    pub customers: Option<u32>,
    /// Products created for the run (default 10).
    #[arg(long)]
    pub products: Option<u32>,
    /// Units of each run product on the shelf at the start (default 1000000).
    #[arg(long)]
    pub stock: Option<u64>,
    /// Journeys in flight at most; arrivals beyond it are counted, not started (default 10000).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// A fault to switch on: `name[:key=value,...][@offset]`, e.g. `payment-timeout:rate=0.2`
    /// or `stream-publish:seconds=10@25s` (repeatable; names in docs/operations.md).
    #[arg(long = "fault")]
    pub faults: Vec<FaultSpec>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    /// Write the report as an HTML page with latency charts here.
    #[arg(long)]
    pub report_html: Option<PathBuf>,
    /// Write the run's ledger (what it created and saw accepted) here, for `mercato verify`.
    #[arg(long)]
    pub run_file: Option<PathBuf>,
    /// Check the invariants after the run (see `mercato verify`).
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub verify_flags: VerifyFlags,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// A run file `mercato load --run-file` wrote: adds the checks that need to know what the
    /// run created (initial stock, accepted orders). Without it the whole platform is checked
    /// with what holds for any history.
    #[arg(long)]
    pub run_file: Option<PathBuf>,
    #[command(flatten)]
    pub verify_flags: VerifyFlags,
}

impl LoadArgs {
    /// The plan: defaults, then the file, then the flags.
    pub fn plan(&self) -> Result<Plan, LoadError> {
        let file = match &self.plan {
            Some(path) => PlanFile::read(path)?,
            None => PlanFile::default(),
        };
        let bad = LoadError::Plan;
        let parse_span =
            |text: &Option<String>, what: &str| -> Result<Option<Duration>, LoadError> {
                text.as_deref()
                    .map(|t| {
                        t.parse::<Span>()
                            .map(|s| s.0)
                            .map_err(|e| bad(format!("{what}: {e}")))
                    })
                    .transpose()
            };
        let duration = match self.duration {
            Some(d) => d.0,
            None => parse_span(&file.duration, "duration")?.unwrap_or(Duration::from_secs(60)),
        };
        if duration.is_zero() {
            return Err(bad("the duration must be above 0".into()));
        }
        let arrivals = match (self.rate, self.users, &file.rate, file.users) {
            (Some(rate), _, _, _) => Arrivals::Rate(rate),
            (None, Some(users), _, _) => Arrivals::Users(users),
            (None, None, Some(rate), _) => Arrivals::Rate(rate.parse().map_err(bad)?),
            (None, None, None, Some(users)) => Arrivals::Users(users),
            (None, None, None, None) => Arrivals::Rate(Rate(10.0)),
        };
        if let Arrivals::Users(n) = arrivals
            && !(1..=100_000).contains(&n)
        {
            return Err(bad("users must be between 1 and 100000".into()));
        }
        let think = match (self.think, &file.think) {
            (Some(t), _) => t,
            (None, Some(t)) => t.parse().map_err(bad)?,
            (None, None) => Think {
                min: Duration::from_millis(200),
                max: Duration::from_secs(1),
            },
        };
        let mix = match (&self.mix, &file.mix) {
            (Some(text), _) => plan::parse_mix(text).map_err(bad)?,
            (None, Some(map)) => {
                let mut mix = std::collections::BTreeMap::new();
                for (name, weight) in map {
                    mix.insert(name.parse().map_err(bad)?, *weight);
                }
                plan::check_mix(mix).map_err(bad)?
            }
            (None, None) => plan::default_mix(),
        };
        let mut faults = Vec::new();
        for text in &file.faults {
            faults.push(text.parse::<FaultSpec>().map_err(bad)?);
        }
        faults.extend(self.faults.iter().cloned());
        if faults.len() > 32 {
            return Err(bad("at most 32 faults per run".into()));
        }
        let customers = self.customers.or(file.customers).unwrap_or(100);
        let products = self.products.or(file.products).unwrap_or(10);
        let stock = self.stock.or(file.stock).unwrap_or(1_000_000);
        if !(1..=10_000).contains(&customers)
            || !(1..=1_000).contains(&products)
            || stock > 1_000_000_000
        {
            return Err(bad(
                "customers must be 1..10000, products 1..1000 and stock at most 1000000000".into(),
            ));
        }
        let timeout = match parse_span(&file.timeout, "timeout")? {
            Some(t) if self.connection.timeout.0 == Duration::from_secs(10) => t,
            _ => self.connection.timeout.0,
        };
        Ok(Plan {
            duration,
            arrivals,
            think,
            mix,
            customers,
            products,
            stock,
            faults,
            max_in_flight: self
                .max_in_flight
                .or(file.max_in_flight)
                .unwrap_or(10_000)
                .max(1),
            timeout,
        })
    }
}

fn write(path: &PathBuf, content: &str) -> Result<(), LoadError> {
    std::fs::write(path, content).map_err(LoadError::io(format!("writing {}", path.display())))
}

fn print(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// `mercato load`: true when the run (and the verification, if asked) passed.
pub async fn load_command(args: LoadArgs) -> Result<bool, LoadError> {
    let plan = args.plan()?;
    let target = Target::new(&args.connection.target, plan.timeout)?;
    let admin = run::sign_in_admin(
        &target,
        &args.connection.admin_email,
        &args.connection.admin_password,
    )
    .await?;
    let finished = run::run(&plan, target.clone(), admin, &args.verify_flags.metrics).await?;
    let report = Report::new(&finished, plan.arrivals.to_string());
    print(&report.text());
    if let Some(path) = &args.report_json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| LoadError::Setup(e.to_string()))?;
        write(path, &json)?;
    }
    if let Some(path) = &args.report_html {
        write(path, &report.html())?;
    }
    if let Some(path) = &args.run_file {
        let json = serde_json::to_string_pretty(&finished.ledger)
            .map_err(|e| LoadError::Setup(e.to_string()))?;
        write(path, &json)?;
    }
    if !args.verify {
        return Ok(true);
    }
    let admin = run::sign_in_admin(
        &target,
        &args.connection.admin_email,
        &args.connection.admin_password,
    )
    .await?;
    let verdict = verify::verify(
        &target,
        &admin,
        &verify_options(Some(finished.ledger), &args.verify_flags),
    )
    .await?;
    finish_verdict(&verdict, &args.verify_flags)
}

/// `mercato verify`: true when every invariant holds.
pub async fn verify_command(args: VerifyArgs) -> Result<bool, LoadError> {
    let ledger = match &args.run_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(LoadError::io(format!("reading {}", path.display())))?;
            Some(serde_json::from_str::<Ledger>(&text).map_err(|e| {
                LoadError::Plan(format!(
                    "{} is not a run file of mercato load: {e}",
                    path.display()
                ))
            })?)
        }
        None => None,
    };
    let target = Target::new(&args.connection.target, args.connection.timeout.0)?;
    let admin = run::sign_in_admin(
        &target,
        &args.connection.admin_email,
        &args.connection.admin_password,
    )
    .await?;
    let verdict =
        verify::verify(&target, &admin, &verify_options(ledger, &args.verify_flags)).await?;
    finish_verdict(&verdict, &args.verify_flags)
}

fn verify_options(ledger: Option<Ledger>, flags: &VerifyFlags) -> verify::Options {
    verify::Options {
        ledger,
        metrics: flags.metrics.clone(),
        settle: flags.settle.0,
        expiry_grace: flags.expiry_grace.0,
    }
}

fn finish_verdict(verdict: &verify::Verdict, flags: &VerifyFlags) -> Result<bool, LoadError> {
    print(&verdict.text());
    if let Some(path) = &flags.verdict_json {
        let json =
            serde_json::to_string_pretty(verdict).map_err(|e| LoadError::Setup(e.to_string()))?;
        write(path, &json)?;
    }
    Ok(verdict.passed)
}
