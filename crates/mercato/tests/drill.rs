//! Fault drills and the verifier, end to end: the real `mercato up` on its embedded backends,
//! driven by the real `mercato load` with faults switched on through the admin API, and
//! `mercato verify` checking the books afterwards; then a copy of the data corrupted three
//! ways, which the verifier must name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

const ADMIN_EMAIL: &str = "drill-admin@example.com";
const ADMIN_PASSWORD: &str = "a drill administrator password";

/// A running `mercato up`; dropping it (a failed assertion included) stops the process.
struct Platform {
    child: Child,
    gateway: String,
    ops: String,
}

impl Platform {
    fn start(data: &Path) -> Platform {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mercato"));
        cmd.arg("--data-dir").arg(data).args(["up", "--no-demo"]);
        for svc in [
            "GATEWAY",
            "USERS",
            "PRODUCTS",
            "ORDERS",
            "PAYMENTS",
            "NOTIFICATIONS",
            "ANALYTICS",
        ] {
            cmd.env(format!("MERCATO_{svc}__PORT"), "0");
        }
        // One load generator on one address, far faster than a person: the gateway's rate
        // limits and the unpaid-order quota are off (as scripts/lib/limits.sh does).
        for limit in ["PER_ADDRESS", "PER_USER", "SIGN_IN", "READS", "WRITES"] {
            cmd.env(format!("MERCATO_RATE_LIMIT__{limit}_PER_SEC"), "0");
        }
        cmd.env("MERCATO_LIMITS__MAX_PENDING_ORDERS_PER_USER", "0")
            .env("MERCATO_LIMITS__MAX_PENDING_UNITS_PER_USER", "0")
            .env("MERCATO_OPS__PORT", "0")
            .env("MERCATO_AUTH__ADMIN_EMAIL", ADMIN_EMAIL)
            .env("MERCATO_AUTH__ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("MERCATO_LOG__LEVEL", "warn")
            // Abandoned orders expire within the drill, so "nothing stuck" is really checked.
            .env("MERCATO_SAGA__PENDING_ORDER_TTL_SECS", "15")
            .env("MERCATO_SAGA__SWEEP_INTERVAL_MS", "500")
            .env("MERCATO_ENVIRONMENT", "development");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("mercato starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut gateway, mut ops) = (None, None);
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.trim().strip_prefix("gateway") {
                gateway = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.trim().strip_prefix("operations") {
                ops = rest.split_whitespace().next().map(str::to_owned);
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        let mut platform = Platform {
            child,
            gateway: gateway.unwrap_or_default(),
            ops: ops.unwrap_or_default(),
        };
        if platform.gateway.is_empty() || platform.ops.is_empty() {
            platform.stop();
            panic!(
                "mercato did not print its banner; see {}",
                data.with_extension("log").display()
            );
        }
        platform
    }

    /// SIGTERM and wait: a clean stop, so the SQLite files can be copied.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    /// `mercato <args>` against this platform, as its administrator.
    fn tool(&self, args: &[&str]) -> Output {
        common::mercato_tool(&self.gateway, (ADMIN_EMAIL, ADMIN_PASSWORD), args)
    }

    fn metrics(&self) -> String {
        format!("{}/metrics", self.ops)
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in the report"))
}

/// The drill: 60 s of mixed traffic at a fixed rate, the payment provider failing a
/// fifth of its calls throughout and the stream publisher failing for 10 s in the middle;
/// the verifier must pass, and the report must show the failures and the recovery.
#[test]
fn a_fault_drill_keeps_the_books() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(&dir.path().join("data"));
    let report = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let run_file = dir.path().join("run.json");
    let metrics = platform.metrics();
    let output = platform.tool(&[
        "load",
        "--rate",
        "8/s",
        "--duration",
        "60s",
        "--think",
        "100ms..400ms",
        "--customers",
        "40",
        "--products",
        "6",
        "--stock",
        "100000",
        "--fault",
        "payment-timeout:rate=0.2",
        "--fault",
        "stream-publish:seconds=10@25s",
        "--report-json",
        report.to_str().unwrap(),
        "--report-html",
        html.to_str().unwrap(),
        "--run-file",
        run_file.to_str().unwrap(),
        "--metrics",
        &metrics,
        "--verify",
        "--settle",
        "90s",
        "--expiry-grace",
        "10s",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the drill or its verification failed:\n{stdout}"
    );
    assert!(stdout.contains("all passed"), "{stdout}");

    let report = read_json(&report);
    // Both faults were taken by the platform, the stream's 25 s in.
    let faults = report["faults"].as_array().unwrap();
    for name in ["payment-timeout", "stream-publish"] {
        let on = faults
            .iter()
            .find(|f| f["name"] == name && f["action"] == "on")
            .unwrap_or_else(|| panic!("{name} was not switched on: {faults:?}"));
        assert!(on["refused"].is_null(), "{name} refused: {on}");
    }
    let stream_on = faults
        .iter()
        .find(|f| f["name"] == "stream-publish")
        .unwrap()["at"]
        .as_f64()
        .unwrap();
    assert!(
        (24.0..30.0).contains(&stream_on),
        "stream fault at {stream_on} s"
    );

    // The payment failures are in the report, by kind, at about the injected fifth.
    let pay = step(&report, "pay");
    let attempts = pay["requests"].as_u64().unwrap();
    let injected: u64 = pay["failures"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(kind, _)| kind.starts_with("503"))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert!(attempts >= 50, "only {attempts} payments in a minute");
    let share = injected as f64 / attempts as f64;
    assert!(
        (0.05..0.40).contains(&share),
        "{injected} of {attempts} payments failed; the fault asked for a fifth"
    );
    // Order creation never failed: the stream's outage is absorbed by the outbox.
    assert_eq!(step(&report, "create order")["failed"], 0, "{report}");

    // The recovery: the outbox grew while the stream was down and drained after it.
    let pipeline = report["pipeline"].as_array().unwrap();
    let backlog_at = |from: f64, to: f64| {
        pipeline
            .iter()
            .filter(|p| (from..to).contains(&p["at"].as_f64().unwrap()))
            .map(|p| p["outbox_backlog"].as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    assert!(
        backlog_at(stream_on + 2.0, stream_on + 10.0) >= 5.0,
        "no backlog during the stream's outage: {pipeline:?}"
    );
    let recovered = report["outbox_recovered_at"].as_f64();
    assert!(
        recovered.is_some_and(|at| at > stream_on + 10.0 && at < 60.0),
        "the outbox did not recover after the outage: {recovered:?}, {pipeline:?}"
    );
    let html = std::fs::read_to_string(&html).unwrap();
    assert!(html.contains("<svg") && html.contains("payment-timeout"));
}

/// A copy of a run's data with a notification deleted, a stock count changed and an order
/// duplicated: `mercato verify` must fail and name each one. The same run's data before the
/// corruption passes, so the names come from the corruption and not from noise.
#[test]
fn the_verifier_names_each_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("data");
    let run_file = dir.path().join("run.json");
    let mut platform = Platform::start(&original);
    let output = platform.tool(&[
        "load",
        "--rate",
        "10/s",
        "--duration",
        "4s",
        "--think",
        "0s",
        "--mix",
        "buy=3,abandon=1,cancel=1",
        "--customers",
        "5",
        "--products",
        "3",
        "--run-file",
        run_file.to_str().unwrap(),
        "--verify",
        "--settle",
        "30s",
    ]);
    assert!(output.status.success(), "the clean run did not verify");
    platform.stop();

    let copy = dir.path().join("corrupted");
    copy_dir(&original, &copy);
    let run = read_json(&run_file);
    let sku = run["products"][0]["sku"].as_str().unwrap().to_owned();

    let notifications = rusqlite::Connection::open(copy.join("notifications.db")).unwrap();
    let unnotified: String = notifications
        .query_row(
            "DELETE FROM notifications WHERE id = (SELECT id FROM notifications \
             WHERE event_type = 'order.created' ORDER BY created_at LIMIT 1) RETURNING order_id",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(notifications);
    let products = rusqlite::Connection::open(copy.join("products.db")).unwrap();
    assert_eq!(
        products
            .execute(
                "UPDATE products SET on_hand = on_hand + 5 WHERE sku = ?1",
                [&sku]
            )
            .unwrap(),
        1
    );
    drop(products);
    let orders = rusqlite::Connection::open(copy.join("orders.db")).unwrap();
    let original_order: String = orders
        .query_row(
            "SELECT id FROM orders ORDER BY created_at LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let duplicate = uuid::Uuid::new_v4().to_string();
    orders
        .execute(
            "INSERT INTO orders SELECT ?1, user_id, status, total_cents, currency, \
             shipping_address, created_at, updated_at, expires_at FROM orders WHERE id = ?2",
            [&duplicate, &original_order],
        )
        .unwrap();
    orders
        .execute(
            "INSERT INTO order_items SELECT ?1, product_id, quantity, unit_price_cents \
             FROM order_items WHERE order_id = ?2",
            [&duplicate, &original_order],
        )
        .unwrap();
    drop(orders);

    let platform = Platform::start(&copy);
    let verdict = dir.path().join("verdict.json");
    let output = platform.tool(&[
        "verify",
        "--run-file",
        run_file.to_str().unwrap(),
        "--settle",
        "2s",
        "--verdict-json",
        verdict.to_str().unwrap(),
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "the verifier passed corrupted data"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "order {unnotified} has 0 order.created notifications"
        )),
        "the deleted notification is not named:\n{stdout}"
    );
    assert!(
        stdout.contains(&sku) && stdout.contains("initial stock"),
        "the changed stock is not named:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("order {duplicate} of load customer")),
        "the duplicated order is not named:\n{stdout}"
    );
    let verdict = read_json(&verdict);
    assert_eq!(verdict["passed"], false);
}

fn copy_dir(from: &Path, to: &PathBuf) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
