//! `mercato analytics replay` over the seed platform's order events gives exactly the windows
//! it gives over the same events as Mercato publishes them, and over a file mixing both (a
//! topic during the migration): 24,000 generated events, with repeats, late events,
//! other event types, events without any id and seed events whose `id` is the order's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use analytics::engine::{Lateness, Windows};
use analytics::replay::{ReplayReport, replay};
use bus::event::{OrderEvent, OrderEventItem, types};
use chrono::{DateTime, SubsecRound as _, Utc};
use kit::Money;
use serde_json::Value;
use uuid::Uuid;

// More than one replay batch (20,000 lines): the watermark moves between batches, so the
// events far behind are late.
const EVENTS: u64 = 24_000;
const OTHER_TYPES: [&str; 3] = [
    types::ORDER_PAID,
    types::ORDER_CANCELLED,
    types::PAYMENT_SUCCEEDED,
];

/// splitmix64: deterministic without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(
            ((u128::from(self.next()) << 64) | u128::from(self.next())).to_be_bytes(),
        )
        .into_uuid()
    }
}

/// How one generated event is written.
struct Planned {
    event: OrderEvent,
    /// Written without any id (neither `event_id` nor the seed's `id`).
    anonymous: bool,
    /// The seed's `id` is the order's id rather than an event id.
    seed_id_is_order_id: bool,
    /// The seed writes the amounts as JSON strings.
    string_amounts: bool,
    /// Delivered twice, byte for byte.
    repeated: bool,
    /// Delivered again as other text (the seed's keys in another order); Mercato's file repeats
    /// the line.
    resent: bool,
}

fn plan() -> Vec<Planned> {
    let mut rng = Rng(12);
    let users: Vec<Uuid> = (0..300).map(|_| rng.uuid()).collect();
    let products: Vec<Uuid> = (0..40).map(|_| rng.uuid()).collect();
    let start: DateTime<Utc> = "2026-11-24T10:00:00Z".parse().unwrap();
    let mut created: Vec<OrderEvent> = Vec::new();
    (0..EVENTS)
        .map(|i| {
            let jitter = rng.below(10_001) as i64 - 5_000;
            // Every 400th event is two and a half minutes behind: late in both files.
            let behind = if i % 400 == 399 { 150_000 } else { 0 };
            let mut at = start
                + chrono::Duration::milliseconds(i as i64 * 30 + jitter - behind)
                + chrono::Duration::microseconds(rng.below(1_000) as i64);
            if i % 97 == 0 {
                at = at.trunc_subsecs(0); // isoformat() then writes no fraction at all
            }
            let event = if i % 10 == 9 && !created.is_empty() {
                let base =
                    &created[created.len() - 1 - rng.below(created.len().min(50) as u64) as usize];
                OrderEvent {
                    event_id: rng.uuid(),
                    event_type: OTHER_TYPES[rng.below(3) as usize].to_owned(),
                    status: "paid".into(),
                    created_at: at,
                    occurred_at: Some(at),
                    ..base.clone()
                }
            } else {
                let items: Vec<OrderEventItem> = (0..=rng.below(2))
                    .map(|_| OrderEventItem {
                        product_id: products[rng.below(products.len() as u64) as usize],
                        quantity: 1 + rng.below(3) as i64,
                        // Whole, tenths and cents, so Python's shortest float text varies.
                        unit_price: Money::from_cents(match rng.below(3) {
                            0 => 100 * (1 + rng.below(900) as i64),
                            1 => 10 * (10 + rng.below(9_000) as i64),
                            _ => 100 + rng.below(99_900) as i64,
                        })
                        .unwrap(),
                    })
                    .collect();
                let total = items
                    .iter()
                    .map(|l| l.unit_price.checked_mul(l.quantity).unwrap())
                    .fold(Money::ZERO, |a, b| a.checked_add(b).unwrap());
                let e = OrderEvent {
                    event_id: rng.uuid(),
                    event_type: types::ORDER_CREATED.into(),
                    order_id: rng.uuid(),
                    user_id: users[rng.below(users.len() as u64) as usize],
                    total_amount: total,
                    currency: Some("INR".into()),
                    status: "pending".into(),
                    items_count: items.iter().map(|l| l.quantity).sum(),
                    created_at: at,
                    occurred_at: Some(at),
                    items,
                };
                created.push(e.clone());
                e
            };
            Planned {
                event,
                anonymous: i % 250 == 3,
                seed_id_is_order_id: i % 10 == 9 && i % 20 != 9,
                string_amounts: i % 7 == 0,
                repeated: i % 90 == 5 || i % 250 == 3,
                resent: i % 150 == 7,
            }
        })
        .collect()
}

/// Python's `repr(float)` of a two-decimal amount: `1999.9`, `1000.0`, `0.05`.
fn python_float(m: Money) -> String {
    let text = m.to_string();
    match text.strip_suffix('0') {
        Some(t) if !t.ends_with('.') => t.to_owned(),
        _ => text,
    }
}

/// Python's `datetime.isoformat()` of a naive UTC time: microseconds, none when zero.
fn python_time(t: DateTime<Utc>) -> String {
    if t.timestamp_subsec_micros() == 0 {
        t.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

/// Mercato's line: what it publishes.
fn mercato_line(p: &Planned) -> String {
    if p.anonymous {
        let mut v = serde_json::to_value(&p.event).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("event_id");
        o.remove("id");
        return v.to_string();
    }
    serde_json::to_string(&p.event).unwrap()
}

/// The seed's line, as its order service's `json.dumps` wrote it; `reordered` puts the keys in
/// another order (the same event written again by other code).
fn seed_line(p: &Planned, reordered: bool) -> String {
    let e = &p.event;
    let amount = |m: Money| {
        if p.string_amounts {
            format!("\"{m}\"")
        } else {
            python_float(m)
        }
    };
    let items: Vec<String> = e
        .items
        .iter()
        .map(|l| {
            format!(
                r#"{{"product_id": "{}", "quantity": {}, "price": {}}}"#,
                l.product_id,
                l.quantity,
                amount(l.unit_price)
            )
        })
        .collect();
    let id = if p.anonymous {
        String::new()
    } else if p.seed_id_is_order_id {
        format!(r#""id": "{}", "#, e.order_id)
    } else {
        format!(r#""id": "{}", "#, e.event_id)
    };
    let fields = [
        format!(r#""order_id": "{}""#, e.order_id),
        format!(r#""user_id": "{}""#, e.user_id),
        format!(r#""total_amount": {}"#, amount(e.total_amount)),
        format!(r#""status": "{}""#, e.status),
        format!(r#""items_count": {}"#, e.items_count),
        format!(r#""event_type": "{}""#, e.event_type),
        format!(r#""created_at": "{}""#, python_time(e.created_at)),
        format!(r#""items": [{}]"#, items.join(", ")),
    ];
    let body = if reordered {
        fields.iter().rev().cloned().collect::<Vec<_>>().join(", ")
    } else {
        fields.join(", ")
    };
    format!("{{{id}{body}}}")
}

#[derive(Clone, Copy)]
enum Shape {
    Mercato,
    Seed,
    /// Each event in one shape or the other (its repeats in the same shape, as a producer
    /// resends what it sent).
    Mixed,
}

fn write(path: &Path, planned: &[Planned], shape: Shape) {
    let mut lines = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        let seed = match shape {
            Shape::Mercato => false,
            Shape::Seed => true,
            Shape::Mixed => i % 2 == 0,
        };
        let line = if seed {
            seed_line(p, false)
        } else {
            mercato_line(p)
        };
        lines.push(line.clone());
        if p.repeated {
            lines.push(line.clone());
        }
        if p.resent {
            lines.push(if seed { seed_line(p, true) } else { line });
        }
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

async fn replay_file(
    dir: &Path,
    name: &str,
    planned: &[Planned],
    shape: Shape,
) -> (ReplayReport, String) {
    let input = dir.join(format!("{name}.jsonl"));
    write(&input, planned, shape);
    let output = dir.join(name);
    let report = replay(
        &input,
        &output,
        Windows::of_secs(60).unwrap(),
        Lateness::of_secs(30).unwrap(),
    )
    .await
    .unwrap();
    (
        report,
        std::fs::read_to_string(output.join("windows.jsonl")).unwrap(),
    )
}

#[tokio::test]
async fn seed_shaped_events_replay_into_the_same_windows_as_mercatos() {
    let planned = plan();
    let dir = tempfile::tempdir().unwrap();
    let (mercato, mercato_windows) =
        replay_file(dir.path(), "mercato", &planned, Shape::Mercato).await;
    let (seed, seed_windows) = replay_file(dir.path(), "seed", &planned, Shape::Seed).await;
    let (mixed, mixed_windows) = replay_file(dir.path(), "mixed", &planned, Shape::Mixed).await;

    // The data is what it claims to be: repeats, late events, several windows.
    assert_eq!(
        mercato.applied, EVENTS as usize,
        "every repeat dropped: {mercato:?}"
    );
    assert!(mercato.lines > mercato.applied + 50, "{mercato:?}");
    assert!(mercato.late >= 5, "{mercato:?}");
    assert!(mercato.windows >= 3, "{mercato:?}");
    let windows: Vec<Value> = mercato_windows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        windows
            .iter()
            .any(|w| w["event_counts"].get(types::ORDER_PAID).is_some()),
        "other event types are present"
    );

    for (name, report, text) in [
        ("seed", &seed, &seed_windows),
        ("mixed", &mixed, &mixed_windows),
    ] {
        assert_eq!(
            (report.lines, report.applied, report.late, report.windows),
            (
                mercato.lines,
                mercato.applied,
                mercato.late,
                mercato.windows
            ),
            "{name}"
        );
        // Byte for byte: counts, exact revenue and averages, users, event types, products.
        for (m, s) in mercato_windows.lines().zip(text.lines()) {
            assert_eq!(m, s, "{name}");
        }
        assert_eq!(&mercato_windows, text, "{name}");
    }
}

/// The seed's lines really are the seed's shape, and a wrong id rule would be caught: taking
/// the seed's `id` when it is the order's would drop an order's later events as repeats.
#[test]
fn the_generated_seed_lines_have_the_seeds_shape() {
    let planned = plan();
    let lines: Vec<Value> = planned
        .iter()
        .map(|p| serde_json::from_str(&seed_line(p, false)).unwrap())
        .collect();
    for v in &lines {
        assert!(
            v.get("event_id").is_none() && v.get("currency").is_none(),
            "{v}"
        );
        assert!(v["items"][0].get("unit_price").is_none(), "{v}");
        assert!(!v["created_at"].as_str().unwrap().ends_with('Z'), "{v}");
    }
    let sharing_order_ids = planned
        .iter()
        .filter(|p| p.seed_id_is_order_id && !p.anonymous)
        .count();
    assert!(sharing_order_ids > 100, "{sharing_order_ids}");
    assert!(
        lines
            .iter()
            .any(|v| v["created_at"].as_str().unwrap().len() == 19),
        "some times without a fraction"
    );
    assert!(lines.iter().any(|v| v["total_amount"].is_string()));
}
