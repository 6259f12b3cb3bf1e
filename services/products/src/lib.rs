//! The products service: the catalog, its stock, and stock reservations.
//!
//! Public routes (see [`api`]): `/api/v1/products[/{id}]`, `/api/v1/products/{id}/stock`.
//! Internal routes, for the orders saga only: `/internal/v1/reservations[/{order_id}[/commit]]`.
//! A reservation takes stock for every item of an order at once or for none, under any
//! concurrency, and is keyed by the order id so a retried call reserves nothing twice.

pub mod api;
pub mod demo;
pub mod domain;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod store;
pub mod wiring;

pub use api::router;
pub use store::{ProductStore, SqliteProductStore};
