//! Shared plumbing for every Mercato service.
//!
//! A service crate builds its domain and routes; everything that must behave the same
//! across services (configuration, error bodies, metrics, shutdown, outbound HTTP, money,
//! SQLite and PostgreSQL setup, what a service's wiring needs to start) lives here so that it is written, and fixed, once.

pub mod auth;
pub mod client;
pub mod config;
pub mod db;
pub mod digest;
pub mod dynamo_url;
pub mod extract;
pub mod faults;
pub mod idempotency;
pub mod money;
pub mod page;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod problem;
pub mod server;
pub mod telemetry;
pub mod wiring;

pub use money::Money;
pub use problem::Problem;
