//! `GET /api/v1/analytics/windows?from=&to=` and `GET /api/v1/analytics/summary`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use kit::Problem;
use kit::extract::Query;
use serde::Deserialize;

use crate::engine::{ProductSales, WindowReport};
use crate::feed::Feed;
use crate::store::{AnalyticsStore, Summary};

/// The widest range one request may ask for.
const MAX_RANGE_DAYS: i64 = 31;

#[derive(Debug, Deserialize)]
pub struct Range {
    /// RFC 3339; an hour before `to` when absent.
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339; now when absent.
    pub to: Option<DateTime<Utc>>,
}

pub fn router(store: AnalyticsStore, feed: Feed) -> Router {
    Router::new()
        .route("/api/v1/analytics/windows", get(windows))
        .route("/api/v1/analytics/summary", get(summary))
        .route("/api/v1/analytics/top-products", get(top_products))
        .with_state(store)
        .merge(
            Router::new()
                .route("/api/v1/analytics/stream", get(crate::feed::stream))
                .with_state(feed),
        )
        // Every analytics route is for operators.
        .route_layer(axum::middleware::from_extractor::<kit::auth::Admin>())
}

fn internal(e: impl std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "analytics store failed");
    Problem::internal()
}

async fn windows(
    State(store): State<AnalyticsStore>,
    Query(range): Query<Range>,
) -> Result<Json<Vec<WindowReport>>, Problem> {
    let (from, to) = checked(&range)?;
    Ok(Json(
        store.windows_between(from, to).await.map_err(internal)?,
    ))
}

/// Not `#[serde(flatten)]` over [`Range`]: flattening makes query numbers arrive as strings.
#[derive(Debug, Deserialize)]
pub struct TopParams {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    #[serde(default = "default_top")]
    pub limit: u32,
}

fn default_top() -> u32 {
    10
}

fn checked(range: &Range) -> Result<(DateTime<Utc>, DateTime<Utc>), Problem> {
    let to = range
        .to
        .unwrap_or_else(|| Utc::now() + Duration::minutes(1));
    let from = range.from.unwrap_or(to - Duration::hours(1));
    if from >= to {
        return Err(Problem::bad_request("`from` must be before `to`"));
    }
    if to - from > Duration::days(MAX_RANGE_DAYS) {
        return Err(Problem::bad_request(format!(
            "a range may span at most {MAX_RANGE_DAYS} days"
        )));
    }
    Ok((from, to))
}

async fn top_products(
    State(store): State<AnalyticsStore>,
    Query(params): Query<TopParams>,
) -> Result<Json<Vec<ProductSales>>, Problem> {
    if params.limit == 0 || params.limit > 100 {
        return Err(Problem::bad_request("limit must be between 1 and 100"));
    }
    let (from, to) = checked(&Range {
        from: params.from,
        to: params.to,
    })?;
    Ok(Json(
        store
            .top_products(from, to, params.limit)
            .await
            .map_err(internal)?,
    ))
}

async fn summary(State(store): State<AnalyticsStore>) -> Result<Json<Summary>, Problem> {
    Ok(Json(store.summary().await.map_err(internal)?))
}
