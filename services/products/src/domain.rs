//! Catalog rules: what a valid product and a valid reservation request are.

use std::collections::BTreeMap;

use kit::Money;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("name must be 1 to 200 characters")]
    Name,
    #[error("description must be at most 5000 characters")]
    Description,
    #[error("price must be greater than 0")]
    Price,
    #[error("price must be at most {0}")]
    PriceAbove(Money),
    #[error("stock must be between 0 and 1000000000")]
    Stock,
    #[error("on_hand must be between 0 and 1000000000")]
    OnHand,
    #[error("adjust must be between -1000000000 and 1000000000")]
    Adjust,
    #[error("send one of on_hand (the count on the shelf) or adjust (a change to it)")]
    StockChange,
    #[error("sku must be 1 to 64 letters, digits, '-', '_' or '.'")]
    Sku,
    #[error("category must be 1 to 100 characters")]
    Category,
    #[error("items must hold 1 to 100 entries")]
    ItemCount,
    #[error("quantity must be between 1 and 10000")]
    Quantity,
}

impl FieldError {
    pub fn field(&self) -> &'static str {
        match self {
            FieldError::Name => "name",
            FieldError::Description => "description",
            FieldError::Price | FieldError::PriceAbove(_) => "price",
            FieldError::Stock => "stock",
            FieldError::OnHand | FieldError::StockChange => "on_hand",
            FieldError::Adjust => "adjust",
            FieldError::Sku => "sku",
            FieldError::Category => "category",
            FieldError::ItemCount => "items",
            FieldError::Quantity => "quantity",
        }
    }

    /// The bound a value went past, for the client to show.
    pub fn limit(&self) -> Option<Money> {
        match self {
            FieldError::PriceAbove(limit) => Some(*limit),
            _ => None,
        }
    }
}

pub const MAX_STOCK: i64 = 1_000_000_000;
pub const MAX_QUANTITY: i64 = 10_000;
pub const MAX_ITEMS: usize = 100;

fn bounded_text(raw: &str, max: usize, err: FieldError) -> Result<String, FieldError> {
    let t = raw.trim();
    let n = t.chars().count();
    if n == 0 || n > max || t.chars().any(char::is_control) {
        return Err(err);
    }
    Ok(t.to_owned())
}

pub fn name(raw: &str) -> Result<String, FieldError> {
    bounded_text(raw, 200, FieldError::Name)
}

pub fn description(raw: &str) -> Result<String, FieldError> {
    let t = raw.trim();
    if t.chars().count() > 5000 {
        return Err(FieldError::Description);
    }
    Ok(t.to_owned())
}

/// A unit price: positive, and at most `max` (`limits.max_price`).
pub fn price(raw: Money, max: Money) -> Result<Money, FieldError> {
    if raw.cents() <= 0 {
        return Err(FieldError::Price);
    }
    if raw > max {
        return Err(FieldError::PriceAbove(max));
    }
    Ok(raw)
}

pub fn stock(raw: i64) -> Result<i64, FieldError> {
    if !(0..=MAX_STOCK).contains(&raw) {
        return Err(FieldError::Stock);
    }
    Ok(raw)
}

/// An operator's change to stock on hand: exactly one of a new count or a difference.
pub fn stock_change(
    on_hand: Option<i64>,
    adjust: Option<i64>,
) -> Result<crate::store::StockChange, FieldError> {
    use crate::store::StockChange;
    match (on_hand, adjust) {
        (Some(n), None) if (0..=MAX_STOCK).contains(&n) => Ok(StockChange::Set(n)),
        (Some(_), None) => Err(FieldError::OnHand),
        (None, Some(d)) if (-MAX_STOCK..=MAX_STOCK).contains(&d) => Ok(StockChange::Adjust(d)),
        (None, Some(_)) => Err(FieldError::Adjust),
        _ => Err(FieldError::StockChange),
    }
}

pub fn sku(raw: &str) -> Result<String, FieldError> {
    let t = raw.trim();
    if t.is_empty()
        || t.len() > 64
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(FieldError::Sku);
    }
    Ok(t.to_owned())
}

pub fn category(raw: &str) -> Result<String, FieldError> {
    bounded_text(raw, 100, FieldError::Category)
}

/// The lines of a reservation, one per product (repeated products are summed), in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationLines(Vec<(Uuid, i64)>);

impl ReservationLines {
    pub fn parse(items: &[(Uuid, i64)]) -> Result<ReservationLines, FieldError> {
        if items.is_empty() || items.len() > MAX_ITEMS {
            return Err(FieldError::ItemCount);
        }
        let mut merged: BTreeMap<Uuid, i64> = BTreeMap::new();
        for (product, quantity) in items {
            if !(1..=MAX_QUANTITY).contains(quantity) {
                return Err(FieldError::Quantity);
            }
            let total = merged.entry(*product).or_insert(0);
            *total += quantity;
            if *total > MAX_QUANTITY {
                return Err(FieldError::Quantity);
            }
        }
        Ok(ReservationLines(merged.into_iter().collect()))
    }

    pub fn lines(&self) -> &[(Uuid, i64)] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_lines_merge_repeats_and_bound_quantities() {
        let a = Uuid::from_u128(2);
        let b = Uuid::from_u128(1);
        let lines = ReservationLines::parse(&[(a, 2), (b, 1), (a, 3)]).unwrap();
        assert_eq!(lines.lines(), &[(b, 1), (a, 5)]);
        assert_eq!(ReservationLines::parse(&[]), Err(FieldError::ItemCount));
        assert_eq!(
            ReservationLines::parse(&[(a, 0)]),
            Err(FieldError::Quantity)
        );
        assert_eq!(
            ReservationLines::parse(&[(a, -1)]),
            Err(FieldError::Quantity)
        );
        assert_eq!(
            ReservationLines::parse(&[(a, 6000), (a, 6000)]),
            Err(FieldError::Quantity)
        );
    }

    #[test]
    fn product_fields() {
        assert_eq!(sku(" AB-1_2.x ").unwrap(), "AB-1_2.x");
        assert!(sku("has space").is_err());
        let max = Money::from_cents(100_000_000).unwrap();
        assert_eq!(price(Money::ZERO, max), Err(FieldError::Price));
        assert_eq!(price(max, max), Ok(max));
        let above = Money::from_cents(100_000_001).unwrap();
        assert_eq!(price(above, max), Err(FieldError::PriceAbove(max)));
        assert_eq!(FieldError::PriceAbove(max).limit(), Some(max));
        assert!(stock(-1).is_err());
        assert!(stock(MAX_STOCK + 1).is_err());
        assert!(name("").is_err());
    }

    #[test]
    fn stock_changes_are_one_of_a_count_or_a_difference() {
        use crate::store::StockChange;
        assert_eq!(stock_change(Some(5), None), Ok(StockChange::Set(5)));
        assert_eq!(stock_change(None, Some(-5)), Ok(StockChange::Adjust(-5)));
        assert_eq!(stock_change(None, None), Err(FieldError::StockChange));
        assert_eq!(stock_change(Some(1), Some(1)), Err(FieldError::StockChange));
        assert_eq!(stock_change(Some(-1), None), Err(FieldError::OnHand));
        assert_eq!(
            stock_change(Some(MAX_STOCK + 1), None),
            Err(FieldError::OnHand)
        );
        assert_eq!(
            stock_change(None, Some(MAX_STOCK + 1)),
            Err(FieldError::Adjust)
        );
        assert_eq!(
            stock_change(None, Some(-MAX_STOCK - 1)),
            Err(FieldError::Adjust)
        );
    }
}
