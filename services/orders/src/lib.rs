//! The orders service: where the order saga runs.
//!
//! Creating an order (see [`api`]): check the user (users service), reserve all stock at once
//! keyed by the order id (products service), price the order from the catalog, then write the
//! order and its `order.created` outbox rows in one transaction. The relay publishes them to
//! the `orders` stream and the `order-events` queue. [`saga`] applies payment outcomes from the
//! `payments` stream and cancels unpaid orders when they expire, releasing their stock; a
//! payment that succeeds for an order that can no longer be paid is refunded through
//! [`compensation`].

pub mod api;
pub mod clients;
pub mod compensation;
pub mod domain;
#[cfg(feature = "dynamodb")]
pub mod dynamo;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod saga;
pub mod store;
pub mod wiring;

pub use api::{ApiContext, router};
#[cfg(feature = "postgres")]
pub use pg::PgOrderStore;
pub use store::{OrderStore, SqliteOrderStore};
