//! What the pages read from the API: the fields they show, nothing more (the API's own types
//! live in the service crates, which a front end must not depend on).

use chrono::{DateTime, Utc};
use kit::money::Money;
use serde::Deserialize;
use uuid::Uuid;

#[derive(Debug, Clone, Deserialize)]
pub struct Product {
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub price: Money,
    pub sku: String,
    pub category: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StockLevel {
    pub available: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price: Money,
    pub line_total: Money,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Order {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: String,
    pub items: Vec<OrderLine>,
    pub total_amount: Money,
    pub shipping_address: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl Order {
    /// The address as one line of text.
    pub fn address_line(&self) -> String {
        match &self.shipping_address {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Object(fields) => ["street", "city", "state", "zip", "country"]
                .iter()
                .filter_map(|key| fields.get(*key).and_then(|v| v.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct UserOrders {
    pub orders: Vec<Order>,
    #[serde(default)]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Payment {
    pub id: Uuid,
    pub amount: Money,
    pub currency: String,
    pub status: String,
    #[serde(default)]
    pub card_brand: Option<String>,
    #[serde(default)]
    pub card_last4: Option<String>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    pub refunded_amount: Money,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OrderPayments {
    pub payments: Vec<Payment>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Notification {
    pub event_type: String,
    pub order_id: Uuid,
    pub subject: String,
    pub body: String,
    pub amount: Money,
    pub currency: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
}

/// The token answer. Not `Debug`: its tokens must never reach a log line.
#[derive(Clone, Deserialize)]
pub struct SignedIn {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
}
