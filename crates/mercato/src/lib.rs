//! The composition root: builds services from [`kit::config::Settings`] and runs them.
//! `main.rs` is only the command line; tests start the platform through [`startup`].

pub mod startup;

pub use startup::{Platform, ServiceName};
