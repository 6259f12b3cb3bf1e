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
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReservedLine {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price: Money,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reservation {
    pub order_id: Uuid,
    pub items: Vec<ReservedLine>,
}

impl Dependencies {
    pub async fn user(&self, id: Uuid) -> Result<UserRef, CallError> {
        self.users.get(&format!("/internal/v1/users/{id}")).await
    }

    /// All-or-nothing, idempotent per order id; returns the catalog prices.
    /// `hold_secs`: when to give the stock back if the order is never created or settled.
    pub async fn reserve(
        &self,
        order_id: Uuid,
        lines: &[(Uuid, i64)],
        hold_secs: u32,
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
                },
            )
            .await
    }

    /// Gives the order's stock back; succeeds when there was nothing to release.
    pub async fn release(&self, order_id: Uuid) -> Result<(), CallError> {
        match self
            .products
            .send(
                Method::DELETE,
                &format!("/internal/v1/reservations/{order_id}"),
                None::<&()>,
            )
            .await
        {
            Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => Ok(()),
            other => other,
        }
    }

    /// Makes the order's reservation permanent (it was paid).
    pub async fn commit(&self, order_id: Uuid) -> Result<(), CallError> {
        match self
            .products
            .send(
                Method::POST,
                &format!("/internal/v1/reservations/{order_id}/commit"),
                None::<&()>,
            )
            .await
        {
            Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => Ok(()),
            other => other,
        }
    }
}
