//! Windowing rules with no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kit::Money;
use serde::Serialize;

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
}

/// One window's figures as the API and the results stream report them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowReport {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub order_count: i64,
    pub unique_users: i64,
    pub total_revenue: Money,
    pub avg_order_value: Money,
    pub items_sold: i64,
    /// Events per type seen in the window (`order.created`, `order.paid`, ...).
    pub event_counts: BTreeMap<String, i64>,
}

/// A product's sales over a range of windows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProductSales {
    pub product_id: String,
    pub quantity: i64,
    pub revenue: Money,
}

/// Average order value, exact to the cent (half-even), zero for an empty window.
pub fn average(revenue: Money, orders: i64) -> Money {
    revenue.div_round(orders).unwrap_or(Money::ZERO)
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
    fn average_is_exact() {
        let revenue = Money::from_cents(1_000).unwrap();
        assert_eq!(average(revenue, 3).cents(), 333);
        assert_eq!(average(revenue, 0), Money::ZERO);
    }
}
