//! What a notification says for each order event: channel-neutral subject and body.

use bus::event::{OrderEvent, PLATFORM_CURRENCY, types};
use chrono::{DateTime, Utc};
use kit::Money;
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Notification {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub order_id: Uuid,
    pub user_id: Uuid,
    /// Who it is for; a user reference until a contact directory is wired in.
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub amount: Money,
    pub currency: String,
    pub created_at: DateTime<Utc>,
}

/// The notification for `event`, or `None` for event types nobody is told about.
pub fn compose(event: &OrderEvent, now: DateTime<Utc>) -> Option<Notification> {
    let short = &event.order_id.simple().to_string()[..8];
    let currency = event.currency_or(PLATFORM_CURRENCY);
    let total = format!("{} {currency}", event.total_amount);
    let (subject, body) = match event.event_type.as_str() {
        types::ORDER_CREATED => (
            format!("Order {short} received"),
            format!(
                "We received your order of {} item(s) totalling {total}. It is reserved for you until payment.",
                event.items_count
            ),
        ),
        types::ORDER_PAID => (
            format!("Payment received for order {short}"),
            format!("Your payment of {total} was received. We are preparing your order."),
        ),
        "order.payment_failed" => (
            format!("Payment failed for order {short}"),
            "Your payment could not be completed. Nothing was charged.".to_owned(),
        ),
        types::ORDER_CANCELLED => (
            format!("Order {short} cancelled"),
            "Your order was cancelled and its items released. You pay nothing for it: a payment that still arrives is refunded in full.".to_owned(),
        ),
        types::ORDER_PAYMENT_REFUNDED => (
            format!("Payment refunded for order {short}"),
            format!("Your payment of {total} arrived after the order was cancelled, so it has been refunded in full to your original payment method."),
        ),
        types::ORDER_REFUNDED => (
            format!("Order {short} refunded"),
            format!("{total} has been refunded to your original payment method."),
        ),
        "order.shipped" => (
            format!("Order {short} shipped"),
            "Your order is on its way.".to_owned(),
        ),
        "order.delivered" => (
            format!("Order {short} delivered"),
            "Your order was delivered. Enjoy!".to_owned(),
        ),
        _ => return None,
    };
    Some(Notification {
        id: Uuid::now_v7(),
        event_id: event.event_id,
        event_type: event.event_type.clone(),
        order_id: event.order_id,
        user_id: event.user_id,
        recipient: format!("user:{}", event.user_id),
        subject,
        body,
        amount: event.total_amount,
        currency: currency.to_owned(),
        created_at: now,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn event(event_type: &str) -> OrderEvent {
        let body = serde_json::json!({
            "event_id": Uuid::now_v7(),
            "event_type": event_type,
            "order_id": "0192f0c1-0000-7000-8000-000000000001",
            "user_id": Uuid::now_v7(),
            "total_amount": "1999.50",
            "currency": "INR",
            "status": "cancelled",
            "items_count": 2,
            "created_at": "2026-12-01T10:00:00Z",
            "items": [],
        });
        OrderEvent::from_json(body.to_string()).unwrap()
    }

    #[test]
    fn a_payment_given_back_after_a_cancellation_is_told_with_its_amount() {
        let note = compose(&event(types::ORDER_PAYMENT_REFUNDED), Utc::now()).unwrap();
        assert_eq!(note.subject, "Payment refunded for order 0192f0c1");
        assert!(
            note.body.contains("1999.50 INR") && note.body.contains("refunded in full"),
            "{}",
            note.body
        );
        assert_eq!(note.amount, Money::from_cents(199_950).unwrap());
    }

    #[test]
    fn a_cancellation_never_promises_that_nothing_was_charged() {
        // A payment may still land after it; the refund notice then follows.
        let note = compose(&event(types::ORDER_CANCELLED), Utc::now()).unwrap();
        assert!(!note.body.contains("Nothing was charged"), "{}", note.body);
        assert!(note.body.contains("refunded in full"), "{}", note.body);
    }
}
