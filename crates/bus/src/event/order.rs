//! The order event on the `orders` stream and the order-events queue, and the one decoder every
//! consumer reads it through ([`OrderEvent::from_json`], [`OrderEvent::from_delivery`]).
//!
//! Two shapes are in circulation. Mercato's carries `event_id`, `currency`, RFC 3339 times and
//! `items[].unit_price`; the seed platform's (its Python order service, still feeding the same
//! topic and queue during a migration, and the files replayed from its archives) carries `id`,
//! no currency, naive ISO times (UTC by the seed's convention) and `items[].price`. Both decode
//! to the same [`OrderEvent`]. What Mercato writes carries the seed's names beside its own, so
//! the seed's consumers (its Spark job) read Mercato's events unchanged.

use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};
use kit::Money;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The currency of an event that names none (the seed's never do). Stands in for the
/// platform's `settings.currency`, whose default it is, until that setting reaches consumers.
pub const PLATFORM_CURRENCY: &str = "INR";

/// Namespace of the ids derived from an event's body when nothing else identifies it: the
/// same bytes delivered twice (a replayed file, a resent message) get the same id and count
/// once. The value is the one `mercato analytics replay` has always used for its lines.
pub const BODY_IDS: Uuid = Uuid::from_u128(0x6d65_7263_6174_6f00_0000_0000_0000_0002);

/// Namespace for CloudEvents ids that are not UUIDs (the spec allows any string): a foreign
/// producer's id still deduplicates, mapped into Mercato's id space.
pub const TRANSPORT_IDS: Uuid = Uuid::from_u128(0x6d65_7263_6174_6f00_0000_0000_0000_0004);

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not an order event: {0}")]
    Json(#[from] serde_json::Error),
}

/// An order event, whichever shape it arrived in.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderEvent {
    /// What consumers deduplicate by; see [`OrderEvent::from_delivery`] for where it comes from.
    pub event_id: Uuid,
    pub event_type: String,
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub total_amount: Money,
    /// `None` when the producer named no currency: the platform's ([`OrderEvent::currency_or`]).
    pub currency: Option<String>,
    pub status: String,
    pub items_count: i64,
    /// When the order was placed: the event time analytics windows by.
    pub created_at: DateTime<Utc>,
    /// When this event happened (equal to `created_at` for `order.created`).
    pub occurred_at: Option<DateTime<Utc>>,
    pub items: Vec<OrderEventItem>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "WireItem")]
pub struct OrderEventItem {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price: Money,
}

impl OrderEvent {
    /// Decodes a body that arrived without transport attributes (a file line, a raw body).
    pub fn from_json(body: impl AsRef<[u8]>) -> Result<OrderEvent, DecodeError> {
        OrderEvent::from_delivery(body, None)
    }

    /// Decodes a delivered body; `ce_id` is the CloudEvents id the transport carried with it
    /// (Kafka header or SQS message attribute), if any.
    ///
    /// The event id is, in order: the body's `event_id`; the seed's `id` when it is a UUID
    /// other than the order id (the seed may have put the order's own id there, which every
    /// event of the order shares); `ce_id`; a UUIDv5 of the body without surrounding
    /// whitespace. Every consumer applies this one rule, so each event is counted once
    /// however it reaches them.
    pub fn from_delivery(
        body: impl AsRef<[u8]>,
        ce_id: Option<&str>,
    ) -> Result<OrderEvent, DecodeError> {
        let body = body.as_ref();
        let wire: Wire = serde_json::from_slice(body)?;
        let event_id = wire
            .event_id
            .or(wire.id.filter(|id| *id != wire.order_id))
            .or_else(|| transport_id(ce_id))
            .unwrap_or_else(|| Uuid::new_v5(&BODY_IDS, body.trim_ascii()));
        Ok(OrderEvent {
            event_id,
            event_type: wire.event_type,
            order_id: wire.order_id,
            user_id: wire.user_id,
            total_amount: wire.total_amount,
            currency: wire.currency,
            status: wire.status,
            items_count: wire.items_count,
            created_at: wire.created_at,
            occurred_at: wire.occurred_at,
            items: wire.items,
        })
    }

    /// The event's currency, or `platform`'s when it names none.
    pub fn currency_or<'a>(&'a self, platform: &'a str) -> &'a str {
        self.currency.as_deref().unwrap_or(platform)
    }
}

/// The CloudEvents id as an event id: a UUID as it is, any other non-empty text mapped.
fn transport_id(ce_id: Option<&str>) -> Option<Uuid> {
    let text = ce_id.map(str::trim).filter(|t| !t.is_empty())?;
    Some(Uuid::parse_str(text).unwrap_or_else(|_| Uuid::new_v5(&TRANSPORT_IDS, text.as_bytes())))
}

/// Both shapes' fields. Unknown fields are ignored, as before: producers may add to the event.
#[derive(Deserialize)]
struct Wire {
    event_id: Option<Uuid>,
    #[serde(default, deserialize_with = "seed_id")]
    id: Option<Uuid>,
    event_type: String,
    order_id: Uuid,
    user_id: Uuid,
    total_amount: Money,
    currency: Option<String>,
    status: String,
    items_count: i64,
    #[serde(deserialize_with = "event_time")]
    created_at: DateTime<Utc>,
    #[serde(default, deserialize_with = "optional_event_time")]
    occurred_at: Option<DateTime<Utc>>,
    #[serde(default)]
    items: Vec<OrderEventItem>,
}

/// An item in either shape. Two fields rather than a serde alias: Mercato writes both names,
/// and an alias would reject that as a duplicate field.
#[derive(Deserialize)]
struct WireItem {
    product_id: Uuid,
    quantity: i64,
    unit_price: Option<Money>,
    price: Option<Money>,
}

impl TryFrom<WireItem> for OrderEventItem {
    type Error = &'static str;

    fn try_from(item: WireItem) -> Result<Self, Self::Error> {
        // Mercato's own name wins; it writes both with one value.
        let unit_price = item
            .unit_price
            .or(item.price)
            .ok_or("missing field `unit_price` (or the seed's `price`)")?;
        Ok(OrderEventItem {
            product_id: item.product_id,
            quantity: item.quantity,
            unit_price,
        })
    }
}

/// The seed's `id`: an event id only if it is a UUID as Python's `str(uuid)` writes it (the
/// hyphenated form, the one the Spark job recognises too); anything else there is not one.
fn seed_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Uuid>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(value
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .filter(|s| s.len() == HYPHENATED_LEN)
        .and_then(|s| Uuid::parse_str(s).ok()))
}

const HYPHENATED_LEN: usize = 36;

/// An event time: RFC 3339 with any offset (Mercato), or naive ISO 8601 as Python's
/// `datetime.isoformat()` writes it (the seed), which the seed meant as UTC.
pub fn parse_event_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = text.parse::<DateTime<FixedOffset>>() {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

fn event_time<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_event_time(&text).ok_or_else(|| {
        D::Error::custom(format!(
            "`{text}` is not an event time (RFC 3339, or naive ISO 8601 read as UTC)"
        ))
    })
}

fn optional_event_time<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    #[derive(Deserialize)]
    struct Time(#[serde(deserialize_with = "event_time")] DateTime<Utc>);
    Ok(Option::<Time>::deserialize(deserializer)?.map(|Time(t)| t))
}

/// What Mercato writes: its own fields, then the seed's names for the same values.
#[derive(Serialize)]
struct WireOut<'a> {
    event_id: Uuid,
    /// The seed's name for the event id.
    id: Uuid,
    event_type: &'a str,
    order_id: Uuid,
    user_id: Uuid,
    total_amount: Money,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    status: &'a str,
    items_count: i64,
    created_at: DateTime<Utc>,
    occurred_at: Option<DateTime<Utc>>,
    items: &'a [OrderEventItem],
}

impl Serialize for OrderEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireOut {
            event_id: self.event_id,
            id: self.event_id,
            event_type: &self.event_type,
            order_id: self.order_id,
            user_id: self.user_id,
            total_amount: self.total_amount,
            currency: self.currency.as_deref(),
            status: &self.status,
            items_count: self.items_count,
            created_at: self.created_at,
            occurred_at: self.occurred_at,
            items: &self.items,
        }
        .serialize(serializer)
    }
}

impl Serialize for OrderEventItem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out {
            product_id: Uuid,
            quantity: i64,
            unit_price: Money,
            /// The seed's name for the unit price.
            price: Money,
        }
        Out {
            product_id: self.product_id,
            quantity: self.quantity,
            unit_price: self.unit_price,
            price: self.unit_price,
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const ORDER: &str = "0a1b2c3d-0000-4000-8000-000000000001";
    const USER: &str = "0a1b2c3d-0000-4000-8000-0000000000aa";
    const PRODUCT: &str = "0a1b2c3d-0000-4000-8000-0000000000bb";
    const SEED_ID: &str = "0a1b2c3d-0000-4000-8000-00000000e5ed";
    const EVENT_ID: &str = "0a1b2c3d-0000-7000-8000-00000000e001";

    /// The event the seed's order service published (the brief of issue 12, verbatim shape).
    fn seed_body() -> Value {
        json!({
            "id": SEED_ID, "order_id": ORDER, "user_id": USER, "total_amount": 1999.99,
            "status": "pending", "items_count": 2, "event_type": "order.created",
            "created_at": "2024-01-01T10:00:00.123456",
            "items": [{"product_id": PRODUCT, "quantity": 1, "price": 999.99},
                      {"product_id": PRODUCT, "quantity": 1, "price": 1000.00}]
        })
    }

    fn decode(body: &Value) -> OrderEvent {
        OrderEvent::from_json(body.to_string()).unwrap()
    }

    fn with(mut body: Value, field: &str, value: Value) -> Value {
        body[field] = value;
        body
    }

    fn without(mut body: Value, field: &str) -> Value {
        if let Some(o) = body.as_object_mut() {
            o.remove(field);
        }
        body
    }

    fn mercato_event() -> OrderEvent {
        OrderEvent {
            event_id: EVENT_ID.parse().unwrap(),
            event_type: "order.paid".into(),
            order_id: ORDER.parse().unwrap(),
            user_id: USER.parse().unwrap(),
            total_amount: Money::from_cents(399_998).unwrap(),
            currency: Some("USD".into()),
            status: "paid".into(),
            items_count: 2,
            created_at: "2026-11-24T10:15:30.123Z".parse().unwrap(),
            occurred_at: Some("2026-11-24T10:16:00Z".parse().unwrap()),
            items: vec![OrderEventItem {
                product_id: PRODUCT.parse().unwrap(),
                quantity: 2,
                unit_price: Money::from_cents(199_999).unwrap(),
            }],
        }
    }

    #[test]
    fn the_seed_shape_decodes() {
        let e = decode(&seed_body());
        assert_eq!(e.event_id.to_string(), SEED_ID);
        assert_eq!(e.event_type, "order.created");
        assert_eq!(e.total_amount.to_string(), "1999.99");
        assert_eq!(e.currency, None);
        assert_eq!(e.items_count, 2);
        assert_eq!(
            e.created_at,
            "2024-01-01T10:00:00.123456Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        );
        assert_eq!(e.occurred_at, None);
        let prices: Vec<String> = e.items.iter().map(|i| i.unit_price.to_string()).collect();
        assert_eq!(prices, ["999.99", "1000.00"]);
    }

    #[test]
    fn price_is_the_seeds_name_for_unit_price() {
        let item = |v: Value| serde_json::from_value::<OrderEventItem>(v).map(|i| i.unit_price);
        let cents = |c| Ok::<_, ()>(Money::from_cents(c).unwrap());
        assert_eq!(
            item(json!({"product_id": PRODUCT, "quantity": 1, "price": 9.99})).map_err(|_| ()),
            cents(999)
        );
        assert_eq!(
            item(json!({"product_id": PRODUCT, "quantity": 1, "unit_price": "9.99"}))
                .map_err(|_| ()),
            cents(999)
        );
        // Both, as Mercato writes them: no duplicate-field error, and Mercato's name wins.
        assert_eq!(
            item(json!({"product_id": PRODUCT, "quantity": 1, "unit_price": 9.99, "price": 1.00}))
                .map_err(|_| ()),
            cents(999)
        );
        let neither = item(json!({"product_id": PRODUCT, "quantity": 1})).unwrap_err();
        assert!(neither.to_string().contains("unit_price"), "{neither}");
    }

    #[test]
    fn naive_times_are_utc_and_offsets_are_honoured() {
        let at = |text: &str| parse_event_time(text).map(|t| t.to_rfc3339());
        let utc = Some("2024-01-01T10:00:00.123456+00:00".to_owned());
        assert_eq!(at("2024-01-01T10:00:00.123456"), utc);
        assert_eq!(at("2024-01-01 10:00:00.123456"), utc, "str(datetime)");
        assert_eq!(at("2024-01-01T10:00:00.123456Z"), utc);
        assert_eq!(at("2024-01-01T15:30:00.123456+05:30"), utc);
        assert_eq!(
            at("2024-01-01T10:00:00"),
            Some("2024-01-01T10:00:00+00:00".to_owned()),
            "isoformat() of a whole second has no fraction"
        );
        assert_eq!(at("2024-01-01"), None);
        assert_eq!(at("yesterday"), None);
        let e = decode(&with(
            seed_body(),
            "occurred_at",
            json!("2024-01-01T10:00:01"),
        ));
        assert_eq!(e.occurred_at, parse_event_time("2024-01-01T10:00:01Z"));
        let bad = OrderEvent::from_json(with(seed_body(), "created_at", json!("soon")).to_string())
            .unwrap_err();
        assert!(
            bad.to_string().contains("`soon` is not an event time"),
            "{bad}"
        );
    }

    #[test]
    fn a_missing_currency_is_the_platforms() {
        let seed = decode(&seed_body());
        assert_eq!(seed.currency_or(PLATFORM_CURRENCY), "INR");
        let named = decode(&with(seed_body(), "currency", json!("USD")));
        assert_eq!(named.currency.as_deref(), Some("USD"));
        assert_eq!(named.currency_or(PLATFORM_CURRENCY), "USD");
        let null = decode(&with(seed_body(), "currency", Value::Null));
        assert_eq!(null.currency, None);
    }

    #[test]
    fn amounts_are_exact_from_numbers_or_strings() {
        // The amount's JSON text as sent: a serde_json::Value would pass numbers through f64.
        let body = |amount: &str| {
            with(seed_body(), "total_amount", json!("AMOUNT"))
                .to_string()
                .replace(r#""AMOUNT""#, amount)
        };
        for (amount, cents) in [
            ("1999.99", 199_999),
            (r#""1999.99""#, 199_999),
            ("0.1", 10),
            ("7", 700),
            (r#""0.30""#, 30),
            ("19.990", 1_999),
            // Beyond f64's 15-16 significant digits: a float would lose the cents.
            ("12345678901234567.89", 1_234_567_890_123_456_789),
        ] {
            let e = OrderEvent::from_json(body(amount)).unwrap();
            assert_eq!(e.total_amount.cents(), cents, "{amount}");
        }
        for amount in [
            "1.999",
            "0.30000000000000004",
            r#""-1.00""#,
            r#""ten""#,
            "true",
            "1e3",
        ] {
            assert!(
                OrderEvent::from_json(body(amount)).is_err(),
                "{amount} accepted"
            );
        }
    }

    #[test]
    fn the_event_id_wins_over_everything() {
        let body = with(seed_body(), "event_id", json!(EVENT_ID)).to_string();
        let e =
            OrderEvent::from_delivery(&body, Some("0a1b2c3d-0000-7000-8000-00000000ce01")).unwrap();
        assert_eq!(e.event_id.to_string(), EVENT_ID);
    }

    #[test]
    fn the_seeds_id_comes_next_unless_it_is_the_order_id() {
        let ce = "0a1b2c3d-0000-7000-8000-00000000ce01";
        let body = seed_body().to_string();
        let e = OrderEvent::from_delivery(&body, Some(ce)).unwrap();
        assert_eq!(e.event_id.to_string(), SEED_ID, "id before ce_id");

        // The seed's id being the order's: every event of the order would share it.
        let order_id = with(seed_body(), "id", json!(ORDER)).to_string();
        let e = OrderEvent::from_delivery(&order_id, Some(ce)).unwrap();
        assert_eq!(e.event_id.to_string(), ce);
        let upper = with(seed_body(), "id", json!(ORDER.to_uppercase())).to_string();
        assert_eq!(
            OrderEvent::from_delivery(&upper, Some(ce))
                .unwrap()
                .event_id
                .to_string(),
            ce,
            "compared as UUIDs, not as text"
        );

        for not_a_uuid in [
            json!("evt-17"),
            json!(17),
            json!(null),
            json!(""),
            json!(SEED_ID.replace('-', "")), // a UUID, but not as Python writes one
        ] {
            let body = with(seed_body(), "id", not_a_uuid.clone()).to_string();
            let e = OrderEvent::from_delivery(&body, Some(ce)).unwrap();
            assert_eq!(e.event_id.to_string(), ce, "{not_a_uuid} is no event id");
        }
    }

    #[test]
    fn the_transport_id_comes_next() {
        let body = without(seed_body(), "id").to_string();
        let ce = "0a1b2c3d-0000-7000-8000-00000000ce01";
        let e = OrderEvent::from_delivery(&body, Some(ce)).unwrap();
        assert_eq!(e.event_id.to_string(), ce);

        // A CloudEvents id may be any string: mapped, so equal ids still deduplicate.
        let a = OrderEvent::from_delivery(&body, Some("msg-42")).unwrap();
        let b = OrderEvent::from_delivery(&body, Some(" msg-42 ")).unwrap();
        let c = OrderEvent::from_delivery(&body, Some("msg-43")).unwrap();
        assert_eq!(a.event_id, Uuid::new_v5(&TRANSPORT_IDS, b"msg-42"));
        assert_eq!(a.event_id, b.event_id);
        assert_ne!(a.event_id, c.event_id);

        let empty = OrderEvent::from_delivery(&body, Some("")).unwrap();
        assert_eq!(
            empty.event_id,
            OrderEvent::from_json(&body).unwrap().event_id
        );
    }

    #[test]
    fn failing_all_else_the_body_names_the_event() {
        let body = without(seed_body(), "id").to_string();
        let e = OrderEvent::from_json(&body).unwrap();
        assert_eq!(e.event_id, Uuid::new_v5(&BODY_IDS, body.as_bytes()));
        assert_eq!(e.event_id.get_version_num(), 5);
        let padded = format!("  {body}\r\n");
        assert_eq!(
            OrderEvent::from_json(&padded).unwrap().event_id,
            e.event_id,
            "a replayed line is the same event whatever the line ending"
        );
        let other = with(without(seed_body(), "id"), "items_count", json!(3)).to_string();
        assert_ne!(OrderEvent::from_json(&other).unwrap().event_id, e.event_id);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for body in [
            "".to_owned(),
            "not json".to_owned(),
            "{}".to_owned(),
            without(seed_body(), "order_id").to_string(),
            with(seed_body(), "event_id", json!("evt-1")).to_string(),
            with(seed_body(), "items_count", json!("two")).to_string(),
        ] {
            assert!(
                matches!(OrderEvent::from_json(&body), Err(DecodeError::Json(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn mercato_writes_the_seeds_names_beside_its_own() {
        let e = mercato_event();
        let v: Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event_id"], EVENT_ID);
        assert_eq!(v["id"], EVENT_ID);
        assert_eq!(v["currency"], "USD");
        assert_eq!(v["created_at"], "2026-11-24T10:15:30.123Z");
        assert_eq!(v["items"][0]["unit_price"], v["items"][0]["price"]);
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains(r#""total_amount":3999.98"#), "{text}");
        assert!(text.contains(r#""price":1999.99"#), "a JSON number: {text}");
        let no_currency = OrderEvent {
            currency: None,
            ..mercato_event()
        };
        let v: Value = serde_json::to_value(&no_currency).unwrap();
        assert!(v.get("currency").is_none(), "{v}");
    }

    #[test]
    fn what_mercato_writes_decodes_to_itself() {
        for e in [
            mercato_event(),
            OrderEvent {
                currency: None,
                occurred_at: None,
                items: Vec::new(),
                ..mercato_event()
            },
        ] {
            let text = serde_json::to_string(&e).unwrap();
            assert_eq!(OrderEvent::from_json(&text).unwrap(), e);
        }
    }

    #[test]
    fn the_previous_mercato_shape_still_decodes() {
        // As published before `id` and `price` were added (the notifier's recorded fixtures).
        let body = r#"{"event_id":"01a20f00-0000-7000-8000-00000000e001","event_type":"order.created","order_id":"01a20f00-0000-7000-8000-000000000001","user_id":"01a20f00-0000-7000-8000-000000000001","total_amount":3999.98,"currency":"USD","status":"pending","items_count":2,"created_at":"2026-11-24T10:15:30.123Z","occurred_at":"2026-11-24T10:15:30.123Z","items":[{"product_id":"01a20f00-0000-7000-8000-0000000000aa","quantity":2,"unit_price":1999.99}]}"#;
        let e = OrderEvent::from_json(body).unwrap();
        assert_eq!(
            e.event_id.to_string(),
            "01a20f00-0000-7000-8000-00000000e001"
        );
        assert_eq!(e.items[0].unit_price.to_string(), "1999.99");
        assert_eq!(e.currency.as_deref(), Some("USD"));
    }
}
