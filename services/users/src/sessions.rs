//! Signing in and out: `POST /api/v1/auth/token` (password and refresh-token grants),
//! `POST /api/v1/auth/logout`, and the public keys at `/.well-known/jwks.json`.
//!
//! An access token is a short-lived JWT (see `kit::auth`); a refresh token is 32 random bytes,
//! stored only as its SHA-256, rotated at every use. Presenting a refresh token that was
//! already rotated means two parties hold it, so its whole family (every token descended from
//! that sign-in) is revoked and both must sign in again (OAuth 2.0 Security BCP, 4.14).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kit::Problem;
use kit::config::Secret;
use kit::db::now_ms;
use kit::extract::{self, ClientAddress};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::{ApiContext, internal};
use crate::domain::Email;
use crate::store::{RefreshRecord, RefreshUse, User};

#[derive(Debug, Deserialize)]
pub struct TokenRequest {
    /// `password` (the default when `email` is given) or `refresh_token`.
    #[serde(default)]
    pub grant_type: Option<String>,
    #[serde(default, alias = "username")]
    pub email: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub refresh_token: Option<Secret>,
}

#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
    pub user: User,
}

#[derive(Debug, Deserialize)]
pub struct LogoutRequest {
    pub refresh_token: Secret,
}

/// The same answer for an unknown e-mail, an account without a password and a wrong
/// password, so the answer says nothing about which accounts exist.
fn bad_credentials() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "invalid-credentials",
        "Invalid credentials",
    )
    .with_detail("the e-mail or password is wrong")
}

fn bad_refresh_token() -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "invalid-grant", "Invalid grant")
        .with_detail("the refresh token is not valid; sign in again")
}

/// A refused sign-in, as the answer to send (boxed: a response is large).
type Refused = Box<Response>;

fn too_many_attempts(wait: Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let mut response = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too-many-attempts",
        "Too many attempts",
    )
    .with_detail(format!(
        "too many failed sign-ins; try again in {secs} seconds"
    ))
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn hash_token(token: &str) -> String {
    kit::digest::sha256_hex(token.as_bytes())
}

fn new_refresh_token() -> Result<String, Problem> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        tracing::error!(error = %e, "no randomness for a refresh token");
        Problem::internal()
    })?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

pub async fn token(
    State(ctx): State<ApiContext>,
    ClientAddress(client): ClientAddress,
    extract::Json(body): extract::Json<TokenRequest>,
) -> Response {
    let grant = body
        .grant_type
        .clone()
        .unwrap_or_else(|| "password".to_owned());
    let answer = match grant.as_str() {
        "password" => password_grant(&ctx, &client, body).await,
        "refresh_token" => refresh_grant(&ctx, body).await,
        other => Err(Box::new(
            Problem::invalid(format!(
                "grant_type `{}` is not supported (password, refresh_token)",
                other.chars().take(40).collect::<String>()
            ))
            .with("field", "grant_type")
            .into_response(),
        )),
    };
    match answer {
        Ok(tokens) => {
            let mut response = Json(tokens).into_response();
            // RFC 6749 5.1: token answers must not be cached.
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(response) => *response,
    }
}

async fn password_grant(
    ctx: &ApiContext,
    client: &str,
    body: TokenRequest,
) -> Result<TokenResponse, Refused> {
    let (Some(email), Some(password)) = (body.email, body.password) else {
        return Err(Box::new(
            Problem::invalid("email and password are required for the password grant")
                .into_response(),
        ));
    };
    // Bounded: the throttle keeps these keys.
    let account_key: String = email.trim().to_lowercase().chars().take(254).collect();
    if let Err(wait) = ctx.throttle.check(&account_key, client) {
        return Err(Box::new(too_many_attempts(wait)));
    }
    if password.expose().len() > 4 * crate::password::MAX_CHARS {
        ctx.throttle.failed(&account_key, client);
        return Err(Box::new(bad_credentials().into_response()));
    }
    // Not a valid address: no account can have it, but the attempt still costs a hash.
    let found = match Email::parse(&email) {
        Ok(email) => ctx
            .store
            .credentials(&email)
            .await
            .map_err(|e| Box::new(internal(e).into_response()))?,
        Err(_) => None,
    };
    let stored = found.as_ref().and_then(|(_, hash)| hash.as_deref());
    let matches = ctx
        .hasher
        .verify(password.expose(), stored)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "checking a password failed");
            Problem::internal().into_response()
        })?;
    let user = match (matches, found) {
        (true, Some((user, _))) => user,
        _ => {
            ctx.throttle.failed(&account_key, client);
            tracing::info!(client, "failed sign-in");
            return Err(Box::new(bad_credentials().into_response()));
        }
    };
    ctx.throttle.succeeded(&account_key);
    let refresh_token = new_refresh_token().map_err(|p| Box::new(p.into_response()))?;
    ctx.store
        .issue_refresh(&RefreshRecord {
            token_hash: hash_token(&refresh_token),
            family: Uuid::now_v7(),
            user_id: user.id,
            expires_at_ms: now_ms().saturating_add(ttl_ms(ctx.refresh_ttl)),
        })
        .await
        .map_err(|e| Box::new(internal(e).into_response()))?;
    issue(ctx, user, refresh_token)
}

async fn refresh_grant(ctx: &ApiContext, body: TokenRequest) -> Result<TokenResponse, Refused> {
    let Some(presented) = body.refresh_token else {
        return Err(Box::new(
            Problem::invalid("refresh_token is required for the refresh_token grant")
                .with("field", "refresh_token")
                .into_response(),
        ));
    };
    let next = new_refresh_token().map_err(|p| Box::new(p.into_response()))?;
    let outcome = ctx
        .store
        .use_refresh(
            &hash_token(presented.expose()),
            &RefreshRecord {
                token_hash: hash_token(&next),
                // The store keeps the presented token's family.
                family: Uuid::nil(),
                user_id: Uuid::nil(),
                expires_at_ms: now_ms().saturating_add(ttl_ms(ctx.refresh_ttl)),
            },
            now_ms(),
        )
        .await
        .map_err(|e| Box::new(internal(e).into_response()))?;
    match outcome {
        RefreshUse::Rotated(user) => issue(ctx, user, next),
        RefreshUse::Reused => {
            tracing::warn!("a rotated refresh token was presented again: its family is revoked");
            Err(Box::new(bad_refresh_token().into_response()))
        }
        RefreshUse::Invalid => Err(Box::new(bad_refresh_token().into_response())),
    }
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

fn issue(ctx: &ApiContext, user: User, refresh_token: String) -> Result<TokenResponse, Refused> {
    let access = ctx.issuer.access_token(user.id, user.role).map_err(|e| {
        tracing::error!(error = %e, "signing an access token failed");
        Box::new(Problem::internal().into_response())
    })?;
    Ok(TokenResponse {
        access_token: access.token,
        token_type: "Bearer",
        expires_in: access.expires_in,
        refresh_token,
        refresh_expires_in: ctx.refresh_ttl.as_secs(),
        user,
    })
}

/// Signs out: the refresh token's family is revoked. 204 whether or not it was known, so the
/// route tells nobody which tokens exist. Access tokens already issued run out on their own.
pub async fn logout(
    State(ctx): State<ApiContext>,
    extract::Json(body): extract::Json<LogoutRequest>,
) -> Result<StatusCode, Problem> {
    ctx.store
        .revoke_refresh(&hash_token(body.refresh_token.expose()))
        .await
        .map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The public keys access tokens are signed with, current and previous.
pub async fn jwks(State(ctx): State<ApiContext>) -> Response {
    let mut response = Json(ctx.issuer.jwks()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_are_random_and_stored_as_their_hash() {
        let (a, b) = (new_refresh_token().unwrap(), new_refresh_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43, "32 bytes, base64url without padding");
        assert_eq!(hash_token(&a).len(), 64);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), a);
    }
}
