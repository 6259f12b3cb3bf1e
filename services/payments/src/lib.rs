//! The payments service: charges an order's amount (taken from the order, never the client)
//! through a deterministic simulated provider, allows one successful payment per order, and
//! refunds up to what was charged. Outcomes are written with their `payment.*` events in one
//! transaction (outbox → `payments` stream); the order is also moved at once over HTTP so a
//! client sees `paid` immediately, and the orders service applies the event again, harmlessly,
//! should that call fail.

pub mod api;
#[cfg(feature = "dynamodb")]
pub mod dynamo;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod provider;
pub mod store;
pub mod wiring;

pub use api::{ApiContext, router};
#[cfg(feature = "postgres")]
pub use pg::PgPaymentStore;
pub use store::{PaymentStore, SqlitePaymentStore};
