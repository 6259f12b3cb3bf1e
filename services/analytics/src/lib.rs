//! Real-time order analytics over the `orders` stream.
//!
//! [`engine`] is pure: event-time tumbling windows and the arithmetic on them. [`store`]
//! keeps window state in SQLite and applies each event exactly once (by event id, in the same
//! transaction as the state change), so a replay after a crash never double-counts.
//! [`consumer`] feeds it from the stream; [`api`] answers `/api/v1/analytics/...`;
//! [`results`] publishes final windows (the watermark has passed them) to the
//! `analytics-results` stream and an object store, and merges several instances' outputs.
//! [`sketch`] is the mergeable HyperLogLog of distinct users; [`revenue`] the 128-bit sums of
//! money that no number of orders can overflow.

pub mod api;
pub mod consumer;
pub mod engine;
pub mod feed;
pub mod replay;
pub mod results;
pub mod revenue;
pub mod sketch;
pub mod store;
pub mod wiring;

pub use api::router;
pub use store::AnalyticsStore;
