//! What an order costs on DynamoDB in requests (round trips; the bill counts units, see
//! docs/benchmarks.md): orders, payments and notifications on the server at
//! `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts moto), the platform's
//! `dynamodb_requests_total` read before and after a burst of orders, the requests the idle
//! pollers make in that time taken off; and the write units they bill
//! (`dynamodb_write_units_total`, DynamoDB's sizing rules applied to each item written). Fails
//! when an order costs more of either than docs/benchmarks.md documents. Alone in its binary:
//! the counters are process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The most DynamoDB requests one order may cost, all told: its creation (Idempotency-Key
/// record, the order with its outbox rows in one transaction), the relay's publication, and
/// the notifier's record (docs/benchmarks.md, "DynamoDB requests per order").
#[cfg(feature = "dynamodb")]
const MAX_REQUESTS_PER_ORDER: f64 = 5.0;

/// The most write units one order may bill, all told (DynamoDB's sizing rules applied to each
/// item written, `bus::dynamo::write_units`; docs/benchmarks.md).
#[cfg(feature = "dynamodb")]
const MAX_WRITE_UNITS_PER_ORDER: f64 = 13.0;

#[cfg(feature = "dynamodb")]
fn requests_by_operation(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    by_operation(metrics, "dynamodb_requests_total{")
}

#[cfg(feature = "dynamodb")]
fn write_units_by_operation(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    by_operation(metrics, "dynamodb_write_units_total{")
}

#[cfg(feature = "dynamodb")]
fn by_operation(metrics: &str, series: &str) -> std::collections::BTreeMap<String, f64> {
    let mut found = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix(series) {
            let (labels, value) = rest.rsplit_once("} ").unwrap();
            let operation = labels
                .split(',')
                .find_map(|l| l.strip_prefix("operation=\""))
                .unwrap()
                .trim_end_matches('"');
            *found.entry(operation.to_owned()).or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    found
}

#[cfg(feature = "dynamodb")]
fn gauge(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse().unwrap())
}

#[cfg(feature = "dynamodb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_costs_a_bounded_number_of_dynamodb_requests() {
    use std::time::{Duration, Instant};

    use common::{eventually, scrape_metrics, spawn_with};
    use mercato::ServiceName;

    let dir = tempfile::tempdir().unwrap();
    let (settings, _) = common::on_dynamodb(&dir);
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let ops = app.platform.as_ref().unwrap().ops_url();
    let (user, _) = app.register("cost@example.com").await;
    let product = app.create_product("COST-1", "10.00", 100_000).await;

    let processed = |metrics: &str| {
        gauge(metrics, "notifications_processed_total{outcome=\"stored\"}").unwrap_or(0.0)
    };
    // Places `n` orders and waits until each is published and recorded by the notifier.
    let burst = |n: usize| {
        let (app, ops, user, product) = (&app, &ops, &user, &product);
        async move {
            let before = processed(&scrape_metrics(&app.client, ops).await);
            for _ in 0..n {
                app.place_order(user, &[(product.as_str(), 1)]).await;
            }
            let done = eventually(30, || async {
                let metrics = scrape_metrics(&app.client, ops).await;
                let drained = gauge(&metrics, "outbox_backlog{service=\"orders\"}") == Some(0.0);
                (drained && processed(&metrics) >= before + n as f64).then_some(())
            })
            .await;
            assert!(
                done.is_some(),
                "{n} orders were not published and recorded in 30 s"
            );
        }
    };
    burst(3).await; // tables, connections, caches

    // What the pollers cost with nothing to do.
    let idle_from = requests_by_operation(&scrape_metrics(&app.client, &ops).await);
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_to = requests_by_operation(&scrape_metrics(&app.client, &ops).await);
    let idle_secs = idle_started.elapsed().as_secs_f64();

    const ORDERS: usize = 40;
    let before = scrape_metrics(&app.client, &ops).await;
    let (from, units_from) = (
        requests_by_operation(&before),
        write_units_by_operation(&before),
    );
    let started = Instant::now();
    burst(ORDERS).await;
    let after = scrape_metrics(&app.client, &ops).await;
    let (to, units_to) = (
        requests_by_operation(&after),
        write_units_by_operation(&after),
    );
    let secs = started.elapsed().as_secs_f64();

    // Write units: the idle pollers only read, so all of these are the orders'.
    let units_per_order = |operation: &str| {
        (units_to.get(operation).unwrap_or(&0.0) - units_from.get(operation).unwrap_or(&0.0))
            / ORDERS as f64
    };
    let units: f64 = units_to.keys().map(|op| units_per_order(op)).sum();
    let unit_lines: Vec<String> = units_to
        .keys()
        .map(|op| format!("{op}: {:.2} write units per order", units_per_order(op)))
        .collect();
    eprintln!(
        "DynamoDB write units per order: {units:.2}\n{}",
        unit_lines.join("\n")
    );
    // The order's transaction puts the order, its counter shard and two outbox rows: 8 units
    // (twice 4) only while each is under 1 KB, which is also what makes the relay's leases
    // and deletes of those rows one unit each, as they are counted.
    assert_eq!(
        units_per_order("TransactWriteItems"),
        8.0,
        "the order's transaction: {unit_lines:?}"
    );
    assert!(
        units <= MAX_WRITE_UNITS_PER_ORDER,
        "an order bills {units:.2} write units, more than the documented {MAX_WRITE_UNITS_PER_ORDER}:\n{}",
        unit_lines.join("\n")
    );

    let mut total = 0.0;
    let mut lines = Vec::new();
    for (operation, count) in &to {
        let during = count - from.get(operation).unwrap_or(&0.0);
        let idle_rate = (idle_to.get(operation).unwrap_or(&0.0)
            - idle_from.get(operation).unwrap_or(&0.0))
            / idle_secs;
        let per_order = ((during - idle_rate * secs) / ORDERS as f64).max(0.0);
        total += per_order;
        lines.push(format!(
            "{operation}: {per_order:.2} per order ({during} in the burst, {idle_rate:.1}/s idle)"
        ));
    }
    eprintln!(
        "DynamoDB requests per order: {total:.2} ({ORDERS} orders in {secs:.2} s)\n{}",
        lines.join("\n")
    );
    assert!(
        total >= 1.0,
        "the counter counts nothing: {lines:?}\n{}",
        scrape_metrics(&app.client, &ops)
            .await
            .lines()
            .filter(|l| l.contains("dynamo"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        total <= MAX_REQUESTS_PER_ORDER,
        "an order costs {total:.2} DynamoDB requests, more than the documented {MAX_REQUESTS_PER_ORDER}:\n{}",
        lines.join("\n")
    );
    app.stop().await;
}
