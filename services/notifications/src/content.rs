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
            "Your order was cancelled and its items released. Nothing was charged.".to_owned(),
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
