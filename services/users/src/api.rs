//! HTTP handlers and DTOs of the users service: accounts, and the routes other services use.
//! Signing in lives in [`crate::sessions`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use kit::Problem;
use kit::auth::{Admin, AuthUser, MaybeAuthUser, Rejection, Role, ServiceCaller, TokenIssuer};
use kit::config::Secret;
use kit::extract::{self, Path, Query};
use kit::page::{self, PageParams};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::{Email, Phone, UserName};
use crate::password::{Hasher, Password};
use crate::sessions;
use crate::store::{StoreError, User, UserStore};
use crate::throttle::LoginThrottle;

/// What every handler works with.
#[derive(Clone)]
pub struct ApiContext {
    pub store: Arc<dyn UserStore>,
    pub hasher: Hasher,
    /// Signs access tokens (the users service alone holds the signing key).
    pub issuer: Arc<TokenIssuer>,
    pub throttle: Arc<LoginThrottle>,
    pub refresh_ttl: std::time::Duration,
}

impl std::fmt::Debug for ApiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiContext").finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
pub struct CreateUser {
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub phone: Option<String>,
    /// Required when registering oneself; an operator (or open mode) may create an account
    /// without one, which cannot sign in until it has one.
    #[serde(default)]
    pub password: Option<Secret>,
}

pub fn router(ctx: ApiContext) -> Router {
    Router::new()
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/me", get(me))
        .route("/api/v1/users/{id}", get(get_user).delete(delete_user))
        .route("/internal/v1/users/{id}", get(get_user_internal))
        .route("/api/v1/auth/token", post(sessions::token))
        .route("/api/v1/auth/logout", post(sessions::logout))
        .route("/.well-known/jwks.json", get(sessions::jwks))
        .with_state(ctx)
}

/// Infrastructure failures: 503 when the database is out of reach (retry later), else 500.
/// Either way the cause is logged, never sent.
pub(crate) fn internal(e: StoreError) -> Problem {
    if let StoreError::BadCursor(bad) = e {
        return bad.into();
    }
    tracing::error!(error = %e, "users store failed");
    if e.is_unavailable() {
        Problem::unavailable("the users database")
    } else {
        Problem::internal()
    }
}

fn invalid(field: &'static str, e: impl std::fmt::Display) -> Problem {
    Problem::invalid(e.to_string()).with("field", field)
}

async fn create_user(
    State(ctx): State<ApiContext>,
    MaybeAuthUser(caller): MaybeAuthUser,
    extract::Json(body): extract::Json<CreateUser>,
) -> Result<(StatusCode, Json<User>), Problem> {
    let name = UserName::parse(&body.name).map_err(|e| invalid("name", e))?;
    let email = Email::parse(&body.email).map_err(|e| invalid("email", e))?;
    let phone = body
        .phone
        .as_deref()
        .map(Phone::parse)
        .transpose()
        .map_err(|e| invalid("phone", e))?;
    let operator = caller.as_ref().is_some_and(|c| c.is_admin());
    let password = match &body.password {
        Some(raw) => Some(Password::parse(raw.expose()).map_err(|e| invalid("password", e))?),
        None if operator => None,
        None => return Err(invalid("password", "password is required")),
    };
    let hash = match password {
        Some(password) => Some(ctx.hasher.hash(password).await.map_err(|e| {
            tracing::error!(error = %e, "hashing a password failed");
            Problem::internal()
        })?),
        None => None,
    };
    match ctx
        .store
        .register(
            &name,
            &email,
            phone.as_ref(),
            hash.as_deref(),
            Role::Customer,
        )
        .await
    {
        Ok(user) => Ok((StatusCode::CREATED, Json(user))),
        Err(StoreError::DuplicateEmail) => Err(Problem::conflict(
            "email-taken",
            "a user with this email already exists",
        )),
        Err(e) => Err(internal(e)),
    }
}

/// The signed-in user's own account.
async fn me(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
) -> Result<Json<User>, axum::response::Response> {
    let Some(id) = caller.user_id() else {
        return Err(Rejection::Missing.into_response());
    };
    ctx.store
        .get(id)
        .await
        .map_err(|e| internal(e).into_response())?
        .map(Json)
        .ok_or_else(|| {
            Problem::not_found("an account for this identity")
                .with_detail("signed in with an external provider and never registered here")
                .into_response()
        })
}

/// A user's record: their own, or anyone's for an administrator; 404 for everyone else.
async fn get_user(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<User>, Problem> {
    if !caller.may_access(id) {
        return Err(Problem::not_found("the user"));
    }
    find(&ctx, id).await
}

/// For the other services (the orders saga asks whether a user exists).
async fn get_user_internal(
    State(ctx): State<ApiContext>,
    ServiceCaller(_): ServiceCaller,
    Path(id): Path<Uuid>,
) -> Result<Json<User>, Problem> {
    find(&ctx, id).await
}

async fn find(ctx: &ApiContext, id: Uuid) -> Result<Json<User>, Problem> {
    ctx.store
        .get(id)
        .await
        .map_err(internal)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the user"))
}

async fn list_users(
    State(ctx): State<ApiContext>,
    Admin(_): Admin,
    uri: Uri,
    Query(params): Query<PageParams>,
) -> Result<(HeaderMap, Json<Vec<User>>), Problem> {
    let page = ctx.store.list(&params.checked()?).await.map_err(internal)?;
    Ok((page::link_headers(&uri, &page), Json(page.items)))
}

/// Closing an account: its owner or an administrator.
async fn delete_user(
    State(ctx): State<ApiContext>,
    AuthUser(caller): AuthUser,
    Path(id): Path<Uuid>,
) -> Result<impl IntoResponse, Problem> {
    if caller.may_access(id) && ctx.store.delete(id).await.map_err(internal)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::not_found("the user"))
    }
}
