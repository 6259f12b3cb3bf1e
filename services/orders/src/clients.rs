//! The orders service's view of its dependencies: the users and products services over HTTP.

use http::Method;
use kit::Money;
use kit::client::{CallError, ServiceClient};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Dependencies {
    pub users: ServiceClient,
    pub products: ServiceClient,
}

#[derive(Debug, Deserialize)]
pub struct UserRef {
    pub id: Uuid,
}

#[derive(Debug, Serialize)]
struct ReserveItem {
    product_id: Uuid,
    quantity: i64,
}

#[derive(Debug, Serialize)]
struct ReserveRequest<'a> {
    order_id: Uuid,
    items: &'a [ReserveItem],
    hold_secs: u32,
    attempt: Uuid,
    renew: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReservedLine {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price: Money,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Held,
    Released,
    Committed,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reservation {
    pub order_id: Uuid,
    /// Only a held reservation can carry a new order: a released one's stock may be sold to
    /// someone else, a committed one belongs to a paid order.
    pub status: ReservationStatus,
    /// When the products service gives the stock back unless the order settles; `None`: never.
    #[serde(default)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub items: Vec<ReservedLine>,
}

impl Dependencies {
    pub async fn user(&self, id: Uuid) -> Result<UserRef, CallError> {
        self.users.get(&format!("/internal/v1/users/{id}")).await
    }

    /// All-or-nothing, idempotent per order id; returns the catalog prices. For an order not
    /// created yet: a reservation this order id already has passes to `attempt`, and one
    /// released meanwhile (a failed earlier attempt's, given back) is taken again.
    /// `hold_secs`: when to give the stock back if the order is never created or settled.
    pub async fn reserve(
        &self,
        order_id: Uuid,
        lines: &[(Uuid, i64)],
        hold_secs: u32,
        attempt: Uuid,
    ) -> Result<Reservation, CallError> {
        let items: Vec<ReserveItem> = lines
            .iter()
            .map(|(product_id, quantity)| ReserveItem {
                product_id: *product_id,
                quantity: *quantity,
            })
            .collect();
        self.products
            .post(
                "/internal/v1/reservations",
                &ReserveRequest {
                    order_id,
                    items: &items,
                    hold_secs,
                    attempt,
                    renew: true,
                },
            )
            .await
    }

    /// Gives the order's stock back; succeeds when there was nothing to release.
    pub async fn release(&self, order_id: Uuid) -> Result<(), CallError> {
        self.release_at(&format!("/internal/v1/reservations/{order_id}"))
            .await
    }

    /// Gives back the stock `attempt` reserved for an order it failed to create, unless a
    /// later attempt (a retry) holds the reservation by now.
    pub async fn release_attempt(&self, order_id: Uuid, attempt: Uuid) -> Result<(), CallError> {
        self.release_at(&format!(
            "/internal/v1/reservations/{order_id}?attempt={attempt}"
        ))
        .await
    }

    async fn release_at(&self, path: &str) -> Result<(), CallError> {
        match self.products.send(Method::DELETE, path, None::<&()>).await {
            Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => Ok(()),
            other => other,
        }
    }

    /// Makes the order's reservation permanent (it was paid). A reservation that is gone
    /// (404: released and pruned after its retention) is refused like a released one: the
    /// order's stock is not held, so it cannot be sold.
    pub async fn commit(&self, order_id: Uuid) -> Result<(), CallError> {
        self.products
            .send(
                Method::POST,
                &format!("/internal/v1/reservations/{order_id}/commit"),
                None::<&()>,
            )
            .await
    }
}
