//! The payments service: charges an order's amount (taken from the order, never the client)
//! through a [`provider::PaymentProvider`] (Stripe, or a deterministic simulator outside
//! production), refunds up to what was charged, and gives the money back when the orders
//! service compensates a cancelled order.
//!
//! A payment is recorded as a `pending` intent before the provider is called, with at most one
//! intent in flight or successful per order, and the provider is called with a key derived
//! from the payment: a retry or a crash between charge and record never charges twice, and
//! the reconciler finishes what a crash left pending. Outcomes are written with their
//! `payment.*` events in one transaction (outbox → `payments` stream); the order is also moved
//! at once over HTTP so a client sees `paid` immediately, and the orders service applies the
//! event again, harmlessly, should that call fail.

pub mod api;
#[cfg(feature = "dynamodb")]
pub mod dynamo;
pub mod faults;
pub mod flow;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod provider;
pub mod simulator;
pub mod store;
pub mod stripe;
pub mod wiring;

pub use api::{ApiContext, router};
#[cfg(feature = "postgres")]
pub use pg::PgPaymentStore;
pub use store::{PaymentStore, SqlitePaymentStore};
