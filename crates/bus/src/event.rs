//! The event envelope (CloudEvents 1.0 attributes, carried as headers / message attributes in
//! binary mode) and the payload schemas services agree on.
//!
//! The payload stays the seed's order event, so the seed's own consumers can read it; its
//! `event_id` and `event_type` repeat the envelope's so a consumer that only sees the body
//! (a Lambda fed raw SQS bodies) can still deduplicate. The order event and its decoding (both
//! Mercato's shape and the seed's) live in [`order`].

use chrono::{DateTime, SecondsFormat, Utc};
use kit::Money;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{BusError, Headers, OutgoingMessage, Record};

pub mod order;

pub use order::{DecodeError, OrderEvent, OrderEventItem, PLATFORM_CURRENCY};

pub mod types {
    pub const ORDER_CREATED: &str = "order.created";
    pub const ORDER_PAID: &str = "order.paid";
    pub const ORDER_CANCELLED: &str = "order.cancelled";
    pub const ORDER_REFUNDED: &str = "order.refunded";
    /// Money taken for an order that could no longer be paid (it was cancelled or expired
    /// while the customer paid) was given back: the order itself does not change.
    pub const ORDER_PAYMENT_REFUNDED: &str = "order.payment_refunded";
    pub const PAYMENT_SUCCEEDED: &str = "payment.succeeded";
    pub const PAYMENT_FAILED: &str = "payment.failed";
    pub const PAYMENT_REFUNDED: &str = "payment.refunded";
}

/// Header / attribute names (CloudEvents' Kafka binding uses the `ce_` prefix).
pub mod attr {
    pub const ID: &str = "ce_id";
    pub const TYPE: &str = "ce_type";
    pub const SOURCE: &str = "ce_source";
    pub const SUBJECT: &str = "ce_subject";
    pub const TIME: &str = "ce_time";
    pub const SPEC_VERSION: &str = "ce_specversion";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const TRACEPARENT: &str = "traceparent";
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub event_type: String,
    pub source: String,
    /// What the event is about (an order id); also the stream partitioning key.
    pub subject: String,
    pub time: DateTime<Utc>,
    pub traceparent: Option<String>,
    /// The JSON payload.
    pub data: String,
}

impl Event {
    pub fn new<T: Serialize>(
        id: Uuid,
        event_type: &str,
        source: &str,
        subject: String,
        data: &T,
    ) -> Result<Event, serde_json::Error> {
        Ok(Event {
            id,
            event_type: event_type.to_owned(),
            source: source.to_owned(),
            subject,
            time: Utc::now(),
            // Set where the event is written: the outbox row takes the writing span's context
            // (`outbox_headers`).
            traceparent: None,
            data: serde_json::to_string(data)?,
        })
    }

    pub fn headers(&self) -> Headers {
        let mut h = Headers::new();
        h.insert(attr::ID.into(), self.id.to_string());
        h.insert(attr::TYPE.into(), self.event_type.clone());
        h.insert(attr::SOURCE.into(), self.source.clone());
        h.insert(attr::SUBJECT.into(), self.subject.clone());
        h.insert(
            attr::TIME.into(),
            self.time.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
        h.insert(attr::SPEC_VERSION.into(), "1.0".into());
        h.insert(attr::CONTENT_TYPE.into(), "application/json".into());
        if let Some(tp) = &self.traceparent {
            h.insert(attr::TRACEPARENT.into(), tp.clone());
        }
        h
    }

    /// The headers an outbox row keeps: the trace context is the span writing the row (on
    /// SQLite the transaction's), so the relay's send continues from the transaction.
    pub fn outbox_headers(&self) -> Headers {
        let mut headers = self.headers();
        if let Some(tp) = kit::telemetry::propagation::traceparent_of(&tracing::Span::current()) {
            headers.insert(attr::TRACEPARENT.into(), tp);
        }
        headers
    }

    pub fn to_record(&self) -> Record {
        Record {
            key: self.subject.clone(),
            headers: self.headers(),
            payload: self.data.clone().into_bytes(),
        }
    }

    pub fn to_message(&self) -> OutgoingMessage {
        OutgoingMessage {
            id: self.id.to_string(),
            body: self.data.clone(),
            attributes: self.headers(),
        }
    }

    /// Rebuilds an event from headers and payload, as a stream or queue delivers it.
    pub fn from_parts(headers: &Headers, payload: &[u8]) -> Result<Event, BusError> {
        let get = |name: &str| {
            headers
                .get(name)
                .cloned()
                .ok_or_else(|| BusError::Malformed(format!("missing header {name}")))
        };
        let id = get(attr::ID)?
            .parse()
            .map_err(|_| BusError::Malformed("ce_id is not a UUID".into()))?;
        let time = DateTime::parse_from_rfc3339(&get(attr::TIME)?)
            .map_err(|_| BusError::Malformed("ce_time is not RFC 3339".into()))?
            .with_timezone(&Utc);
        Ok(Event {
            id,
            event_type: get(attr::TYPE)?,
            source: get(attr::SOURCE)?,
            subject: get(attr::SUBJECT)?,
            time,
            traceparent: headers.get(attr::TRACEPARENT).cloned(),
            data: String::from_utf8(payload.to_vec())
                .map_err(|_| BusError::Malformed("payload is not UTF-8".into()))?,
        })
    }
}

/// A payment outcome, on the `payments` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub payment_id: Uuid,
    pub order_id: Uuid,
    pub amount: Money,
    pub currency: String,
    pub status: String,
    pub occurred_at: DateTime<Utc>,
    /// The payment's version when this event was written: 1 for its outcome (succeeded or
    /// failed), one more for each refund. With `payment_id` it lets a consumer tell a stale or
    /// reordered event from a newer one. 0 in events written before versions existed.
    #[serde(default)]
    pub sequence: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_headers() {
        let mut e = Event::new(
            Uuid::new_v4(),
            types::ORDER_CREATED,
            "mercato/orders",
            "o-1".into(),
            &serde_json::json!({"a": 1}),
        )
        .unwrap();
        e.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let r = e.to_record();
        assert_eq!(r.key, "o-1");
        let back = Event::from_parts(&r.headers, &r.payload).unwrap();
        assert_eq!(back.id, e.id);
        assert_eq!(back.traceparent, e.traceparent);
        assert_eq!(back.data, e.data);
        assert_eq!(back.time.timestamp_millis(), e.time.timestamp_millis());
    }

    #[test]
    fn missing_id_is_malformed() {
        let h = Headers::new();
        assert!(matches!(
            Event::from_parts(&h, b"{}"),
            Err(BusError::Malformed(_))
        ));
    }
}
