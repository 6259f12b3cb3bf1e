//! How the pages write money, times and statuses.

use chrono::{DateTime, Utc};
use kit::money::Money;

/// An amount in the platform's currency: `₹1,23,456.78` for INR (Indian digit grouping),
/// `$1,234.56`, `€1,234.56`, `£1,234.56`, else the code before the figure.
pub fn money(amount: Money, currency: &str) -> String {
    // Money is never negative.
    let cents = amount.cents().unsigned_abs();
    let (units, fraction) = (cents / 100, cents % 100);
    let grouped = if currency.eq_ignore_ascii_case("INR") {
        group_indian(units)
    } else {
        group_thousands(units)
    };
    let symbol = match currency.to_ascii_uppercase().as_str() {
        "INR" => "₹".to_owned(),
        "USD" => "$".to_owned(),
        "EUR" => "€".to_owned(),
        "GBP" => "£".to_owned(),
        other => format!("{other} "),
    };
    format!("{symbol}{grouped}.{fraction:02}")
}

/// `1234567` → `1,234,567`.
fn group_thousands(units: u64) -> String {
    let digits = units.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1234567` → `12,34,567`: the last three digits, then groups of two.
fn group_indian(units: u64) -> String {
    let digits = units.to_string();
    if digits.len() <= 3 {
        return digits;
    }
    let (head, tail) = digits.split_at(digits.len() - 3);
    let mut out = String::with_capacity(digits.len() + digits.len() / 2);
    for (i, c) in head.chars().enumerate() {
        if i > 0 && (head.len() - i).is_multiple_of(2) {
            out.push(',');
        }
        out.push(c);
    }
    out.push(',');
    out.push_str(tail);
    out
}

/// A moment as people read it: `4 Dec 2026, 10:15 UTC`.
pub fn when(at: DateTime<Utc>) -> String {
    at.format("%-d %b %Y, %H:%M UTC").to_string()
}

/// A moment on a timeline, to the second: `4 Dec 2026, 10:15:07 UTC`.
pub fn moment(at: DateTime<Utc>) -> String {
    at.format("%-d %b %Y, %H:%M:%S UTC").to_string()
}

/// An order status as a word: `payment_failed` → `Payment failed`.
pub fn status_label(status: &str) -> String {
    let text = status.replace('_', " ");
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => text,
    }
}

/// Statuses an order does not leave by itself (the live views stop asking).
pub fn is_settled(status: &str) -> bool {
    matches!(status, "delivered" | "cancelled" | "refunded")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rupees(cents: i64) -> String {
        money(Money::from_cents(cents).unwrap(), "INR")
    }

    #[test]
    fn rupees_use_indian_grouping() {
        assert_eq!(rupees(0), "₹0.00");
        assert_eq!(rupees(99_999), "₹999.99");
        assert_eq!(rupees(100_000), "₹1,000.00");
        assert_eq!(rupees(12_345_678), "₹1,23,456.78");
        assert_eq!(rupees(1_234_567_890), "₹1,23,45,678.90");
    }

    #[test]
    fn other_currencies_group_by_thousands() {
        let amount = Money::from_cents(123_456_789).unwrap();
        assert_eq!(money(amount, "USD"), "$1,234,567.89");
        assert_eq!(money(amount, "CHF"), "CHF 1,234,567.89");
        assert_eq!(money(Money::from_cents(5).unwrap(), "EUR"), "€0.05");
    }

    #[test]
    fn statuses_read_as_words() {
        assert_eq!(status_label("payment_failed"), "Payment failed");
        assert_eq!(status_label("paid"), "Paid");
        assert!(is_settled("refunded") && !is_settled("paid"));
    }
}
