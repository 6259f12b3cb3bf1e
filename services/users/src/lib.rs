//! The users service: customers with a unique, validated email.
//!
//! Routes (see [`api`]): `POST/GET /api/v1/users`, `GET/DELETE /api/v1/users/{id}`.
//! Other services ask it whether a user exists (the orders saga's first step).

pub mod api;
pub mod domain;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod store;

pub use api::router;
pub use store::{SqliteUserStore, UserStore};
