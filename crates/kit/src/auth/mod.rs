//! Identity and access control, the same in every service.
//!
//! - [`TokenIssuer`] (the users service) signs short-lived access tokens: JWTs, EdDSA, with
//!   `iss`, `aud`, `exp`, `sub` = the user id and the user's roles, under a `kid` published
//!   at `/.well-known/jwks.json`.
//! - [`Verifier`] checks them in every service (defence in depth: reaching a pod inside the
//!   cluster is no way around it), and those of configured OIDC providers (Cognito).
//! - [`ServiceKey`] signs and checks the credentials services send to each other's
//!   `/internal/*` routes.
//! - The extractors ([`AuthUser`], [`Admin`], [`MaybeAuthUser`], [`ServiceCaller`]) make a
//!   handler's signature say who may call it. They find the [`Auth`] in the request's
//!   extensions, put there by [`Auth::layer`] when the service's router is assembled.
//!
//! With `auth.mode = "open"` every extractor but [`ServiceCaller`] admits anyone, as the seed's
//! platform did; start-up and `/ready` warn about it.

mod caller;
mod extract;
pub mod keys;
mod service;
mod verify;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

pub use caller::{Caller, Role};
pub use extract::{Admin, AuthUser, MaybeAuthUser, ServiceCaller};
pub use keys::{KeyError, KeyRing, PublicKey, SigningKey};
pub use service::ServiceKey;
pub use verify::{OwnKeys, TokenError, Verifier};

use crate::config::{AuthMode, AuthSettings};
use crate::problem::Problem;

/// What every service's extractors consult.
#[derive(Debug)]
pub struct Auth {
    mode: AuthMode,
    verifier: Verifier,
    services: Arc<ServiceKey>,
}

impl Auth {
    pub fn new(mode: AuthMode, verifier: Verifier, services: Arc<ServiceKey>) -> Arc<Auth> {
        Arc::new(Auth {
            mode,
            verifier,
            services,
        })
    }

    pub fn is_open(&self) -> bool {
        self.mode == AuthMode::Open
    }

    pub fn service_key(&self) -> &Arc<ServiceKey> {
        &self.services
    }

    /// Adds this `Auth` to every request of a router, for the extractors.
    pub fn layer(self: &Arc<Self>) -> axum::Extension<Arc<Auth>> {
        axum::Extension(self.clone())
    }

    /// The caller a request's bearer token names: `Ok(None)` without a token, an error for a
    /// token that does not verify (a bad token is refused, never treated as no token). In
    /// open mode everyone is admitted; a valid token still names the caller.
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Option<Caller>, Rejection> {
        let token = match bearer(headers) {
            Bearer::Absent => None,
            Bearer::Malformed => return Err(Rejection::BadToken),
            Bearer::Token(token) => Some(token),
        };
        let verified = match token {
            None => None,
            Some(token) => match self.verifier.verify(token).await {
                Ok(caller) => Some(caller),
                Err(e) => {
                    tracing::debug!(reason = %e, "bearer token refused");
                    if self.is_open() {
                        None
                    } else if matches!(e, TokenError::KeysUnavailable(_)) {
                        return Err(Rejection::KeysUnavailable);
                    } else {
                        return Err(Rejection::BadToken);
                    }
                }
            },
        };
        if self.is_open() {
            return Ok(Some(Caller::open(
                verified.and_then(|caller| caller.user_id()),
            )));
        }
        Ok(verified)
    }

    /// The calling service's name, from its service token.
    pub fn service_caller(&self, headers: &HeaderMap) -> Result<String, Rejection> {
        match bearer(headers) {
            Bearer::Token(token) => self.services.verify(token).map_err(|e| {
                tracing::debug!(reason = %e, "service token refused");
                Rejection::BadToken
            }),
            Bearer::Absent => Err(Rejection::Missing),
            Bearer::Malformed => Err(Rejection::BadToken),
        }
    }
}

enum Bearer<'a> {
    Absent,
    Malformed,
    Token(&'a str),
}

fn bearer(headers: &HeaderMap) -> Bearer<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Bearer::Absent;
    };
    let Ok(value) = value.to_str() else {
        return Bearer::Malformed;
    };
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Bearer::Token(token.trim())
        }
        _ => Bearer::Malformed,
    }
}

/// Why a request was refused before its handler ran. Every variant answers without saying
/// what exactly was wrong with a token (no oracle for forgers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No credentials where some are needed: 401.
    Missing,
    /// Credentials that do not verify: 401.
    BadToken,
    /// Verified, but the route is for administrators: 403.
    NotAdmin,
    /// The issuer's keys could not be fetched: 503 (the token may well be good).
    KeysUnavailable,
    /// The service was assembled without [`Auth::layer`]: a wiring fault, 500.
    NotConfigured,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::Missing => unauthorized("this route needs a bearer token", None),
            Rejection::BadToken => unauthorized(
                "the bearer token is not valid; sign in again",
                Some("invalid_token"),
            ),
            Rejection::NotAdmin => forbidden("this route is for administrators").into_response(),
            Rejection::KeysUnavailable => {
                Problem::unavailable("the identity provider's keys").into_response()
            }
            Rejection::NotConfigured => {
                tracing::error!("a route needs identity but the service has no auth layer");
                Problem::internal().into_response()
            }
        }
    }
}

fn unauthorized(detail: &str, error: Option<&str>) -> Response {
    let mut response = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
        .with_detail(detail)
        .into_response();
    let challenge = match error {
        Some(error) => format!(r#"Bearer realm="mercato", error="{error}""#),
        None => r#"Bearer realm="mercato""#.to_owned(),
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// 403: the caller is known but may not do this.
pub fn forbidden(detail: &str) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden").with_detail(detail)
}

/// Signs Mercato's access tokens (the users service holds it).
#[derive(Debug)]
pub struct TokenIssuer {
    ring: KeyRing,
    issuer: String,
    audience: String,
    ttl: Duration,
}

#[derive(Debug, Serialize)]
struct AccessClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: String,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
    roles: [&'static str; 1],
}

/// A signed access token and its lifetime in seconds.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub token: String,
    pub expires_in: u64,
}

impl TokenIssuer {
    pub fn new(ring: KeyRing, settings: &AuthSettings) -> TokenIssuer {
        TokenIssuer {
            ring,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            ttl: Duration::from_secs(settings.access_token_ttl_secs.max(1)),
        }
    }

    pub fn access_token(&self, user: Uuid, role: Role) -> Result<AccessToken, KeyError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = AccessClaims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: user.to_string(),
            iat: now,
            nbf: now,
            exp: now + self.ttl.as_secs(),
            jti: Uuid::new_v4().to_string(),
            roles: [role.as_str()],
        };
        Ok(AccessToken {
            // RFC 9068's media type for JWT access tokens.
            token: self.ring.current.sign("at+jwt", &claims)?,
            expires_in: self.ttl.as_secs(),
        })
    }

    /// The public keys tokens may be signed with (`/.well-known/jwks.json`).
    pub fn jwks(&self) -> serde_json::Value {
        self.ring.jwks()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The signing keys from settings (`auth.signing_key[_file]` + `auth.previous_public_keys`),
/// else the ring kept in `<data_dir>/auth/`.
pub fn signing_ring(settings: &AuthSettings, data_dir: &Path) -> Result<KeyRing, SetupError> {
    let configured = match (&settings.signing_key, &settings.signing_key_file) {
        (Some(pem), _) => Some(SigningKey::from_pem(pem.expose(), "auth.signing_key")?),
        (None, Some(path)) => Some(SigningKey::from_file(path)?),
        (None, None) => None,
    };
    let ttl = Duration::from_secs(settings.access_token_ttl_secs);
    let mut ring = match configured {
        Some(current) => KeyRing {
            current,
            previous: Vec::new(),
        },
        None => keys::ring_in_dir(&data_dir.join("auth"), ttl)?,
    };
    for (i, pem) in settings.previous_public_keys.iter().enumerate() {
        ring.previous.push(PublicKey::from_pem(
            pem,
            &format!("auth.previous_public_keys[{i}]"),
        )?);
    }
    Ok(ring)
}

/// The service key from settings (`auth.service_key[_file]`), else `<data_dir>/auth/service.pem`.
pub fn service_key(settings: &AuthSettings, data_dir: &Path) -> Result<ServiceKey, SetupError> {
    let key = match (&settings.service_key, &settings.service_key_file) {
        (Some(pem), _) => SigningKey::from_pem(pem.expose(), "auth.service_key")?,
        (None, Some(path)) => SigningKey::from_file(path)?,
        (None, None) => keys::key_in_file(&data_dir.join("auth").join("service.pem"))?,
    };
    Ok(ServiceKey::new(key))
}
