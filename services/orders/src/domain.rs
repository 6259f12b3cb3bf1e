//! Order rules with no I/O: the state machine and what a valid order request is.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Paid,
    PaymentFailed,
    Shipped,
    Delivered,
    Cancelled,
    Refunded,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] = [
        OrderStatus::Pending,
        OrderStatus::Paid,
        OrderStatus::PaymentFailed,
        OrderStatus::Shipped,
        OrderStatus::Delivered,
        OrderStatus::Cancelled,
        OrderStatus::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Paid => "paid",
            OrderStatus::PaymentFailed => "payment_failed",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Refunded => "refunded",
        }
    }

    /// The legal moves: pending → paid → shipped → delivered; pending → payment_failed →
    /// cancelled; pending → cancelled; paid → refunded.
    pub fn can_become(self, next: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (self, next),
            (Pending, Paid)
                | (Pending, PaymentFailed)
                | (Pending, Cancelled)
                | (PaymentFailed, Cancelled)
                | (Paid, Shipped)
                | (Paid, Refunded)
                | (Shipped, Delivered)
        )
    }

    /// Moves an operator may request through the public API; the rest follow payments.
    pub fn settable_by_operator(self) -> bool {
        matches!(
            self,
            OrderStatus::Shipped | OrderStatus::Delivered | OrderStatus::Cancelled
        )
    }

    /// The event published when an order enters this status.
    pub fn event_type(self) -> String {
        format!("order.{}", self.as_str())
    }

    /// Whether stock held for the order must go back when it enters this status.
    pub fn releases_stock(self) -> bool {
        matches!(self, OrderStatus::Cancelled)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OrderStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("items must hold 1 to 100 entries")]
    ItemCount,
    #[error("quantity must be between 1 and 10000")]
    Quantity,
    #[error("shipping_address must be 1 to 500 characters")]
    ShippingAddress,
}

impl OrderError {
    pub fn field(&self) -> &'static str {
        match self {
            OrderError::ItemCount => "items",
            OrderError::Quantity => "quantity",
            OrderError::ShippingAddress => "shipping_address",
        }
    }
}

/// A validated order request: lines merged per product, quantities and address in range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    pub user_id: Uuid,
    pub lines: Vec<(Uuid, i64)>,
    pub shipping_address: String,
}

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: i64 = 10_000;

impl OrderRequest {
    pub fn parse(
        user_id: Uuid,
        items: &[(Uuid, i64)],
        shipping_address: &str,
    ) -> Result<OrderRequest, OrderError> {
        if items.is_empty() || items.len() > MAX_LINES {
            return Err(OrderError::ItemCount);
        }
        let mut merged: BTreeMap<Uuid, i64> = BTreeMap::new();
        for (product, quantity) in items {
            if !(1..=MAX_QUANTITY).contains(quantity) {
                return Err(OrderError::Quantity);
            }
            let total = merged.entry(*product).or_insert(0);
            *total += quantity;
            if *total > MAX_QUANTITY {
                return Err(OrderError::Quantity);
            }
        }
        let address = shipping_address.trim();
        let len = address.chars().count();
        if len == 0 || len > 500 || address.chars().any(|c| c.is_control() && c != '\n') {
            return Err(OrderError::ShippingAddress);
        }
        Ok(OrderRequest {
            user_id,
            lines: merged.into_iter().collect(),
            shipping_address: address.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    #[test]
    fn only_the_documented_moves_are_legal() {
        let legal = [
            (Pending, Paid),
            (Pending, PaymentFailed),
            (Pending, Cancelled),
            (PaymentFailed, Cancelled),
            (Paid, Shipped),
            (Paid, Refunded),
            (Shipped, Delivered),
        ];
        for from in OrderStatus::ALL {
            for to in OrderStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn statuses_round_trip_as_text() {
        for s in OrderStatus::ALL {
            assert_eq!(s.as_str().parse::<OrderStatus>(), Ok(s));
        }
        assert!("lost".parse::<OrderStatus>().is_err());
        assert_eq!(Cancelled.event_type(), "order.cancelled");
    }

    #[test]
    fn requests_are_validated_and_merged() {
        let (u, a, b) = (Uuid::from_u128(9), Uuid::from_u128(2), Uuid::from_u128(1));
        let r = OrderRequest::parse(u, &[(a, 1), (b, 2), (a, 4)], " 1 Main St ").unwrap();
        assert_eq!(r.lines, vec![(b, 2), (a, 5)]);
        assert_eq!(r.shipping_address, "1 Main St");
        assert_eq!(OrderRequest::parse(u, &[], "x"), Err(OrderError::ItemCount));
        assert_eq!(
            OrderRequest::parse(u, &[(a, 0)], "x"),
            Err(OrderError::Quantity)
        );
        assert_eq!(
            OrderRequest::parse(u, &[(a, -2)], "x"),
            Err(OrderError::Quantity)
        );
        assert_eq!(
            OrderRequest::parse(u, &[(a, 1)], "  "),
            Err(OrderError::ShippingAddress)
        );
    }
}

/// A shipping address as the seed's clients send it: `{"street", "city", "state", "zip",
/// "country"?}` (`country` defaults to India). Stored as its compact JSON text, so every
/// backend keeps it in the one text column a plain-string address uses, and answered as an
/// object again (see [`address_json`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub street: String,
    pub city: String,
    pub state: String,
    pub zip: String,
    #[serde(default = "default_country")]
    pub country: String,
}

fn default_country() -> String {
    "India".to_owned()
}

/// `shipping_address` in a request: free text, or the seed's structured address.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum AddressInput {
    Text(String),
    Structured(Address),
}

impl AddressInput {
    /// The text to store: free text as sent (checked by [`OrderRequest::parse`]), or the
    /// structured address checked field by field and written as compact JSON.
    pub fn to_stored(&self) -> Result<String, OrderError> {
        match self {
            AddressInput::Text(text) => Ok(text.clone()),
            AddressInput::Structured(a) => {
                let fields = [
                    (&a.street, 200),
                    (&a.city, 60),
                    (&a.state, 60),
                    (&a.zip, 12),
                    (&a.country, 56),
                ];
                for (value, max) in fields {
                    let len = value.trim().chars().count();
                    if len == 0 || len > max || value.chars().any(char::is_control) {
                        return Err(OrderError::ShippingAddress);
                    }
                }
                let trimmed = Address {
                    street: a.street.trim().to_owned(),
                    city: a.city.trim().to_owned(),
                    state: a.state.trim().to_owned(),
                    zip: a.zip.trim().to_owned(),
                    country: a.country.trim().to_owned(),
                };
                serde_json::to_string(&trimmed).map_err(|_| OrderError::ShippingAddress)
            }
        }
    }
}

/// Serde helpers for a stored address: a structured one is answered as an object, free text
/// as a string; either is read back.
pub mod address_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Address;

    pub fn serialize<S: Serializer>(stored: &str, serializer: S) -> Result<S::Ok, S::Error> {
        match stored
            .starts_with('{')
            .then(|| serde_json::from_str::<Address>(stored).ok())
            .flatten()
        {
            Some(address) => address.serialize(serializer),
            None => serializer.serialize_str(stored),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
        match super::AddressInput::deserialize(deserializer)? {
            super::AddressInput::Text(text) => Ok(text),
            super::AddressInput::Structured(address) => {
                serde_json::to_string(&address).map_err(serde::de::Error::custom)
            }
        }
    }
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn the_seeds_structured_address_round_trips_as_an_object() {
        let input: AddressInput = serde_json::from_str(
            r#"{"street": " 12 MG Road ", "city": "Pune", "state": "MH", "zip": "411001"}"#,
        )
        .unwrap();
        let stored = input.to_stored().unwrap();
        assert_eq!(
            stored,
            r#"{"street":"12 MG Road","city":"Pune","state":"MH","zip":"411001","country":"India"}"#
        );
        #[derive(serde::Serialize)]
        struct Shown<'a>(#[serde(with = "address_json")] &'a str);
        let shown = serde_json::to_value(Shown(&stored)).unwrap();
        assert_eq!(shown["city"], "Pune");
        assert_eq!(shown["country"], "India");
        assert_eq!(
            serde_json::to_value(Shown("1 Main St")).unwrap(),
            "1 Main St"
        );
        let text: AddressInput = serde_json::from_str(r#""1 Main St""#).unwrap();
        assert_eq!(text.to_stored().unwrap(), "1 Main St");
        let missing_zip: Result<AddressInput, _> =
            serde_json::from_str(r#"{"street": "x", "city": "y", "state": "z"}"#);
        assert!(missing_zip.is_err());
        let empty: AddressInput = serde_json::from_str(
            r#"{"street": "", "city": "Pune", "state": "MH", "zip": "411001"}"#,
        )
        .unwrap();
        assert_eq!(empty.to_stored(), Err(OrderError::ShippingAddress));
    }
}
