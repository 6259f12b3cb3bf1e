//! Windowing rules with no I/O: tumbling event-time windows, the watermark that makes them
//! final, and the mergeable per-window state that lets several instances' partial windows add
//! up to what one instance would have computed.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::revenue::Revenue;
use crate::sketch::UserSketch;

/// How many products a window reports in `top_products`.
pub const TOP_PRODUCTS: usize = 10;

/// Tumbling event-time windows of a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    size_ms: i64,
}

impl Windows {
    /// `None` unless `size_secs` is positive.
    pub fn of_secs(size_secs: i64) -> Option<Windows> {
        (size_secs > 0).then(|| Windows {
            size_ms: size_secs * 1000,
        })
    }

    pub fn size_ms(self) -> i64 {
        self.size_ms
    }

    /// The start (ms since epoch) of the window holding `at`; times before 1970 floor correctly.
    pub fn start_of(self, at: DateTime<Utc>) -> i64 {
        at.timestamp_millis().div_euclid(self.size_ms) * self.size_ms
    }

    /// The seed's `window_type`: `tumbling_1m`, or `tumbling_<n>s` for other sizes.
    pub fn label(self) -> String {
        if self.size_ms % 60_000 == 0 {
            format!("tumbling_{}m", self.size_ms / 60_000)
        } else {
            format!("tumbling_{}s", self.size_ms / 1000)
        }
    }
}

/// Allowed lateness: the watermark trails the event time read ([`low_water_mark`]) by this much. A window
/// is final once the watermark reaches its end; an event for a final window is late: counted
/// in the window's `late_events`, not in its figures (which have already been published).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lateness {
    ms: i64,
}

impl Lateness {
    /// `None` when negative.
    pub fn of_secs(secs: i64) -> Option<Lateness> {
        (secs >= 0).then(|| Lateness { ms: secs * 1000 })
    }

    /// The watermark after events up to `max_event_ms` have been seen.
    pub fn watermark(self, max_event_ms: Option<i64>) -> Option<i64> {
        max_event_ms.map(|t| t.saturating_sub(self.ms))
    }
}

/// How long a partition may deliver nothing before it stops holding the watermark back: a
/// partition that a rebalance moved to another instance, or that has no traffic, must not
/// keep every window open.
pub const IDLE_PARTITION_MS: i64 = 10_000;

/// What an instance has read of one stream partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionProgress {
    /// The latest event time read from it (ms since epoch).
    pub max_event_ms: i64,
    /// When it last delivered (processing time, ms since epoch).
    pub seen_at_ms: i64,
}

/// The event time every active partition has reached: the least of their latest event
/// times, as Flink and Kafka Streams take it. An instance reading several partitions gets
/// them unevenly (one partition's backlog can arrive before another's), so the fastest one
/// alone would make the others' events late. Partitions idle for [`IDLE_PARTITION_MS`] are
/// left out; `None` when none is active.
pub fn low_water_mark(
    partitions: impl IntoIterator<Item = PartitionProgress>,
    now_ms: i64,
) -> Option<i64> {
    partitions
        .into_iter()
        .filter(|p| now_ms.saturating_sub(p.seen_at_ms) < IDLE_PARTITION_MS)
        .map(|p| p.max_event_ms)
        .min()
}

/// Whether a window ending at `window_end_ms` can no longer change.
pub fn is_final(window_end_ms: i64, watermark: Option<i64>) -> bool {
    watermark.is_some_and(|w| window_end_ms <= w)
}

/// One window's figures as the API and the results stream report them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowReport {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub order_count: i64,
    pub unique_users: i64,
    pub total_revenue: Revenue,
    pub avg_order_value: Revenue,
    pub items_sold: i64,
    /// Events per type seen in the window (`order.created`, `order.paid`, ...).
    pub event_counts: BTreeMap<String, i64>,
    /// Events that arrived after the window was final: not in the figures above.
    pub late_events: i64,
    /// The HyperLogLog estimate of `unique_users`: what a sketch-only merge would report.
    pub unique_users_estimate: i64,
    /// The best-selling products of the window by revenue.
    pub top_products: Vec<ProductSales>,
    /// True once the watermark has passed the window's end.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// A product's sales over a range of windows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProductSales {
    pub product_id: String,
    pub quantity: i64,
    pub revenue: Revenue,
}

/// Average order value, exact to the cent (half-even), zero for an empty window.
pub fn average(revenue: Revenue, orders: i64) -> Revenue {
    revenue.average(orders)
}

/// Everything a window's figures are made of, in a form that merges: what one instance
/// knows of a window (from the partitions it consumes) plus what another knows equals what a
/// single instance consuming both would know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartialWindow {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub order_count: i64,
    pub total_revenue: Revenue,
    pub items_sold: i64,
    pub late_events: i64,
    pub event_counts: BTreeMap<String, i64>,
    /// Every product sold in the window (not only the top ones: a product second on two
    /// instances may be first overall).
    pub products: Vec<ProductSales>,
    /// The exact set of buyers, so merged `unique_users` stays exact.
    pub users: BTreeSet<Uuid>,
    /// Hex of the HyperLogLog registers.
    pub users_sketch: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("windows {0} and {1} differ")]
    DifferentWindows(DateTime<Utc>, DateTime<Utc>),
    #[error("a users sketch is malformed")]
    BadSketch,
}

impl PartialWindow {
    pub fn sketch(&self) -> Result<UserSketch, MergeError> {
        UserSketch::from_hex(&self.users_sketch).ok_or(MergeError::BadSketch)
    }

    /// Folds `other` (the same window, seen by another instance) into `self`. Sums saturate
    /// as the store's do ([`add_count`], [`Revenue::plus`]): no input can make a merge fail.
    pub fn merge(&mut self, other: &PartialWindow) -> Result<(), MergeError> {
        if (self.window_start, self.window_end) != (other.window_start, other.window_end) {
            return Err(MergeError::DifferentWindows(
                self.window_start,
                other.window_start,
            ));
        }
        self.order_count = add_count(self.order_count, other.order_count);
        self.items_sold = add_count(self.items_sold, other.items_sold);
        self.late_events = add_count(self.late_events, other.late_events);
        self.total_revenue = self.total_revenue.plus(other.total_revenue);
        for (kind, n) in &other.event_counts {
            let mine = self.event_counts.entry(kind.clone()).or_insert(0);
            *mine = add_count(*mine, *n);
        }
        let mut products: BTreeMap<String, (i64, Revenue)> = self
            .products
            .drain(..)
            .map(|p| (p.product_id, (p.quantity, p.revenue)))
            .collect();
        for p in &other.products {
            let mine = products
                .entry(p.product_id.clone())
                .or_insert((0, Revenue::ZERO));
            mine.0 = add_count(mine.0, p.quantity);
            mine.1 = mine.1.plus(p.revenue);
        }
        self.products = products
            .into_iter()
            .map(|(product_id, (quantity, revenue))| ProductSales {
                product_id,
                quantity,
                revenue,
            })
            .collect();
        self.users.extend(other.users.iter().copied());
        let mut sketch = self.sketch()?;
        sketch.merge(&other.sketch()?);
        self.users_sketch = sketch.to_hex();
        Ok(())
    }

    /// The window's figures; `is_final` as the watermark says.
    pub fn report(&self, is_final: bool) -> WindowReport {
        self.report_with_buyers(
            is_final,
            i64::try_from(self.users.len()).unwrap_or(i64::MAX),
        )
    }

    /// [`Self::report`] when only the number of distinct buyers was read, not the buyers.
    pub fn report_with_buyers(&self, is_final: bool, unique_users: i64) -> WindowReport {
        let mut top = self.products.clone();
        top.sort_by(|a, b| {
            b.revenue
                .cmp(&a.revenue)
                .then_with(|| a.product_id.cmp(&b.product_id))
        });
        top.truncate(TOP_PRODUCTS);
        WindowReport {
            window_start: self.window_start,
            window_end: self.window_end,
            order_count: self.order_count,
            unique_users,
            total_revenue: self.total_revenue,
            avg_order_value: average(self.total_revenue, self.order_count),
            items_sold: self.items_sold,
            event_counts: self.event_counts.clone(),
            late_events: self.late_events,
            unique_users_estimate: self.sketch().map_or(0, |s| s.estimate()),
            top_products: top,
            is_final,
        }
    }
}

/// Adds to a count (orders, items, events). Only a producer sending absurd `items_count` or
/// quantities can reach `i64::MAX`; the count then stays there instead of breaking the window
/// (SQLite would turn an overflowing sum into a REAL, which no report can read).
pub fn add_count(a: i64, b: i64) -> i64 {
    a.saturating_add(b)
}

/// Merges partial windows from any number of instances into one window per start, oldest
/// first. Feeding the same instance's partial twice would double it: callers pass one partial
/// per (instance, window).
pub fn merge_partials(
    partials: impl IntoIterator<Item = PartialWindow>,
) -> Result<Vec<PartialWindow>, MergeError> {
    let mut merged: BTreeMap<DateTime<Utc>, PartialWindow> = BTreeMap::new();
    for p in partials {
        match merged.get_mut(&p.window_start) {
            Some(existing) => existing.merge(&p)?,
            None => {
                merged.insert(p.window_start, p);
            }
        }
    }
    Ok(merged.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn events_fall_into_the_minute_that_holds_them() {
        let w = Windows::of_secs(60).unwrap();
        let start = w.start_of(at("2026-11-24T10:15:59.999Z"));
        assert_eq!(start, at("2026-11-24T10:15:00Z").timestamp_millis());
        assert_eq!(
            w.start_of(at("2026-11-24T10:16:00Z")),
            start + 60_000,
            "the end is exclusive"
        );
        assert_eq!(
            Windows::of_secs(60)
                .unwrap()
                .start_of(at("1969-12-31T23:59:30Z")),
            -60_000
        );
        assert!(Windows::of_secs(0).is_none());
    }

    #[test]
    fn watermark_trails_the_latest_event_and_finalises_windows() {
        let lateness = Lateness::of_secs(30).unwrap();
        assert_eq!(lateness.watermark(None), None);
        let minute = at("2026-11-24T10:01:00Z").timestamp_millis();
        // Latest event at 10:01:29: the window [10:00, 10:01) is still open...
        let w = lateness.watermark(Some(minute + 29_000));
        assert!(!is_final(minute, w));
        // ...and final from 10:01:30 on.
        let w = lateness.watermark(Some(minute + 30_000));
        assert!(is_final(minute, w));
        assert!(!is_final(minute + 60_000, w));
        assert!(!is_final(minute, None), "nothing is final before any event");
        assert!(Lateness::of_secs(-1).is_none());
        assert_eq!(Windows::of_secs(60).unwrap().label(), "tumbling_1m");
        assert_eq!(Windows::of_secs(90).unwrap().label(), "tumbling_90s");
    }

    #[test]
    fn the_slowest_active_partition_holds_the_watermark() {
        let now = 1_000_000;
        let p = |max_event_ms, idle_ms| PartitionProgress {
            max_event_ms,
            seen_at_ms: now - idle_ms,
        };
        assert_eq!(low_water_mark([], now), None);
        assert_eq!(
            low_water_mark([p(960_000, 0), p(325_000, 200), p(272_000, 0)], now),
            Some(272_000),
            "a partition behind the others holds them all back"
        );
        assert_eq!(
            low_water_mark(
                [
                    p(960_000, 0),
                    p(100_000, IDLE_PARTITION_MS),
                    p(500_000, 9_999)
                ],
                now
            ),
            Some(500_000),
            "an idle partition (revoked, or no traffic) stops counting"
        );
        assert_eq!(low_water_mark([p(5, IDLE_PARTITION_MS + 1)], now), None);
    }

    fn partial(
        start: &str,
        orders: i64,
        cents: i64,
        users: &[u128],
        products: &[(&str, i64, i64)],
    ) -> PartialWindow {
        let mut sketch = UserSketch::default();
        let users: BTreeSet<Uuid> = users.iter().map(|u| Uuid::from_u128(*u)).collect();
        users.iter().for_each(|u| sketch.insert(*u));
        let window_start = at(start);
        PartialWindow {
            window_start,
            window_end: window_start + chrono::Duration::minutes(1),
            order_count: orders,
            total_revenue: Revenue::from_cents(cents.into()),
            items_sold: orders * 2,
            late_events: 1,
            event_counts: BTreeMap::from([("order.created".to_owned(), orders)]),
            products: products
                .iter()
                .map(|(id, q, c)| ProductSales {
                    product_id: (*id).to_owned(),
                    quantity: *q,
                    revenue: Revenue::from_cents((*c).into()),
                })
                .collect(),
            users,
            users_sketch: sketch.to_hex(),
        }
    }

    #[test]
    fn partial_windows_merge_into_the_whole() {
        let a = partial(
            "2026-11-24T10:00:00Z",
            2,
            1_000,
            &[1, 2],
            &[("p1", 1, 600), ("p2", 1, 400)],
        );
        let b = partial(
            "2026-11-24T10:00:00Z",
            3,
            2_001,
            &[2, 3],
            &[("p2", 5, 2_001)],
        );
        let c = partial("2026-11-24T10:01:00Z", 1, 5, &[9], &[]);
        let merged = merge_partials([a.clone(), c.clone(), b.clone()]).unwrap();
        assert_eq!(merged.len(), 2);
        let r = merged[0].report(true);
        assert_eq!((r.order_count, r.items_sold, r.late_events), (5, 10, 2));
        assert_eq!(r.total_revenue.to_string(), "30.01");
        assert_eq!(
            r.avg_order_value.to_string(),
            "6.00",
            "3001 / 5 = 600.2 cents"
        );
        assert_eq!(
            r.unique_users, 3,
            "user 2 bought on both instances, counted once"
        );
        assert_eq!(r.unique_users_estimate, 3);
        assert_eq!(r.event_counts["order.created"], 5);
        assert_eq!(
            r.top_products
                .iter()
                .map(|p| (p.product_id.as_str(), p.quantity, p.revenue.cents()))
                .collect::<Vec<_>>(),
            [("p2", 6, 2_401), ("p1", 1, 600)],
            "second on one instance, first overall"
        );
        assert_eq!(merged[1], c);
        let mut wrong = a;
        let expected = MergeError::DifferentWindows(wrong.window_start, c.window_start);
        assert_eq!(wrong.merge(&c), Err(expected));
    }

    #[test]
    fn average_is_exact() {
        let revenue = Revenue::from_cents(1_000);
        assert_eq!(average(revenue, 3).cents(), 333);
        assert_eq!(average(revenue, 0), Revenue::ZERO);
    }

    #[test]
    fn windows_past_64_bit_cents_merge_exactly() {
        let big = i64::MAX - 7;
        let mut a = partial("2026-11-24T10:00:00Z", 1, big, &[1], &[("p1", 1, big)]);
        let b = partial("2026-11-24T10:00:00Z", 1, big, &[2], &[("p1", 1, big)]);
        a.merge(&b).unwrap();
        let r = a.report(true);
        let twice = 2 * i128::from(big);
        assert_eq!(r.total_revenue.cents(), twice);
        assert_eq!(r.avg_order_value.cents(), i128::from(big));
        assert_eq!(r.top_products[0].revenue.cents(), twice);
        a.items_sold = i64::MAX;
        a.merge(&b).unwrap();
        assert_eq!(
            a.items_sold,
            i64::MAX,
            "a count saturates, the merge goes on"
        );
    }
}
