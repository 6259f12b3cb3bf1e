//! `mercato`: the command line. `mercato up` (the default) runs the whole platform in one
//! process; `mercato serve <service>` runs one service, wired to the others by URL.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kit::config::Settings;
use mercato::startup::{self, ServiceName};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "mercato", version, about = "The Mercato e-commerce platform")]
struct Cli {
    /// Configuration file (default: ./mercato.toml when present).
    #[arg(long, global = true, env = "MERCATO_CONFIG")]
    config: Option<PathBuf>,
    /// Where embedded databases live.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run all seven services in this process (the default).
    Up {
        /// Do not seed the demo catalog (and demo accounts) into an empty store.
        #[arg(long)]
        no_demo: bool,
        /// Turn access control off, as the seed's platform ran (auth.mode = "open").
        #[arg(long)]
        open: bool,
    },
    /// Run one service; the others are reached at their configured URLs.
    Serve {
        #[arg(value_enum)]
        service: ServiceName,
        #[arg(long)]
        no_demo: bool,
        /// Turn access control off (auth.mode = "open").
        #[arg(long)]
        open: bool,
    },
    /// Accounts and keys.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Analytics tools.
    Analytics {
        #[command(subcommand)]
        command: AnalyticsCommand,
    },
    /// Drive a running platform with weighted shop journeys (an open arrival rate or fixed
    /// users), optionally injecting faults, and report latency per step; `--verify` checks
    /// the books afterwards.
    Load(Box<load::LoadArgs>),
    /// Check a running platform's invariants (stock, orders, notifications, analytics, money,
    /// expiry, drained pipelines); exits non-zero with a list when any fails.
    Verify(Box<load::VerifyArgs>),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create an administrator in the users store the settings name (or make an existing
    /// account one). The password is read from the first line of standard input, or generated
    /// and printed when standard input is a terminal or empty.
    Create {
        #[arg(long)]
        email: String,
    },
    /// Start a new token signing key in `<data dir>/auth/`; the previous one stays published
    /// until its last token expires. Restart the users service to sign with the new key.
    RotateKey,
}

#[derive(Debug, Subcommand)]
enum AnalyticsCommand {
    /// Run the windowing engine over a file of order events (the seed's JSON, one per line)
    /// and write the windows to OUTPUT/windows.jsonl.
    Replay {
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "analytics-replay")]
        output: PathBuf,
    },
    /// Merge the final windows several analytics instances wrote under one results location
    /// (`file:///dir`, a directory, `s3://…`, `gs://…`) into one window per minute, as JSON lines.
    Merge {
        /// The instances' shared `analytics_engine.results_url`.
        #[arg(long)]
        input: String,
        /// Where to write the merged windows; stdout when absent.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

/// Prints to stdout, ignoring a closed stdout (a supervisor that stopped reading must not
/// turn a clean shutdown into a panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The load tools are clients of a platform somewhere else: no settings of this one.
    match cli.command {
        Some(Command::Load(args)) => return client_tool(load::load_command(*args)),
        Some(Command::Verify(args)) => return client_tool(load::verify_command(*args)),
        _ => {}
    }
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(dir) = cli.data_dir {
        settings.data_dir = dir;
    }
    let (services, no_demo, open): (Vec<ServiceName>, bool, bool) = match cli.command {
        None => (ServiceName::ALL.to_vec(), false, false),
        Some(Command::Up { no_demo, open }) => (ServiceName::ALL.to_vec(), no_demo, open),
        Some(Command::Serve {
            service,
            no_demo,
            open,
        }) => (vec![service], no_demo, open),
        Some(Command::Admin {
            command: AdminCommand::Create { email },
        }) => return create_admin(&settings, &email),
        Some(Command::Admin {
            command: AdminCommand::RotateKey,
        }) => {
            let kid = kit::auth::keys::rotate_in_dir(&settings.data_dir.join("auth"))?;
            say!(
                "new signing key {kid} in {}",
                settings.data_dir.join("auth").display()
            );
            return Ok(());
        }
        Some(Command::Analytics {
            command: AnalyticsCommand::Replay { input, output },
        }) => return replay(&settings, &input, &output),
        Some(Command::Analytics {
            command: AnalyticsCommand::Merge { input, output },
        }) => return merge(&input, output.as_deref()),
        // Answered above, before any settings were read.
        Some(Command::Load(_) | Command::Verify(_)) => return Ok(()),
    };
    if no_demo {
        settings.demo = false;
    }
    if open {
        settings.auth.mode = kit::config::AuthMode::Open;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Spans of no service (start-up) go under the one service `serve` runs, else `mercato`.
    let process = match services.as_slice() {
        [one] => one.as_str(),
        _ => "mercato",
    };
    let telemetry = {
        let _inside = runtime.enter();
        kit::telemetry::init(&settings.log, process)
    };
    let result = runtime.block_on(run(settings, services));
    telemetry.shutdown();
    result
}

/// Runs `mercato load` or `mercato verify`: status 1 when a check failed, 2 when the run could
/// not be made.
fn client_tool(
    command: impl std::future::Future<Output = Result<bool, load::LoadError>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match runtime.block_on(command) {
        Ok(true) => Ok(()),
        Ok(false) => std::process::exit(1),
        // A client's error is a sentence for its user (a refused sign-in, a bad plan), not a
        // crash: no backtrace, and status 2 so a script can tell it from failed checks.
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "mercato: {e}");
            std::process::exit(2)
        }
    }
}

/// `mercato admin create`: an administrator in the users store.
fn create_admin(settings: &Settings, email: &str) -> anyhow::Result<()> {
    use std::io::{BufRead as _, IsTerminal as _};
    let mut line = String::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
    }
    let typed = line.trim_end_matches(['\r', '\n']).to_owned();
    let (password, generated) = if typed.is_empty() {
        (users::bootstrap::random_password()?, true)
    } else {
        (typed, false)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let store = startup::open_users_store(settings).await?;
        let hasher = users::password::Hasher::new(1)?;
        let (user, outcome) =
            users::bootstrap::ensure_admin(store.as_ref(), &hasher, email, &password).await?;
        store.close().await;
        let what = match outcome {
            users::bootstrap::AdminOutcome::Created => "created",
            users::bootstrap::AdminOutcome::Promoted => "promoted to administrator",
        };
        say!("{} ({}) {what}", user.email, user.id);
        if generated {
            say!("password: {password}");
        }
        anyhow::Ok(())
    })
}

fn replay(
    settings: &Settings,
    input: &std::path::Path,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    let windows = analytics::engine::Windows::of_secs(settings.analytics_engine.window_secs)
        .context("analytics_engine.window_secs must be positive")?;
    let lateness =
        analytics::engine::Lateness::of_secs(settings.analytics_engine.allowed_lateness_secs)
            .context("analytics_engine.allowed_lateness_secs must not be negative")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(analytics::replay::replay(input, output, windows, lateness))?;
    let rate = report.lines as f64 / report.elapsed.as_secs_f64().max(1e-9);
    say!(
        "replayed {} events ({} new, {} late) into {} windows in {:.2} s: {:.0} events/s; {}",
        report.lines,
        report.applied,
        report.late,
        report.windows,
        report.elapsed.as_secs_f64(),
        rate,
        output.join("windows.jsonl").display()
    );
    Ok(())
}

fn merge(input: &str, output: Option<&std::path::Path>) -> anyhow::Result<()> {
    use analytics::results::ObjectSink;
    let sink = if input.contains("://") {
        ObjectSink::from_url(input)
    } else {
        ObjectSink::local_dir(std::path::Path::new(input))
    }
    .with_context(|| format!("opening {input}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let merged = runtime.block_on(analytics::results::merge_objects(&sink))?;
    let mut lines = String::new();
    for window in &merged {
        lines.push_str(&serde_json::to_string(&window.report(true))?);
        lines.push('\n');
    }
    match output {
        Some(path) => {
            std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?
        }
        None => say!("{}", lines.trim_end()),
    }
    Ok(())
}

async fn run(settings: Settings, services: Vec<ServiceName>) -> anyhow::Result<()> {
    let platform = startup::start(&settings, &services).await?;
    let width = 14;
    say!(
        "Mercato is up: {} service(s) listening after {} ms; data in {}",
        platform.addresses.len(),
        platform.startup.as_millis(),
        settings.data_dir.display()
    );
    for (service, addr) in &platform.addresses {
        say!("  {:<width$} http://{addr}", service.as_str());
    }
    say!(
        "  {:<width$} http://{} (/ready, /metrics)",
        "operations",
        platform.ops_addr
    );
    if settings.auth.mode == kit::config::AuthMode::Open {
        say!("WARNING: access control is OFF (open mode): anyone may read and change everything.");
    }
    if let Some(demo) = &platform.demo_accounts {
        if demo.created.is_empty() {
            say!("Demo accounts: see {}", demo.file.display());
        } else {
            say!("Demo accounts (kept in {}):", demo.file.display());
            for (email, password) in &demo.created {
                say!("  {email}  password {password}");
            }
        }
    }
    if let Some(gateway) = platform.url(ServiceName::Gateway) {
        say!("Try: curl {gateway}/api/v1/products");
    }
    say!("Press Ctrl-C to stop.");
    tracing::info!(
        startup_ms = platform.startup.as_millis() as u64,
        "mercato started"
    );
    kit::server::shutdown_signal().await;
    say!("Stopping...");
    platform.stop().await;
    say!("Stopped.");
    Ok(())
}
