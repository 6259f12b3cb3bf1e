//! The identity extractors: a handler taking [`AuthUser`] is for signed-in users, [`Admin`] for
//! administrators, [`MaybeAuthUser`] for anyone (with the caller when known), and
//! [`ServiceCaller`] for the other services only.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{Auth, Caller, Rejection};

fn auth(parts: &Parts) -> Result<Arc<Auth>, Rejection> {
    parts
        .extensions
        .get::<Arc<Auth>>()
        .cloned()
        .ok_or(Rejection::NotConfigured)
}

/// A signed-in caller, customer or administrator (anyone in open mode): 401 otherwise.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        auth(parts)?
            .caller(&parts.headers)
            .await?
            .map(AuthUser)
            .ok_or(Rejection::Missing)
    }
}

/// An administrator (operator): 401 without a valid token, 403 for a customer.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let caller = auth(parts)?
            .caller(&parts.headers)
            .await?
            .ok_or(Rejection::Missing)?;
        if caller.is_admin() {
            Ok(Admin(caller))
        } else {
            Err(Rejection::NotAdmin)
        }
    }
}

/// Anyone; the caller when a token came with the request (a bad token is still a 401).
#[derive(Debug, Clone)]
pub struct MaybeAuthUser(pub Option<Caller>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeAuthUser {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(MaybeAuthUser(auth(parts)?.caller(&parts.headers).await?))
    }
}

/// Another Mercato service, by its service token (the name of the caller). Required in every
/// mode: `/internal/*` routes are never public.
#[derive(Debug, Clone)]
pub struct ServiceCaller(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ServiceCaller {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        auth(parts)?
            .service_caller(&parts.headers)
            .map(ServiceCaller)
    }
}
