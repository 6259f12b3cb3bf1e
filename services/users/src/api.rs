//! HTTP handlers and DTOs of the users service.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use kit::Problem;
use kit::extract::{self, PageParams, Path, Query};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::{Email, Phone, UserName};
use crate::store::{StoreError, User, UserStore};

#[derive(Debug, Deserialize)]
pub struct CreateUser {
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub phone: Option<String>,
}

pub fn router(store: Arc<dyn UserStore>) -> Router {
    Router::new()
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/{id}", get(get_user).delete(delete_user))
        .with_state(store)
}

/// Infrastructure failures: 503 when the database is out of reach (retry later), else 500.
/// Either way the cause is logged, never sent.
fn internal(e: StoreError) -> Problem {
    tracing::error!(error = %e, "users store failed");
    if e.is_unavailable() {
        Problem::unavailable("the users database")
    } else {
        Problem::internal()
    }
}

async fn create_user(
    State(store): State<Arc<dyn UserStore>>,
    extract::Json(body): extract::Json<CreateUser>,
) -> Result<(StatusCode, Json<User>), Problem> {
    let name = UserName::parse(&body.name)
        .map_err(|e| Problem::invalid(e.to_string()).with("field", "name"))?;
    let email = Email::parse(&body.email)
        .map_err(|e| Problem::invalid(e.to_string()).with("field", "email"))?;
    let phone = body
        .phone
        .as_deref()
        .map(Phone::parse)
        .transpose()
        .map_err(|e| Problem::invalid(e.to_string()).with("field", "phone"))?;
    match store.create(&name, &email, phone.as_ref()).await {
        Ok(user) => Ok((StatusCode::CREATED, Json(user))),
        Err(StoreError::DuplicateEmail) => Err(Problem::conflict(
            "email-taken",
            "a user with this email already exists",
        )),
        Err(e) => Err(internal(e)),
    }
}

async fn get_user(
    State(store): State<Arc<dyn UserStore>>,
    Path(id): Path<Uuid>,
) -> Result<Json<User>, Problem> {
    store
        .get(id)
        .await
        .map_err(internal)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the user"))
}

async fn list_users(
    State(store): State<Arc<dyn UserStore>>,
    Query(page): Query<PageParams>,
) -> Result<Json<Vec<User>>, Problem> {
    let page = page.checked()?;
    Ok(Json(
        store.list(page.skip, page.limit).await.map_err(internal)?,
    ))
}

async fn delete_user(
    State(store): State<Arc<dyn UserStore>>,
    Path(id): Path<Uuid>,
) -> Result<impl IntoResponse, Problem> {
    if store.delete(id).await.map_err(internal)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::not_found("the user"))
    }
}
