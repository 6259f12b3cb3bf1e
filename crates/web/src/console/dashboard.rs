//! The live analytics dashboard: orders and revenue per window as charts fed by the analytics
//! stream (server-sent events, passed through with the operator's token), and the summary
//! figures (unique users, late events, the watermark) kept current by polling.

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kit::money::Money;
use maud::html;
use serde::Deserialize;
use uuid::Uuid;

use crate::Web;
use crate::format;
use crate::layout::{self, Face};
use crate::session::{Operator, Session};

#[derive(Deserialize)]
struct Summary {
    order_count: i64,
    unique_users: i64,
    total_revenue: Money,
    items_sold: i64,
    late_events: i64,
    #[serde(default)]
    watermark: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Deserialize)]
struct TopProduct {
    /// The events' product id: a UUID for Mercato's orders, any text in the seed's.
    product_id: String,
    #[serde(default)]
    quantity: i64,
    revenue: Money,
}

async fn figures(
    web: &Web,
    session: &Session,
) -> Result<Vec<(&'static str, &'static str, String)>, crate::api::ApiError> {
    let summary: Summary = web
        .api()
        .get(&session.visit, "/api/v1/analytics/summary")
        .await?;
    Ok(vec![
        ("orders", "Orders", summary.order_count.to_string()),
        ("revenue", "Revenue", web.money(summary.total_revenue)),
        (
            "unique-users",
            "Unique customers",
            summary.unique_users.to_string(),
        ),
        ("items", "Items sold", summary.items_sold.to_string()),
        (
            "late-events",
            "Late events",
            summary.late_events.to_string(),
        ),
        (
            "watermark",
            "Watermark",
            summary
                .watermark
                .map_or_else(|| "none yet".to_owned(), format::when),
        ),
    ])
}

pub async fn show(State(web): State<Web>, Operator(session): Operator) -> Response {
    let figures = match figures(&web, &session).await {
        Ok(figures) => figures,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    let top: Vec<TopProduct> = web
        .api()
        .get(&session.visit, "/api/v1/analytics/top-products?limit=5")
        .await
        .unwrap_or_default();
    let names = crate::shop::products_by_id(
        &web,
        &session.visit,
        top.iter()
            .filter_map(|t| t.product_id.parse::<Uuid>().ok())
            .collect(),
    )
    .await;
    let name_of = |id: &str| {
        id.parse::<Uuid>()
            .ok()
            .and_then(|id| names.get(&id))
            .map_or_else(|| id.to_owned(), |p| p.name.clone())
    };
    layout::page(
        &session,
        Face::Console,
        "Dashboard",
        html! {
            h1 { "Dashboard" }
            section data-analytics data-stream="/admin/analytics/stream" data-windows="/admin/analytics/windows" aria-labelledby="live" {
                h2 id="live" { "Live analytics" }
                ul class="figures" data-summary data-src="/admin/analytics/summary" {
                    @for (key, label, value) in &figures {
                        li { span { (label) } strong data-figure=(key) { (value) } }
                    }
                    li { span { "Orders in the charts" } strong data-figure="chart-orders" { "0" } }
                }
                h3 { "Orders per minute" }
                svg class="chart" data-chart="orders" role="img" aria-label="Orders per minute, the last 30 windows" viewBox="0 0 600 160" preserveAspectRatio="none" {
                    title { "Orders per minute" }
                }
                h3 { "Revenue per minute" }
                svg class="chart" data-chart="revenue" role="img" aria-label="Revenue per minute, the last 30 windows" viewBox="0 0 600 160" preserveAspectRatio="none" {
                    title { "Revenue per minute" }
                }
                p class="hint" { "Windows arrive as the analytics service closes or updates them; a new order shows within a second or two." }
            }
            h2 { "Top products" }
            @if top.is_empty() {
                p { "No sales yet." }
            } @else {
                table {
                    caption class="visually-hidden" { "Best-selling products by revenue" }
                    thead { tr { th scope="col" { "Product" } th scope="col" class="num" { "Units" } th scope="col" class="num" { "Revenue" } } }
                    tbody {
                        @for t in &top {
                            tr {
                                td { a href={"/admin/products/" (t.product_id)} { (name_of(&t.product_id)) } }
                                td class="num" { (t.quantity) }
                                td class="num" { (web.money(t.revenue)) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// The summary figures as JSON, for the dashboard's poll.
pub async fn summary(State(web): State<Web>, Operator(session): Operator) -> Response {
    match figures(&web, &session).await {
        Ok(figures) => {
            let map: serde_json::Map<String, serde_json::Value> = figures
                .into_iter()
                .map(|(key, _, value)| (key.to_owned(), value.into()))
                .collect();
            Json(map).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The last half hour's windows as JSON: what the charts start from before the stream's
/// updates arrive.
pub async fn windows(State(web): State<Web>, Operator(session): Operator) -> Response {
    let from = (chrono::Utc::now() - chrono::Duration::minutes(30))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let encoded: String = url::form_urlencoded::byte_serialize(from.as_bytes()).collect();
    match web
        .api()
        .get::<serde_json::Value>(
            &session.visit,
            &format!("/api/v1/analytics/windows?from={encoded}"),
        )
        .await
    {
        Ok(windows) => Json(windows).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The analytics stream, passed through as it comes (the browser's EventSource cannot send a
/// bearer token; the session cookie stands in for it here).
pub async fn stream(State(web): State<Web>, Operator(session): Operator) -> Response {
    match web
        .api()
        .call(
            &session.visit,
            Method::GET,
            "/api/v1/analytics/stream",
            None,
            None,
        )
        .await
    {
        Ok(response) if response.status().is_success() => {
            let (mut parts, body) = response.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, body)
        }
        Ok(response) => {
            (response.status(), "the analytics stream is not available").into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.message()).into_response(),
    }
}
