//! Two replicas of each stateful service (products, orders, payments) on one PostgreSQL
//! database, as separate `mercato serve` processes behind one gateway that names both of each
//! (`http://a,http://b`), sharing the embedded bus: the oversell race across replicas, relays
//! on both replicas publishing each event once, each event delivered to one replica of its
//! consumer group only, and one orders replica SIGKILLed under load
//! with every accepted order and every event still there once (`mercato verify`).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ADMIN_EMAIL: &str = "replicas-admin@example.com";
const ADMIN_PASSWORD: &str = "a replicas administrator password";
/// The runs' traffic: orders, payments and cancels at 20 journeys/s from 10 customers.
const ORDER_HEAVY_RUN: [&str; 11] = [
    "load",
    "--rate",
    "20/s",
    "--think",
    "0s",
    "--mix",
    "order=2,buy=2,cancel=1",
    "--customers",
    "10",
    "--products",
    "3",
];
const SERVICES: [&str; 7] = [
    "users",
    "products",
    "orders",
    "payments",
    "notifications",
    "analytics",
    "gateway",
];

/// `n` distinct free ports: all held bound while they are chosen, so none is handed out twice.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One `mercato serve` process; dropping it kills it.
struct Replica {
    service: &'static str,
    port: u16,
    /// Its operations listener (`/ready`).
    ops: u16,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    replicas: Vec<Replica>,
    gateway: String,
    data: PathBuf,
}

impl Cluster {
    /// Users, notifications, analytics and the gateway once; products, orders and payments twice.
    fn start(data: &Path, database_url: &str) -> Cluster {
        let copies = |s: &str| {
            if matches!(s, "products" | "orders" | "payments") {
                2
            } else {
                1
            }
        };
        let replicas: usize = SERVICES.iter().map(|s| copies(s)).sum();
        let mut free = free_ports(replicas * 2).into_iter();
        let ports: Vec<(&'static str, Vec<u16>)> = SERVICES
            .iter()
            .map(|s| (*s, (0..copies(s)).filter_map(|_| free.next()).collect()))
            .collect();
        // Run alone, services need their keys configured (docs/deploy.md, "Identity keys").
        let keys = data.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        for key in ["signing-key.pem", "service-key.pem"] {
            let made = Command::new("openssl")
                .args(["genpkey", "-algorithm", "ed25519", "-out"])
                .arg(keys.join(key))
                .status()
                .expect("openssl makes the keys (apt-get install -y openssl)");
            assert!(made.success());
        }
        let mut cluster = Cluster {
            replicas: Vec::new(),
            gateway: String::new(),
            data: data.to_owned(),
        };
        for (service, ports_of) in &ports {
            for port in ports_of {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_mercato"));
                cmd.arg("--data-dir")
                    .arg(data)
                    .args(["serve", service, "--no-demo"]);
                for (other, their_ports) in &ports {
                    let urls: Vec<String> = their_ports
                        .iter()
                        .map(|p| format!("http://127.0.0.1:{p}"))
                        .collect();
                    let upper = other.to_uppercase();
                    cmd.env(format!("MERCATO_{upper}__URL"), urls.join(","));
                }
                cmd.env(
                    format!("MERCATO_{}__PORT", service.to_uppercase()),
                    port.to_string(),
                );
                if *service == "users" {
                    cmd.env(
                        "MERCATO_AUTH__SIGNING_KEY_FILE",
                        keys.join("signing-key.pem"),
                    );
                }
                if *service != "gateway" {
                    cmd.env(
                        "MERCATO_AUTH__SERVICE_KEY_FILE",
                        keys.join("service-key.pem"),
                    );
                }
                for limit in ["PER_ADDRESS", "PER_USER", "SIGN_IN", "READS", "WRITES"] {
                    cmd.env(format!("MERCATO_RATE_LIMIT__{limit}_PER_SEC"), "0");
                }
                let ops = free.next().unwrap();
                cmd.env("DATABASE_URL", database_url)
                    .env("MERCATO_OPS__PORT", ops.to_string())
                    .env("MERCATO_LOG__LEVEL", "warn")
                    .env("MERCATO_AUTH__ADMIN_EMAIL", ADMIN_EMAIL)
                    .env("MERCATO_AUTH__ADMIN_PASSWORD", ADMIN_PASSWORD)
                    .env("MERCATO_LIMITS__MAX_PENDING_ORDERS_PER_USER", "0")
                    .env("MERCATO_LIMITS__MAX_PENDING_UNITS_PER_USER", "0")
                    .env("MERCATO_BUS__VISIBILITY_TIMEOUT_MS", "2000")
                    .env("RUST_BACKTRACE", "0");
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data.join(format!("{service}-{port}.log")))
                    .unwrap();
                let child = cmd
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("mercato serve starts");
                cluster.replicas.push(Replica {
                    service,
                    port: *port,
                    ops,
                    child,
                });
                // Users first: the others read its public keys (JWKS) at start.
                if *service == "users" {
                    cluster.wait_ready(ops, *port, service);
                }
            }
        }
        for i in 0..cluster.replicas.len() {
            let r = &cluster.replicas[i];
            cluster.wait_ready(r.ops, r.port, r.service);
        }
        let gateway = ports.iter().find(|(s, _)| *s == "gateway").unwrap().1[0];
        cluster.gateway = format!("http://127.0.0.1:{gateway}");
        cluster
    }

    /// Waits until the process's `/ready` answers 200 (its database, and the keys it reads).
    fn wait_ready(&self, ops: u16, port: u16, service: &str) {
        use std::io::{Read as _, Write as _};
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut answer = String::new();
        while Instant::now() < deadline {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", ops)) {
                let _ = stream.write_all(b"GET /ready HTTP/1.0\r\nHost: x\r\n\r\n");
                answer.clear();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self.data.join(format!("{service}-{port}.log")))
            .unwrap_or_default();
        let tail: String = log
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!("{service} on port {port} did not start (its /ready: {answer:?}):\n{tail}");
    }

    /// SIGKILL: no drain, no goodbye, as a node dying.
    fn kill(&mut self, service: &str) {
        let replica = self
            .replicas
            .iter_mut()
            .find(|r| r.service == service)
            .unwrap();
        let _ = replica.child.kill();
        let _ = replica.child.wait();
    }

    fn tool(&self, args: &[&str]) -> std::process::Output {
        common::mercato_tool(&self.gateway, (ADMIN_EMAIL, ADMIN_PASSWORD), args)
    }

    /// One number the embedded bus's file answers (`sql` with `params`).
    fn count_in_bus(&self, sql: &str, params: impl rusqlite::Params) -> i64 {
        let bus = rusqlite::Connection::open(self.data.join("bus.db")).unwrap();
        bus.busy_timeout(Duration::from_secs(10)).unwrap();
        bus.query_row(sql, params, |r| r.get(0)).unwrap()
    }

    /// Stream records that carry the same event id more than once (a row published twice).
    fn events_published_twice(&self) -> i64 {
        self.count_in_bus(
            "SELECT COUNT(*) - COUNT(DISTINCT json_extract(headers, '$.ce_id')) FROM stream_records",
            [],
        )
    }

    /// Records of `topic` in the embedded stream.
    fn records_of(&self, topic: &str) -> i64 {
        self.count_in_bus(
            "SELECT COUNT(*) FROM stream_records WHERE topic = ?1",
            [topic],
        )
    }

    fn stream_records(&self) -> i64 {
        self.count_in_bus("SELECT COUNT(*) FROM stream_records", [])
    }

    /// Records of `topic` handed to consumer group `group`, summed over the replicas of
    /// `service` (their `stream_records_delivered_total`).
    async fn delivered_to(&self, service: &str, topic: &str, group: &str) -> i64 {
        let client = reqwest::Client::new();
        let (topic, group) = (format!("topic=\"{topic}\""), format!("group=\"{group}\""));
        let mut total = 0;
        for replica in self.replicas.iter().filter(|r| r.service == service) {
            let ops = format!("http://127.0.0.1:{}", replica.ops);
            total += common::scrape_metrics(&client, &ops)
                .await
                .lines()
                .filter(|l| {
                    l.starts_with("stream_records_delivered_total{")
                        && l.contains(&topic)
                        && l.contains(&group)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as i64;
        }
        total
    }
}

async fn post(client: &reqwest::Client, url: String, token: &str, body: Value) -> (u16, Value) {
    let mut request = client.post(url).json(&body);
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn token(client: &reqwest::Client, gateway: &str, email: &str, password: &str) -> String {
    let answer = client
        .post(format!("{gateway}/api/v1/auth/token"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    let body: Value = answer.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_of_each_stateful_service_keep_every_promise() {
    let dir = tempfile::tempdir().unwrap();
    let database = common::FreshDatabase::create("mercato_replicas");
    let mut cluster = Cluster::start(dir.path(), &database.url);
    let gateway = cluster.gateway.clone();
    let client = reqwest::Client::new();
    let admin = token(&client, &gateway, ADMIN_EMAIL, ADMIN_PASSWORD).await;

    // 1. The oversell race across replicas: 200 orders of one unit on 50 units.
    let (status, product) = post(
        &client,
        format!("{gateway}/api/v1/products"),
        &admin,
        json!({"name": "Scarce", "price": 10.0, "stock": 50, "sku": "SCARCE-1"}),
    )
    .await;
    assert_eq!(status, 201, "{product}");
    let product = product["id"].as_str().unwrap().to_owned();
    let mut customers = Vec::new();
    for i in 0..10 {
        let email = format!("racer{i}@example.com");
        let (status, _) = post(
            &client,
            format!("{gateway}/api/v1/users"),
            "",
            json!({"name": "Racer", "email": email, "password": "a racing password"}),
        )
        .await;
        assert_eq!(status, 201);
        customers.push(token(&client, &gateway, &email, "a racing password").await);
    }
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (client, url, token, product) = (
            client.clone(),
            format!("{gateway}/api/v1/orders"),
            customers[i % customers.len()].clone(),
            product.clone(),
        );
        racers.spawn(async move {
            post(
                &client,
                url,
                &token,
                json!({"items": [{"product_id": product, "quantity": 1}], "shipping_address": "1 Race Road"}),
            )
            .await
        });
    }
    let mut accepted = 0;
    while let Some(status) = racers.join_next().await {
        match status.unwrap() {
            (201, _) => accepted += 1,
            (409, _) => {}
            (other, body) => panic!("an order in the race answered {other}: {body}"),
        }
    }
    assert_eq!(accepted, 50, "200 orders on 50 units across two replicas");
    let stock: Value = client
        .get(format!("{gateway}/api/v1/products/{product}/stock"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (stock["reserved"].as_i64(), stock["available"].as_i64()),
        (Some(50), Some(0))
    );

    // 2. Both replicas' relays at work on the same outboxes: each event published once.
    let run = dir.path().join("steady.json");
    let steady = cluster.tool(
        &[
            &ORDER_HEAVY_RUN[..],
            &["--duration", "8s", "--run-file", run.to_str().unwrap()],
            &["--verify", "--settle", "60s"],
        ]
        .concat(),
    );
    assert!(
        steady.status.success(),
        "the steady run on two replicas did not verify"
    );
    assert!(
        cluster.stream_records() > 100,
        "too few events to say anything"
    );
    assert_eq!(
        cluster.events_published_twice(),
        0,
        "a row was published twice"
    );
    // Both orders replicas are members of one consumer group on the payments topic: each
    // payment event went to one of them, once (the group's partitions are leased to one
    // member at a time), not to both.
    let payments = cluster.records_of("payments");
    assert!(payments > 20, "too few payment events to say anything");
    let all_delivered = common::eventually(30, || async {
        let delivered = cluster
            .delivered_to("orders", "payments", "orders-status")
            .await;
        assert!(
            delivered <= payments,
            "{delivered} deliveries of {payments} payment events to the orders replicas"
        );
        (delivered == payments).then_some(())
    })
    .await;
    if all_delivered.is_none() {
        assert_eq!(
            cluster
                .delivered_to("orders", "payments", "orders-status")
                .await,
            payments,
            "every payment event delivered once to the orders group"
        );
    }

    // 3. One orders replica SIGKILLed in the middle of a run: every accepted order exists
    // once, every event reached each consumer once (the verifier), the other replica and
    // the gateway carry on.
    let run = dir.path().join("killed.json");
    let load = {
        let (gateway, run) = (gateway.clone(), run.clone());
        std::thread::spawn(move || {
            let args = [
                &ORDER_HEAVY_RUN[..],
                &["--duration", "10s", "--run-file", run.to_str().unwrap()],
            ]
            .concat();
            common::mercato_tool(&gateway, (ADMIN_EMAIL, ADMIN_PASSWORD), &args)
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.kill("orders");
    let load = load.join().unwrap();
    assert!(
        load.status.success(),
        "the run under the kill could not be made"
    );
    let verdict = cluster.tool(&[
        "verify",
        "--run-file",
        run.to_str().unwrap(),
        "--settle",
        "90s",
    ]);
    assert!(
        verdict.status.success(),
        "the books after the kill do not balance:\n{}{}",
        String::from_utf8_lossy(&verdict.stdout),
        String::from_utf8_lossy(&verdict.stderr)
    );
    let report = String::from_utf8_lossy(&load.stdout);
    assert!(report.contains("orders accepted"), "{report}");
}
