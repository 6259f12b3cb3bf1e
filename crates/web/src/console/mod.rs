//! The operator console: live analytics, catalog and stock, orders with their timeline and the
//! legal moves only, refunds, and the platform's health and pipeline.

pub mod catalog;
pub mod dashboard;
pub mod orders;
pub mod platform;
