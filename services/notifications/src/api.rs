//! `GET /api/v1/notifications?user_id=&order_id=&limit=`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use kit::Problem;
use kit::auth::AuthUser;
use kit::extract::Query;
use serde::Deserialize;
use uuid::Uuid;

use crate::content::Notification;
use crate::store::{Filter, NotificationStore};

#[derive(Debug, Deserialize)]
pub struct ListParams {
    pub user_id: Option<Uuid>,
    pub order_id: Option<Uuid>,
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_limit() -> u32 {
    100
}

pub fn router(store: Arc<dyn NotificationStore>) -> Router {
    Router::new()
        .route("/api/v1/notifications", get(list_notifications))
        .with_state(store)
}

/// A customer sees their own notifications only (naming another user finds nothing: 404);
/// an administrator sees anyone's.
async fn list_notifications(
    State(store): State<Arc<dyn NotificationStore>>,
    AuthUser(caller): AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<Vec<Notification>>, Problem> {
    if params.limit == 0 || params.limit > 1000 {
        return Err(Problem::bad_request("limit must be between 1 and 1000"));
    }
    let user_id = if caller.is_admin() {
        params.user_id
    } else {
        match (params.user_id, caller.user_id()) {
            (Some(named), Some(own)) if named != own => {
                return Err(Problem::not_found("the user"));
            }
            (_, own) => own,
        }
    };
    let filter = Filter {
        user_id,
        order_id: params.order_id,
        limit: params.limit,
    };
    store.find(&filter).await.map(Json).map_err(|e| {
        // Logged, never sent; 503 when the database is out of reach (retry later).
        tracing::error!(error = %e, "notifications store failed");
        if e.is_unavailable() {
            Problem::unavailable("the notifications database")
        } else {
            Problem::internal()
        }
    })
}
