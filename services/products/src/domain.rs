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
    #[error("stock must be between 0 and 1000000000")]
    Stock,
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
            FieldError::Price => "price",
            FieldError::Stock => "stock",
            FieldError::Sku => "sku",
            FieldError::Category => "category",
            FieldError::ItemCount => "items",
            FieldError::Quantity => "quantity",
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

pub fn price(raw: Money) -> Result<Money, FieldError> {
    if raw.cents() <= 0 {
        return Err(FieldError::Price);
    }
    Ok(raw)
}

pub fn stock(raw: i64) -> Result<i64, FieldError> {
    if !(0..=MAX_STOCK).contains(&raw) {
        return Err(FieldError::Stock);
    }
    Ok(raw)
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
        assert!(price(Money::ZERO).is_err());
        assert!(stock(-1).is_err());
        assert!(stock(MAX_STOCK + 1).is_err());
        assert!(name("").is_err());
    }
}
