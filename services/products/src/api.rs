//! HTTP handlers and DTOs of the products service.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kit::Money;
use kit::Problem;
use kit::auth::{Admin, ServiceCaller};
use kit::extract::{self, Path, Query};
use kit::page::{self, PageRequest};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{self, FieldError, ReservationLines};
use crate::store::{
    CatalogFilter, Hold, NewProduct, Product, ProductChanges, ProductStore, ReleaseIf, Reservation,
    StockLevel, StoreError,
};

/// What every handler works with.
#[derive(Clone)]
pub struct Catalog {
    pub store: Arc<dyn ProductStore>,
    /// The highest unit price a product may have (`limits.max_price`).
    pub max_price: Money,
}

#[derive(Debug, Deserialize)]
pub struct CreateProduct {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub price: Money,
    /// Units on the shelf (`on_hand` is accepted as well).
    #[serde(alias = "on_hand")]
    pub stock: i64,
    pub sku: String,
    #[serde(default = "default_category")]
    pub category: String,
}

fn default_category() -> String {
    "general".into()
}

/// Every field optional: only the ones sent change.
#[derive(Debug, Deserialize)]
pub struct UpdateProduct {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price: Option<Money>,
    /// The count on the shelf (`on_hand` is accepted as well): what unpaid orders hold is part
    /// of it, so it cannot be less than that.
    #[serde(alias = "on_hand")]
    pub stock: Option<i64>,
    pub sku: Option<String>,
    pub category: Option<String>,
}

/// `PUT /api/v1/products/{id}/stock`: a new count (`on_hand`, or `stock`) or a difference.
#[derive(Debug, Deserialize)]
pub struct ChangeStock {
    #[serde(default, alias = "stock")]
    pub on_hand: Option<i64>,
    #[serde(default)]
    pub adjust: Option<i64>,
}

/// `?limit=&cursor=&category=&q=` (or the seed's `skip=`); see [`kit::page`].
#[derive(Debug, Deserialize)]
pub struct ListParams {
    #[serde(default = "kit::page::default_limit")]
    pub limit: u32,
    pub skip: Option<u32>,
    pub cursor: Option<String>,
    pub category: Option<String>,
    /// Products whose name, SKU or description contain this text.
    pub q: Option<String>,
}

/// The longest search text (`q`) or category filter a catalog page accepts, in characters.
pub const MAX_SEARCH_CHARS: usize = 100;

#[derive(Debug, Serialize, Deserialize)]
pub struct ReserveItem {
    pub product_id: Uuid,
    pub quantity: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReserveRequest {
    pub order_id: Uuid,
    pub items: Vec<ReserveItem>,
    /// How long to hold the stock if the order never settles (default 16 minutes).
    #[serde(default)]
    pub hold_secs: Option<u32>,
    /// Names the caller's attempt; `DELETE ...?attempt=` then releases only while it holds.
    #[serde(default)]
    pub attempt: Option<Uuid>,
    /// No order exists for this id yet: an existing held reservation passes to this attempt
    /// and a released one is taken again (all or nothing), rather than returned as it is.
    #[serde(default)]
    pub renew: bool,
}

/// `DELETE /internal/v1/reservations/{order_id}?attempt=`.
#[derive(Debug, Deserialize)]
pub struct ReleaseParams {
    pub attempt: Option<Uuid>,
}

const DEFAULT_HOLD_SECS: u32 = 16 * 60;
const MAX_HOLD_SECS: u32 = kit::config::LimitsSettings::MAX_HOLD_SECS;

pub fn router(catalog: Catalog) -> Router {
    Router::new()
        .route("/api/v1/products", get(list_products).post(create_product))
        .route(
            "/api/v1/products/{id}",
            get(get_product).put(update_product).delete(delete_product),
        )
        .route(
            "/api/v1/products/{id}/stock",
            get(get_stock).put(change_stock),
        )
        .route("/internal/v1/reservations", post(reserve_stock))
        .route(
            "/internal/v1/reservations/{order_id}",
            delete(release_reservation),
        )
        .route(
            "/internal/v1/reservations/{order_id}/commit",
            post(commit_reservation),
        )
        .with_state(catalog)
}

fn field(e: FieldError) -> Problem {
    let problem = Problem::invalid(e.to_string()).with("field", e.field());
    match e.limit().and_then(|l| serde_json::to_value(l).ok()) {
        Some(limit) => problem.with("limit", limit),
        None => problem,
    }
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::DuplicateSku => {
            Problem::conflict("sku-taken", "a product with this sku already exists")
        }
        StoreError::UnknownProduct(id) => Problem::invalid(format!("product {id} does not exist"))
            .with("product_id", id.to_string()),
        StoreError::InsufficientStock {
            product_id,
            requested,
            available,
        } => Problem::conflict(
            "insufficient-stock",
            format!("product {product_id} has {available} in stock, {requested} requested"),
        )
        .with("product_id", product_id.to_string())
        .with("available", available)
        .with("requested", requested),
        StoreError::BelowReserved {
            product_id,
            reserved,
            on_hand,
        } => Problem::conflict(
            "stock-reserved",
            format!(
                "product {product_id} has {reserved} held for unpaid orders: on hand cannot be {on_hand}"
            ),
        )
        .with("product_id", product_id.to_string())
        .with("reserved", reserved)
        .with("on_hand", on_hand),
        StoreError::StockOutOfRange => Problem::invalid(e.to_string())
            .with("field", "on_hand")
            .with("limit", domain::MAX_STOCK),
        StoreError::BadCursor(bad) => bad.into(),
        StoreError::WrongState(status) => Problem::conflict(
            "reservation-state",
            format!("the reservation is already {}", serde_plain(status)),
        ),
        // Infrastructure: logged, never sent; 503 when the database is out of reach.
        StoreError::Corrupt | StoreError::Sqlite(_) | StoreError::Db(_) => infrastructure(e),
        #[cfg(feature = "postgres")]
        StoreError::Postgres(_) => infrastructure(e),
    }
}

fn infrastructure(e: StoreError) -> Problem {
    tracing::error!(error = %e, "products store failed");
    if e.is_unavailable() {
        Problem::unavailable("the products database")
    } else {
        Problem::internal()
    }
}

fn serde_plain<T: Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn create_product(
    State(catalog): State<Catalog>,
    Admin(_): Admin,
    extract::Json(body): extract::Json<CreateProduct>,
) -> Result<(StatusCode, Json<Product>), Problem> {
    let new = NewProduct {
        name: domain::name(&body.name).map_err(field)?,
        description: domain::description(&body.description).map_err(field)?,
        price: domain::price(body.price, catalog.max_price).map_err(field)?,
        on_hand: domain::stock(body.stock).map_err(field)?,
        sku: domain::sku(&body.sku).map_err(field)?,
        category: domain::category(&body.category).map_err(field)?,
    };
    let product = catalog.store.create(new).await.map_err(store_problem)?;
    Ok((StatusCode::CREATED, Json(product)))
}

async fn list_products(
    State(catalog): State<Catalog>,
    uri: Uri,
    Query(params): Query<ListParams>,
) -> Result<(HeaderMap, Json<Vec<Product>>), Problem> {
    let request = PageRequest::parse(params.limit, params.skip, params.cursor.as_deref())?;
    if params
        .q
        .as_ref()
        .is_some_and(|q| q.chars().count() > MAX_SEARCH_CHARS)
    {
        return Err(Problem::bad_request(format!(
            "q: at most {MAX_SEARCH_CHARS} characters"
        )));
    }
    if params
        .category
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_SEARCH_CHARS)
    {
        return Err(Problem::bad_request(format!(
            "category: at most {MAX_SEARCH_CHARS} characters"
        )));
    }
    // PostgreSQL refuses a NUL in text; no name or category holds a control character anyway.
    for (name, value) in [("q", &params.q), ("category", &params.category)] {
        if value
            .as_ref()
            .is_some_and(|v| v.chars().any(char::is_control))
        {
            return Err(Problem::bad_request(format!(
                "{name}: no control characters"
            )));
        }
    }
    let filter = CatalogFilter {
        category: params.category,
        search: params.q,
    };
    let page = catalog
        .store
        .list(&request, &filter)
        .await
        .map_err(store_problem)?;
    Ok((page::link_headers(&uri, &page), Json(page.items)))
}

async fn get_product(
    State(catalog): State<Catalog>,
    Path(id): Path<Uuid>,
) -> Result<Json<Product>, Problem> {
    catalog
        .store
        .get(id)
        .await
        .map_err(store_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the product"))
}

async fn update_product(
    State(catalog): State<Catalog>,
    Admin(_): Admin,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<UpdateProduct>,
) -> Result<Json<Product>, Problem> {
    let changes = ProductChanges {
        name: body
            .name
            .as_deref()
            .map(domain::name)
            .transpose()
            .map_err(field)?,
        description: body
            .description
            .as_deref()
            .map(domain::description)
            .transpose()
            .map_err(field)?,
        price: body
            .price
            .map(|p| domain::price(p, catalog.max_price))
            .transpose()
            .map_err(field)?,
        on_hand: body.stock.map(domain::stock).transpose().map_err(field)?,
        sku: body
            .sku
            .as_deref()
            .map(domain::sku)
            .transpose()
            .map_err(field)?,
        category: body
            .category
            .as_deref()
            .map(domain::category)
            .transpose()
            .map_err(field)?,
    };
    catalog
        .store
        .update(id, changes)
        .await
        .map_err(store_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the product"))
}

async fn delete_product(
    State(catalog): State<Catalog>,
    Admin(_): Admin,
    Path(id): Path<Uuid>,
) -> Result<impl IntoResponse, Problem> {
    if catalog.store.delete(id).await.map_err(store_problem)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::not_found("the product"))
    }
}

async fn get_stock(
    State(catalog): State<Catalog>,
    Path(id): Path<Uuid>,
) -> Result<Json<StockLevel>, Problem> {
    catalog
        .store
        .stock(id)
        .await
        .map_err(store_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the product"))
}

async fn change_stock(
    State(catalog): State<Catalog>,
    Admin(_): Admin,
    Path(id): Path<Uuid>,
    extract::Json(body): extract::Json<ChangeStock>,
) -> Result<Json<StockLevel>, Problem> {
    let change = domain::stock_change(body.on_hand, body.adjust).map_err(field)?;
    catalog
        .store
        .change_stock(id, change)
        .await
        .map_err(store_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the product"))
}

/// 201 when stock was taken now (or taken again by a renewal), 200 when this order already
/// held it (a retry); the answer's `status` says whether it is held.
async fn reserve_stock(
    State(catalog): State<Catalog>,
    ServiceCaller(_): ServiceCaller,
    extract::Json(body): extract::Json<ReserveRequest>,
) -> Result<(StatusCode, Json<Reservation>), Problem> {
    let items: Vec<(Uuid, i64)> = body
        .items
        .iter()
        .map(|i| (i.product_id, i.quantity))
        .collect();
    let lines = ReservationLines::parse(&items).map_err(field)?;
    let hold_secs = body.hold_secs.unwrap_or(DEFAULT_HOLD_SECS);
    if !(1..=MAX_HOLD_SECS).contains(&hold_secs) {
        return Err(
            Problem::invalid(format!("hold_secs must be between 1 and {MAX_HOLD_SECS}"))
                .with("field", "hold_secs"),
        );
    }
    let hold_ms = i64::from(hold_secs) * 1000;
    let hold = Hold {
        until_ms: kit::db::now_ms().saturating_add(hold_ms),
        attempt: body.attempt,
        renew: body.renew,
    };
    let (reservation, created) = catalog
        .store
        .reserve(body.order_id, &lines, hold)
        .await
        .map_err(store_problem)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(reservation)))
}

async fn release_reservation(
    State(catalog): State<Catalog>,
    ServiceCaller(_): ServiceCaller,
    Path(order_id): Path<Uuid>,
    Query(params): Query<ReleaseParams>,
) -> Result<Json<Reservation>, Problem> {
    // With the attempt named, a later attempt's hold is left alone.
    let only = params.attempt.map_or(ReleaseIf::Held, ReleaseIf::HeldBy);
    catalog
        .store
        .release(order_id, only)
        .await
        .map_err(store_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the reservation"))
}

async fn commit_reservation(
    State(catalog): State<Catalog>,
    ServiceCaller(_): ServiceCaller,
    Path(order_id): Path<Uuid>,
) -> Result<Json<Reservation>, Problem> {
    catalog
        .store
        .commit(order_id)
        .await
        .map_err(store_problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("the reservation"))
}
