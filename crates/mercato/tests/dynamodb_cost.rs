//! What an order costs on DynamoDB in requests (round trips; the bill counts units, see
//! docs/benchmarks.md): orders, payments and notifications on the server at
//! `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts moto), the platform's
//! `dynamodb_requests_total` read before and after a burst of orders, the requests the idle
//! pollers make in that time taken off. Fails when an order costs more than the
//! number docs/benchmarks.md documents. Alone in its binary: the counters are process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The most DynamoDB requests one order may cost, all told: its creation (Idempotency-Key
/// record, the order with its outbox rows in one transaction), the relay's publication, and
/// the notifier's record (docs/benchmarks.md, "DynamoDB requests per order").
#[cfg(feature = "dynamodb")]
const MAX_REQUESTS_PER_ORDER: f64 = 5.0;

#[cfg(feature = "dynamodb")]
fn requests_by_operation(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut found = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("dynamodb_requests_total{") {
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
    let from = requests_by_operation(&scrape_metrics(&app.client, &ops).await);
    let started = Instant::now();
    burst(ORDERS).await;
    let to = requests_by_operation(&scrape_metrics(&app.client, &ops).await);
    let secs = started.elapsed().as_secs_f64();

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
