//! `mercato load` and `mercato verify`: drive a Mercato deployment like a shop's traffic and
//! check afterwards that the books balance.
//!
//! - [`plan`]: what a run does (journeys and weights, think times, arrival model, faults);
//! - [`target`]: the HTTP calls, each one classified as the answer a step expected or not;
//! - [`journeys`]: the user journeys, step by step, with the ledger of what was accepted;
//! - [`run`]: the driver (open arrival rate or fixed users, latency from the intended start);
//! - [`stats`] and [`report`]: HDR histograms per step, and the text, JSON and HTML reports;
//! - [`verify`]: the invariants, read back through the API.
//!
//! Built on `hdrhistogram` and `indicatif` with the project's own HTTP client (reqwest) rather
//! than `goose`: goose's users are closed-model loops (an arrival rate is not its model and a
//! stalled server slows the senders, which hides the tail), and its reports cannot carry the
//! ledger the verifier needs. See docs/operations.md, "Running a fault drill".

pub mod cli;
pub mod journeys;
pub mod plan;
pub mod report;
pub mod run;
pub mod stats;
pub mod target;
pub mod verify;

pub use cli::{LoadArgs, VerifyArgs, load_command, verify_command};

/// Why a run or a verification could not go on (not a failed invariant: those are a report).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Plan(String),
    #[error("setting up the run: {0}")]
    Setup(String),
    #[error("the target answered {what}: {detail}")]
    Target { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl LoadError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoadError {
        let what = what.into();
        move |source| LoadError::Io { what, source }
    }
}
