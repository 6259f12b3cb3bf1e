//! The API gateway: the platform's one public entry point.
//!
//! It knows the public route templates of every service ([`routes::PUBLIC_ROUTES`]) and
//! forwards matching requests, streaming bodies both ways and passing status and headers
//! through untouched except for hop-by-hop headers. Anything else, `/internal/...` included,
//! is a 404 here. Metrics are labelled by the route *template*, never the raw path. Rate
//! limits ([`limits`]) answer 429 before anything is forwarded.

pub mod limits;
pub mod proxy;
pub mod routes;
pub mod wiring;

pub use routes::{Upstreams, router};
