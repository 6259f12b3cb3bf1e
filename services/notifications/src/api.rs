//! `GET /api/v1/notifications?user_id=&order_id=&limit=&cursor=`, paged as every list is
//! (`kit::page`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::routing::get;
use axum::{Json, Router};
use kit::Problem;
use kit::auth::AuthUser;
use kit::extract::Query;
use kit::page::{self, PageRequest};
use serde::Deserialize;
use uuid::Uuid;

use crate::content::Notification;
use crate::store::{Filter, NotificationStore, StoreError};

#[derive(Debug, Deserialize)]
pub struct ListParams {
    pub user_id: Option<Uuid>,
    pub order_id: Option<Uuid>,
    #[serde(default = "kit::page::default_limit")]
    pub limit: u32,
    pub skip: Option<u32>,
    pub cursor: Option<String>,
}

pub fn router(store: Arc<dyn NotificationStore>) -> Router {
    Router::new()
        .route("/api/v1/notifications", get(list_notifications))
        .with_state(store)
}

/// A customer sees their own notifications only (naming another user finds nothing: 404);
/// an administrator sees anyone's, and alone may list without naming a user or an order (on
/// DynamoDB that is a scan, however it is paged).
async fn list_notifications(
    State(store): State<Arc<dyn NotificationStore>>,
    AuthUser(caller): AuthUser,
    uri: Uri,
    Query(params): Query<ListParams>,
) -> Result<(HeaderMap, Json<Vec<Notification>>), Problem> {
    let page = PageRequest::parse(params.limit, params.skip, params.cursor.as_deref())?;
    let user_id = if caller.is_admin() {
        params.user_id
    } else {
        match (params.user_id, caller.user_id()) {
            (Some(named), Some(own)) if named != own => {
                return Err(Problem::not_found("the user"));
            }
            (_, Some(own)) => Some(own),
            // A service token that names no user: only an administrator lists everything.
            (_, None) => {
                return Err(kit::auth::forbidden(
                    "only an administrator may list every notification",
                ));
            }
        }
    };
    let filter = Filter {
        user_id,
        order_id: params.order_id,
        page,
    };
    let page = store.find(&filter).await.map_err(|e| {
        if let StoreError::BadCursor(bad) = e {
            return bad.into();
        }
        // Logged, never sent; 503 when the database is out of reach (retry later).
        tracing::error!(error = %e, "notifications store failed");
        if e.is_unavailable() {
            Problem::unavailable("the notifications database")
        } else {
            Problem::internal()
        }
    })?;
    Ok((page::link_headers(&uri, &page), Json(page.items)))
}
