//! The users service: accounts (unique, validated e-mail; argon2id passwords; a role), signing
//! in and out with access and refresh tokens, and the public keys that verify the tokens.
//!
//! Routes (see [`api`] and [`sessions`]): `POST/GET /api/v1/users`, `GET /api/v1/users/me`,
//! `GET/DELETE /api/v1/users/{id}`, `POST /api/v1/auth/token`, `POST /api/v1/auth/logout`,
//! `GET /.well-known/jwks.json`, and `GET /internal/v1/users/{id}` for the other services
//! (the orders saga's first step asks whether a user exists).

pub mod api;
pub mod bootstrap;
pub mod domain;
pub mod password;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod sessions;
pub mod store;
pub mod throttle;
pub mod wiring;

pub use api::{ApiContext, router};
pub use store::{SqliteUserStore, UserStore};
