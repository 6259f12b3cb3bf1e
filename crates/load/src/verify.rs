//! The books after a run, read back through the API as an administrator (so it works against
//! any deployment): stock adds up, every accepted order exists once, every order has its one
//! `order.created` notification, analytics counts the orders per window, money charged minus
//! refunded is the value of the paid orders, nothing is stuck past its expiry, and the outbox
//! and queues drain. Checked again every second until it holds or `settle` ends, because
//! events are asynchronous; the last pass's problems are the answer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound as _, Utc};
use futures_util::StreamExt as _;
use kit::Money;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::LoadError;
use crate::journeys::{Account, Ledger};
use crate::target::{Call, Target};

/// Requests the verifier has in flight at once.
const CONCURRENCY: usize = 16;
/// Problems listed per check (the count says how many more).
const LISTED: usize = 50;

pub struct Options {
    /// The run's ledger; without it, the checks that need one (initial stock, accepted orders)
    /// are skipped and the others cover the whole platform.
    pub ledger: Option<Ledger>,
    /// Prometheus endpoints (the services' operations listeners) whose outbox and queue
    /// gauges must reach zero.
    pub metrics: Vec<String>,
    pub settle: Duration,
    /// How long past its `expires_at` a pending order may stay before it counts as stuck (the
    /// sweeper runs every `saga.sweep_interval_ms`).
    pub expiry_grace: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    /// What was checked, in one line.
    pub summary: String,
    pub problems: Vec<String>,
    /// Problems beyond the listed ones.
    pub more: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub passed: bool,
    pub checks: Vec<Check>,
}

impl Verdict {
    pub fn text(&self) -> String {
        let failed = self.checks.iter().filter(|c| !c.passed).count();
        let mut out = format!(
            "verify: {} checks, {}\n",
            self.checks.len(),
            if failed == 0 {
                "all passed".to_owned()
            } else {
                format!("{failed} failed")
            }
        );
        for check in &self.checks {
            let mark = if check.passed { "ok  " } else { "FAIL" };
            out.push_str(&format!("  {mark} {}: {}\n", check.name, check.summary));
            for problem in &check.problems {
                out.push_str(&format!("         - {problem}\n"));
            }
            if check.more > 0 {
                out.push_str(&format!("         … and {} more\n", check.more));
            }
        }
        out
    }
}

/// Checks until every invariant holds or `options.settle` has passed.
pub async fn verify(
    target: &Target,
    admin: &Account,
    options: &Options,
) -> Result<Verdict, LoadError> {
    let deadline = Instant::now() + options.settle;
    loop {
        let verdict = verify_once(target, admin, options).await?;
        if verdict.passed || Instant::now() >= deadline {
            return Ok(verdict);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[derive(Debug, Clone, Deserialize)]
struct OrderLine {
    product_id: Uuid,
    quantity: i64,
}

#[derive(Debug, Clone, Deserialize)]
struct Order {
    id: Uuid,
    user_id: Uuid,
    status: String,
    items: Vec<OrderLine>,
    total_amount: Money,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
struct Stock {
    product_id: Uuid,
    sku: String,
    on_hand: i64,
    reserved: i64,
    available: i64,
}

#[derive(Debug, Deserialize)]
struct Payment {
    status: String,
    amount: Money,
    refunded_amount: Money,
}

#[derive(Debug, Deserialize)]
struct Notification {
    event_id: Uuid,
    event_type: String,
}

#[derive(Debug, Deserialize)]
struct Window {
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    order_count: i64,
}

/// Statuses whose units have left the shelf (committed at payment; a refund gives money back,
/// not goods).
const SOLD: [&str; 4] = ["paid", "shipped", "delivered", "refunded"];
/// Statuses holding a reservation.
const HOLDING: [&str; 2] = ["pending", "payment_failed"];
/// Statuses whose order was paid and not refunded.
const PAID: [&str; 3] = ["paid", "shipped", "delivered"];

async fn verify_once(
    target: &Target,
    admin: &Account,
    options: &Options,
) -> Result<Verdict, LoadError> {
    let token = admin.token();
    let users: Vec<Uuid> = read_pages::<IdOnly>(target, &token, "/api/v1/users?limit=1000")
        .await?
        .into_iter()
        .map(|u| u.id)
        .collect();
    // Every user's orders: stock and analytics are about all orders, whoever placed them.
    let orders: Vec<Order> = futures_util::stream::iter(users.iter().copied())
        .map(|user| {
            let token = token.clone();
            async move { read_orders(target, &token, user).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<Vec<Order>>, LoadError>>()?
        .into_iter()
        .flatten()
        .collect();

    let ledger = options.ledger.as_ref();
    // The orders the per-order checks read back: the run's users', or everyone's.
    let run_users: Option<HashSet<Uuid>> = ledger.map(|l| l.users.iter().copied().collect());
    let in_scope: Vec<&Order> = orders
        .iter()
        .filter(|o| run_users.as_ref().is_none_or(|u| u.contains(&o.user_id)))
        .collect();

    let mut checks = Vec::new();
    if let Some(ledger) = ledger {
        checks.push(accepted_orders_exist_once(ledger, &in_scope));
    }
    checks.push(stock_adds_up(target, &token, ledger, &orders).await?);
    let (notifications, money) = per_order_checks(target, &token, &in_scope).await?;
    checks.push(notifications);
    checks.push(money);
    checks.push(analytics_counts_orders(target, &token, ledger, &orders).await?);
    checks.push(nothing_stuck(&in_scope, options.expiry_grace));
    checks.push(pipelines_drained(target, &options.metrics).await);
    Ok(Verdict {
        passed: checks.iter().all(|c| c.passed),
        checks,
    })
}

#[derive(Deserialize)]
struct IdOnly {
    id: Uuid,
}

/// `GET path` as `T`, with the next page's path from its Link header.
async fn get_json<T: serde::de::DeserializeOwned>(
    target: &Target,
    token: &str,
    path: &str,
) -> Result<(T, Option<String>), LoadError> {
    let reply = target.call(Call::get(path, Some(token.to_owned()))).await;
    if let Some(failure) = reply.failure {
        return Err(LoadError::Target {
            what: format!("{failure} to GET {path}"),
            detail: "the verifier reads as an administrator".into(),
        });
    }
    let value = reply.json().map_err(|detail| LoadError::Target {
        what: format!("GET {path}"),
        detail,
    })?;
    Ok((value, reply.next))
}

/// Every item of a list route, following its `Link: rel="next"` pages.
async fn read_pages<T: serde::de::DeserializeOwned>(
    target: &Target,
    token: &str,
    first: &str,
) -> Result<Vec<T>, LoadError> {
    let mut items = Vec::new();
    let mut next = Some(first.to_owned());
    while let Some(path) = next.take() {
        let (page, after): (Vec<T>, _) = get_json(target, token, &path).await?;
        items.extend(page);
        next = after;
    }
    Ok(items)
}

async fn read_orders(target: &Target, token: &str, user: Uuid) -> Result<Vec<Order>, LoadError> {
    #[derive(Deserialize)]
    struct UserOrders {
        orders: Vec<Order>,
    }
    let mut orders = Vec::new();
    let mut next = Some(format!("/api/v1/orders/user/{user}?limit=1000"));
    while let Some(path) = next.take() {
        let (page, after): (UserOrders, _) = get_json(target, token, &path).await?;
        orders.extend(page.orders);
        next = after;
    }
    Ok(orders)
}

fn check(name: &'static str, summary: String, mut problems: Vec<String>) -> Check {
    let more = problems.len().saturating_sub(LISTED);
    problems.truncate(LISTED);
    Check {
        name,
        passed: problems.is_empty(),
        summary,
        problems,
        more,
    }
}

/// Each accepted order once; no order of a run user that the run never saw accepted, beyond
/// the creations whose answer it never got.
fn accepted_orders_exist_once(ledger: &Ledger, orders: &[&Order]) -> Check {
    let mut problems = Vec::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for order in orders {
        *seen.entry(order.id).or_default() += 1;
    }
    let by_id: HashMap<Uuid, &Order> = orders.iter().map(|o| (o.id, *o)).collect();
    let mut accepted = HashSet::new();
    for order in &ledger.accepted_orders {
        accepted.insert(order.id);
        match seen.get(&order.id).copied().unwrap_or(0) {
            0 => problems.push(format!(
                "order {} was accepted (201) but does not exist",
                order.id
            )),
            1 => {
                if let Some(found) = by_id.get(&order.id)
                    && found.total_amount != order.total_amount
                {
                    problems.push(format!(
                        "order {} was accepted for {} but now totals {}",
                        order.id, order.total_amount, found.total_amount
                    ));
                }
            }
            n => problems.push(format!("order {} exists {n} times", order.id)),
        }
    }
    let mut extra: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    for order in orders {
        if !accepted.contains(&order.id) {
            extra.entry(order.user_id).or_default().push(order.id);
        }
    }
    for (user, ids) in extra {
        let uncertain = ledger.uncertain_orders.get(&user).copied().unwrap_or(0) as usize;
        for id in ids.iter().skip(uncertain) {
            problems.push(format!(
                "order {id} of load customer {user} was never accepted by the run (a duplicate?)"
            ));
        }
    }
    check(
        "orders exist once",
        format!(
            "{} accepted orders, {} creations with an unknown outcome",
            ledger.accepted_orders.len(),
            ledger.uncertain_orders.values().sum::<u32>()
        ),
        problems,
    )
}

/// reserved = units of orders holding stock; available = on hand − reserved; and with a
/// ledger, initial on hand = available + reserved + sold.
async fn stock_adds_up(
    target: &Target,
    token: &str,
    ledger: Option<&Ledger>,
    orders: &[Order],
) -> Result<Check, LoadError> {
    let mut held: HashMap<Uuid, i64> = HashMap::new();
    let mut sold: HashMap<Uuid, i64> = HashMap::new();
    for order in orders {
        let tally = if HOLDING.contains(&order.status.as_str()) {
            &mut held
        } else if SOLD.contains(&order.status.as_str()) {
            &mut sold
        } else {
            continue;
        };
        for line in &order.items {
            *tally.entry(line.product_id).or_default() += line.quantity;
        }
    }
    let products: Vec<(Uuid, Option<i64>)> = match ledger {
        Some(l) => l
            .products
            .iter()
            .map(|p| (p.id, Some(p.initial_on_hand)))
            .collect(),
        None => read_pages::<IdOnly>(target, token, "/api/v1/products?limit=1000")
            .await?
            .into_iter()
            .map(|p| (p.id, None))
            .collect(),
    };
    let stocks: Vec<Result<(Stock, Option<i64>), LoadError>> =
        futures_util::stream::iter(products.iter().copied())
            .map(|(id, initial)| async move {
                let path = format!("/api/v1/products/{id}/stock");
                let (stock, _): (Stock, _) = get_json(target, token, &path).await?;
                Ok((stock, initial))
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    let mut problems = Vec::new();
    for result in stocks {
        let (stock, initial) = result?;
        let id = stock.product_id;
        let (held, sold) = (
            held.get(&id).copied().unwrap_or(0),
            sold.get(&id).copied().unwrap_or(0),
        );
        let sku = &stock.sku;
        if stock.reserved != held {
            problems.push(format!(
                "{sku} ({id}): {} units reserved, but unpaid orders hold {held}",
                stock.reserved
            ));
        }
        if stock.available != stock.on_hand - stock.reserved {
            problems.push(format!(
                "{sku} ({id}): available {} ≠ on hand {} − reserved {}",
                stock.available, stock.on_hand, stock.reserved
            ));
        }
        if let Some(initial) = initial
            && initial != stock.available + stock.reserved + sold
        {
            problems.push(format!(
                "{sku} ({id}): initial stock {initial} ≠ available {} + reserved {} + sold {sold} (= {})",
                stock.available,
                stock.reserved,
                stock.available + stock.reserved + sold
            ));
        }
    }
    let summary = match ledger {
        Some(_) => format!(
            "{} run products: initial = available + reserved + sold",
            products.len()
        ),
        None => format!(
            "{} products: reserved = units of unpaid orders",
            products.len()
        ),
    };
    Ok(check("stock adds up", summary, problems))
}

/// Per order: one `order.created` notification (and no event notified twice); charged −
/// refunded equal to the order's value when it is paid, and to zero otherwise.
async fn per_order_checks(
    target: &Target,
    token: &str,
    orders: &[&Order],
) -> Result<(Check, Check), LoadError> {
    type Read = Result<(Vec<Notification>, Vec<Payment>), LoadError>;
    let reads: Vec<(Uuid, Read)> = futures_util::stream::iter(orders.iter().map(|o| o.id))
        .map(|id| async move {
            let read: Read = async {
                let notifications: Vec<Notification> = read_pages(
                    target,
                    token,
                    &format!("/api/v1/notifications?order_id={id}&limit=100"),
                )
                .await?;
                #[derive(Deserialize)]
                struct Payments {
                    payments: Vec<Payment>,
                }
                let path = format!("/api/v1/payments/order/{id}");
                let (payments, _): (Payments, _) = get_json(target, token, &path).await?;
                Ok((notifications, payments.payments))
            }
            .await;
            (id, read)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let by_id: HashMap<Uuid, &Order> = orders.iter().map(|o| (o.id, *o)).collect();
    let (mut notified, mut money) = (Vec::new(), Vec::new());
    let (mut net_total, mut paid_value) = (0i64, 0i64);
    for (id, read) in reads {
        let (notifications, payments) = read?;
        let Some(order) = by_id.get(&id) else {
            continue;
        };
        let created = notifications
            .iter()
            .filter(|n| n.event_type == "order.created")
            .count();
        if created != 1 {
            notified.push(format!(
                "order {id} has {created} order.created notifications (expected 1)"
            ));
        }
        let mut events = HashSet::new();
        for n in &notifications {
            if !events.insert(n.event_id) {
                notified.push(format!(
                    "order {id}: event {} ({}) was notified twice",
                    n.event_id, n.event_type
                ));
            }
        }
        let captured: Vec<&Payment> = payments
            .iter()
            .filter(|p| {
                matches!(
                    p.status.as_str(),
                    "succeeded" | "partially_refunded" | "refunded"
                )
            })
            .collect();
        let charged: i64 = captured.iter().map(|p| p.amount.cents()).sum();
        let refunded: i64 = captured.iter().map(|p| p.refunded_amount.cents()).sum();
        let total = order.total_amount.cents();
        net_total += charged - refunded;
        let status = order.status.as_str();
        if captured.len() > 1 {
            money.push(format!("order {id} was charged {} times", captured.len()));
        }
        if PAID.contains(&status) {
            paid_value += total - refunded;
            if charged != total {
                money.push(format!(
                    "order {id} is {status} for {} but {} was charged",
                    cents(total),
                    cents(charged)
                ));
            }
        } else if status == "refunded" {
            if charged != total || refunded != total {
                money.push(format!(
                    "order {id} is refunded: charged {} and refunded {} of {}",
                    cents(charged),
                    cents(refunded),
                    cents(total)
                ));
            }
        } else if charged != refunded {
            money.push(format!(
                "order {id} is {status} but keeps {} (charged {}, refunded {})",
                cents(charged - refunded),
                cents(charged),
                cents(refunded)
            ));
        }
    }
    if net_total != paid_value && money.is_empty() {
        money.push(format!(
            "charged − refunded is {} but the paid orders are worth {}",
            cents(net_total),
            cents(paid_value)
        ));
    }
    Ok((
        check(
            "one notification per order",
            format!("{} orders: exactly one order.created each", orders.len()),
            notified,
        ),
        check(
            "money balances",
            format!(
                "charged − refunded {} = value of paid orders {}",
                cents(net_total),
                cents(paid_value)
            ),
            money,
        ),
    ))
}

fn cents(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", c.abs() / 100, c.abs() % 100)
}

/// Each analytics window counts the orders created in it (all orders: the windows are the
/// platform's, not the run's).
async fn analytics_counts_orders(
    target: &Target,
    token: &str,
    ledger: Option<&Ledger>,
    orders: &[Order],
) -> Result<Check, LoadError> {
    let now = Utc::now();
    let earliest = now - chrono::Duration::days(30);
    let from = ledger
        .and_then(|l| l.started_at)
        .map(|s| s - chrono::Duration::minutes(1))
        .or_else(|| orders.iter().map(|o| o.created_at).min())
        .unwrap_or(now)
        .max(earliest);
    let from = from
        .duration_trunc(chrono::Duration::minutes(1))
        .unwrap_or(from);
    let path = format!(
        "/api/v1/analytics/windows?from={}&to={}",
        from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .replace('+', "%2B"),
        now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .replace('+', "%2B")
    );
    let (windows, _): (Vec<Window>, _) = get_json(target, token, &path).await?;
    let mut problems = Vec::new();
    let mut counted = 0i64;
    let mut seen_starts = HashSet::new();
    for w in &windows {
        seen_starts.insert(w.window_start);
        let expected = orders
            .iter()
            .filter(|o| o.created_at >= w.window_start && o.created_at < w.window_end)
            .count() as i64;
        counted += w.order_count;
        if w.order_count != expected {
            problems.push(format!(
                "window {}: analytics counts {} orders, the orders service holds {expected}",
                w.window_start.format("%H:%M:%S"),
                w.order_count
            ));
        }
    }
    // Windows analytics never opened although orders were created in them.
    let mut missing: BTreeMap<DateTime<Utc>, i64> = BTreeMap::new();
    for o in orders.iter().filter(|o| o.created_at >= from) {
        let start = o
            .created_at
            .duration_trunc(chrono::Duration::minutes(1))
            .unwrap_or(o.created_at);
        if !windows
            .iter()
            .any(|w| o.created_at >= w.window_start && o.created_at < w.window_end)
        {
            *missing.entry(start).or_default() += 1;
        }
    }
    for (start, n) in missing {
        problems.push(format!(
            "no analytics window holds the {n} orders created at {}",
            start.format("%H:%M")
        ));
    }
    Ok(check(
        "analytics counts the orders",
        format!(
            "{} windows since {}, {counted} orders counted",
            windows.len(),
            from.format("%H:%M")
        ),
        problems,
    ))
}

fn nothing_stuck(orders: &[&Order], grace: Duration) -> Check {
    let now = Utc::now();
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::seconds(30));
    let problems = orders
        .iter()
        .filter(|o| HOLDING.contains(&o.status.as_str()) && o.expires_at + grace < now)
        .map(|o| {
            format!(
                "order {} is still {} {} s past its expiry",
                o.id,
                o.status,
                (now - o.expires_at).num_seconds()
            )
        })
        .collect();
    check(
        "nothing stuck past expiry",
        format!(
            "{} orders, pending ones within {} s of their expiry",
            orders.len(),
            grace.num_seconds()
        ),
        problems,
    )
}

/// The outbox and queue gauges of each metrics endpoint are zero.
async fn pipelines_drained(target: &Target, endpoints: &[String]) -> Check {
    if endpoints.is_empty() {
        return Check {
            name: "outbox and queues drained",
            passed: true,
            summary: "not checked: give --metrics with the services' /metrics URLs".into(),
            problems: Vec::new(),
            more: 0,
        };
    }
    let mut problems = Vec::new();
    for url in endpoints {
        match target.get_text(url).await {
            Err(e) => problems.push(format!("{url}: {e}")),
            Ok(text) => problems.extend(
                backlog(&text)
                    .into_iter()
                    .map(|(series, value)| format!("{url}: {series} = {value}")),
            ),
        }
    }
    check(
        "outbox and queues drained",
        format!(
            "outbox_backlog and queue_depth at 0 on {} endpoint(s)",
            endpoints.len()
        ),
        problems,
    )
}

/// The sums of the `outbox_backlog` and `queue_depth` samples of a Prometheus exposition.
pub(crate) fn backlog_sums(text: &str) -> (f64, f64) {
    let (mut outbox, mut queue) = (0.0, 0.0);
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if series.starts_with("outbox_backlog") {
            outbox += value;
        } else if series.starts_with("queue_depth") {
            queue += value;
        }
    }
    (outbox, queue)
}

/// Non-zero `outbox_backlog` and `queue_depth` samples of a Prometheus text exposition.
fn backlog(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with("outbox_backlog") || l.starts_with("queue_depth"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            (value != 0.0).then(|| (series.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: u128, user: u128, status: &str) -> Order {
        let now = Utc::now();
        Order {
            id: Uuid::from_u128(id),
            user_id: Uuid::from_u128(user),
            status: status.into(),
            items: vec![],
            total_amount: Money::from_cents(100).unwrap(),
            created_at: now,
            expires_at: now,
        }
    }

    #[test]
    fn an_order_nobody_accepted_is_named_unless_an_answer_was_lost() {
        let mut ledger = Ledger {
            users: vec![Uuid::from_u128(9)],
            ..Ledger::default()
        };
        ledger.accepted_orders.push(crate::journeys::AcceptedOrder {
            id: Uuid::from_u128(1),
            user_id: Uuid::from_u128(9),
            total_amount: Money::from_cents(100).unwrap(),
        });
        let (a, b) = (order(1, 9, "paid"), order(2, 9, "paid"));
        let c = accepted_orders_exist_once(&ledger, &[&a, &b]);
        assert!(!c.passed);
        assert!(c.problems[0].contains("never accepted"), "{:?}", c.problems);
        ledger.uncertain_orders.insert(Uuid::from_u128(9), 1);
        assert!(accepted_orders_exist_once(&ledger, &[&a, &b]).passed);
        let missing = accepted_orders_exist_once(&ledger, &[]);
        assert!(missing.problems[0].contains("does not exist"));
    }

    #[test]
    fn a_pending_order_past_its_expiry_is_stuck() {
        let mut o = order(1, 1, "pending");
        o.expires_at = Utc::now() - chrono::Duration::seconds(120);
        assert!(!nothing_stuck(&[&o], Duration::from_secs(30)).passed);
        assert!(nothing_stuck(&[&o], Duration::from_secs(300)).passed);
        o.status = "cancelled".into();
        assert!(nothing_stuck(&[&o], Duration::from_secs(30)).passed);
    }

    #[test]
    fn backlog_reads_non_zero_gauges_only() {
        let text = "# HELP outbox_backlog x\noutbox_backlog{service=\"orders\"} 3\noutbox_backlog{service=\"payments\"} 0\nqueue_depth{queue=\"n\"} 0\nhttp_requests_total 5\n";
        assert_eq!(
            backlog(text),
            vec![("outbox_backlog{service=\"orders\"}".to_owned(), 3.0)]
        );
    }
}
