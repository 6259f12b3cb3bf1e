//! The catalog with search, category filter and pages; a product's page with its live
//! availability.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;
use uuid::Uuid;

use crate::Web;
use crate::api::Listed;
use crate::layout::{self, Face, csrf_field};
use crate::model::{Product, StockLevel};
use crate::session::Visitor;

/// Products on one catalog page.
const PAGE_SIZE: u32 = 12;

#[derive(Deserialize, Default)]
pub struct CatalogQuery {
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            out.append_pair(name, value);
        }
    }
    out.finish()
}

/// The categories of the catalog's first few hundred products, kept for a minute (the filter's
/// choices; the API has no category list of its own).
static CATEGORIES: Mutex<Option<(Instant, Vec<String>)>> = Mutex::new(None);

async fn categories(web: &Web, session: &crate::session::Session) -> Vec<String> {
    if let Ok(cached) = CATEGORIES.lock()
        && let Some((at, list)) = cached.as_ref()
        && at.elapsed() < Duration::from_secs(60)
    {
        return list.clone();
    }
    let mut found: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..3 {
        let path = format!(
            "/api/v1/products?{}",
            query_string(&[("limit", Some("100")), ("cursor", cursor.as_deref())])
        );
        let Ok(Listed { items, next }) =
            web.api().list::<Vec<Product>>(&session.visit, &path).await
        else {
            break;
        };
        for product in items {
            if !found.contains(&product.category) {
                found.push(product.category);
            }
        }
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    found.sort();
    if let Ok(mut cached) = CATEGORIES.lock() {
        *cached = Some((Instant::now(), found.clone()));
    }
    found
}

pub async fn catalog(
    State(web): State<Web>,
    Visitor(session): Visitor,
    Query(query): Query<CatalogQuery>,
) -> Response {
    let search = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let category = query.category.as_deref().filter(|c| !c.is_empty());
    let limit = PAGE_SIZE.to_string();
    let path = format!(
        "/api/v1/products?{}",
        query_string(&[
            ("limit", Some(&limit)),
            ("q", search),
            ("category", category),
            ("cursor", query.cursor.as_deref()),
        ])
    );
    let page = match web.api().list::<Vec<Product>>(&session.visit, &path).await {
        Ok(page) => page,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    let categories = categories(&web, &session).await;
    let next_link = page.next.as_deref().map(|next| {
        format!(
            "/?{}",
            query_string(&[
                ("q", search),
                ("category", category),
                ("cursor", Some(next))
            ])
        )
    });
    let first_link = format!(
        "/?{}",
        query_string(&[("q", search), ("category", category)])
    );
    let heading = match (search, category) {
        (Some(q), _) => format!("Results for “{q}”"),
        (None, Some(c)) => format!("Category: {c}"),
        (None, None) => "Catalog".to_owned(),
    };
    layout::page(
        &session,
        Face::Shop,
        &heading,
        html! {
            h1 { (heading) }
            form class="search" method="get" action="/" role="search" {
                div {
                    label for="q" { "Search" }
                    input id="q" name="q" type="search" maxlength="100" value=[search]
                        placeholder="Name, SKU or description";
                }
                div {
                    label for="category" { "Category" }
                    select id="category" name="category" {
                        option value="" { "All categories" }
                        @for c in &categories {
                            option value=(c) selected[category == Some(c.as_str())] { (c) }
                        }
                    }
                }
                button type="submit" { "Search" }
            }
            @if page.items.is_empty() {
                p { "No products match. " a href="/" { "See the whole catalog" } "." }
            }
            ul class="grid" {
                @for product in &page.items {
                    li class="card" {
                        h2 { a href={"/products/" (product.id)} { (product.name) } }
                        p class="muted" { (product.category) " · SKU " (product.sku) }
                        p class="price" { (web.money(product.price)) }
                        p { (availability_label(product.available)) }
                        @if product.available > 0 {
                            form method="post" action="/cart" data-product=(product.id) {
                                (csrf_field(&session))
                                input type="hidden" name="product_id" value=(product.id);
                                input type="hidden" name="quantity" value="1";
                                button type="submit" { "Add to cart" span class="visually-hidden" { ": " (product.name) } }
                            }
                        }
                    }
                }
            }
            nav class="pager" aria-label="Pages" {
                @if query.cursor.is_some() { a href=(first_link) { "First page" } }
                @if let Some(next) = &next_link { a href=(next) rel="next" { "Next page" } }
            }
        },
    )
}

pub(crate) fn availability_label(available: i64) -> String {
    match available {
        n if n <= 0 => "Out of stock".to_owned(),
        n if n < 5 => format!("Only {n} left"),
        n => format!("{n} in stock"),
    }
}

pub async fn product(
    State(web): State<Web>,
    Visitor(session): Visitor,
    Path(id): Path<Uuid>,
) -> Response {
    let product = match web
        .api()
        .get::<Product>(&session.visit, &format!("/api/v1/products/{id}"))
        .await
    {
        Ok(product) => product,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    let max = product.available.clamp(1, crate::cart::MAX_QUANTITY);
    layout::page(
        &session,
        Face::Shop,
        &product.name,
        html! {
            p { a href="/" { "← Catalog" } }
            div class="split" {
                div {
                    h1 { (product.name) }
                    p class="muted" { (product.category) " · SKU " (product.sku) }
                    p { (product.description) }
                }
                div class="card" {
                    p class="price" { (web.money(product.price)) }
                    p aria-live="polite" data-availability data-src={"/products/" (product.id) "/availability"} {
                        (availability_label(product.available))
                    }
                    @if product.available > 0 {
                        form method="post" action="/cart" {
                            (csrf_field(&session))
                            input type="hidden" name="product_id" value=(product.id);
                            label for="quantity" { "Quantity" }
                            input id="quantity" name="quantity" type="number" min="1" max=(max) value="1" required;
                            p { button type="submit" { "Add to cart" } }
                        }
                    }
                }
            }
        },
    )
}

/// `{"available": n, "label": "..."}`: the product page's live availability.
pub async fn availability(
    State(web): State<Web>,
    Visitor(session): Visitor,
    Path(id): Path<Uuid>,
) -> Response {
    match web
        .api()
        .get::<StockLevel>(&session.visit, &format!("/api/v1/products/{id}/stock"))
        .await
    {
        Ok(stock) => Json(serde_json::json!({
            "available": stock.available,
            "label": availability_label(stock.available),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}
