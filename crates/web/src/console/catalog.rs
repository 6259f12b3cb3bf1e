//! Catalog and stock management: every product with on-hand, reserved and available units; a
//! product's details; the shelf count set or adjusted (never below what unpaid orders hold: the
//! API refuses that and the page says why).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use kit::money::Money;
use maud::html;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Web;
use crate::layout::{self, Face, Flash, csrf_field};
use crate::model::Product;
use crate::session::{CookieJar, Operator, PageForm, csrf_refusal};

#[derive(Deserialize, Default)]
pub struct PageQuery {
    #[serde(default)]
    cursor: Option<String>,
}

pub async fn list(
    State(web): State<Web>,
    Operator(session): Operator,
    Query(query): Query<PageQuery>,
) -> Response {
    let mut path = "/api/v1/products?limit=50".to_owned();
    if let Some(cursor) = &query.cursor {
        let encoded: String = url::form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
        path.push_str(&format!("&cursor={encoded}"));
    }
    let page = match web.api().list::<Vec<Product>>(&session.visit, &path).await {
        Ok(page) => page,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::page(
        &session,
        Face::Console,
        "Catalog and stock",
        html! {
            h1 { "Catalog and stock" }
            div class="table-wrap" {
                table {
                    caption class="visually-hidden" { "Products with their stock" }
                    thead { tr {
                        th scope="col" { "Product" } th scope="col" { "SKU" } th scope="col" { "Category" }
                        th scope="col" class="num" { "Price" } th scope="col" class="num" { "On hand" }
                        th scope="col" class="num" { "Reserved" } th scope="col" class="num" { "Available" }
                    } }
                    tbody {
                        @for p in &page.items {
                            tr {
                                td { a href={"/admin/products/" (p.id)} { (p.name) } }
                                td { (p.sku) }
                                td { (p.category) }
                                td class="num" { (web.money(p.price)) }
                                td class="num" { (p.on_hand) }
                                td class="num" { (p.reserved) }
                                td class="num" { (p.available) }
                            }
                        }
                    }
                }
            }
            @if let Some(next) = &page.next {
                nav class="pager" aria-label="Pages" { a href={"/admin/products?cursor=" (next)} rel="next" { "Next page" } }
            }
            h2 id="new" { "Add a product" }
            (product_form(&session, None))
        },
    )
}

fn product_form(session: &crate::session::Session, product: Option<&Product>) -> maud::Markup {
    let action = product.map_or_else(
        || "/admin/products".to_owned(),
        |p| format!("/admin/products/{}", p.id),
    );
    html! {
        form method="post" action=(action) {
            (csrf_field(session))
            label for="name" { "Name" }
            input id="name" name="name" required maxlength="200" value=[product.map(|p| p.name.as_str())];
            label for="description" { "Description" }
            textarea id="description" name="description" maxlength="2000" { (product.map_or("", |p| p.description.as_str())) }
            div class="row" {
                div { label for="price" { "Price" } input id="price" name="price" required inputmode="decimal" pattern="[0-9]+(\\.[0-9]{1,2})?" value=[product.map(|p| p.price.to_string())]; }
                div { label for="sku" { "SKU" } input id="sku" name="sku" required maxlength="64" value=[product.map(|p| p.sku.as_str())]; }
                div { label for="category" { "Category" } input id="category" name="category" required maxlength="64" value=(product.map_or("general", |p| p.category.as_str())); }
                @if product.is_none() {
                    div { label for="stock" { "Units on hand" } input id="stock" name="stock" type="number" min="0" value="0" required; }
                }
            }
            p { button type="submit" { (if product.is_some() { "Save changes" } else { "Add product" }) } }
        }
    }
}

#[derive(Deserialize, Serialize)]
pub struct ProductForm {
    #[serde(skip_serializing)]
    csrf: String,
    name: String,
    description: String,
    price: String,
    sku: String,
    category: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stock: Option<i64>,
}

impl ProductForm {
    /// The API's body: the price as money (the form sends text).
    fn body(&self) -> Result<serde_json::Value, String> {
        let price: Money = self
            .price
            .trim()
            .parse()
            .map_err(|_| format!("“{}” is not a price: write it like 1999.99.", self.price))?;
        let mut body = serde_json::json!({
            "name": self.name.trim(),
            "description": self.description.trim(),
            "price": price,
            "sku": self.sku.trim(),
            "category": self.category.trim(),
        });
        if let Some(stock) = self.stock {
            body["stock"] = stock.into();
        }
        Ok(body)
    }
}

pub async fn create(
    State(web): State<Web>,
    Operator(session): Operator,
    headers: HeaderMap,
    PageForm(form): PageForm<ProductForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let body = match form.body() {
        Ok(body) => body,
        Err(message) => {
            return layout::redirect_with(
                &session,
                "/admin/products#new",
                Flash::error(message),
                CookieJar::default(),
            );
        }
    };
    match web
        .api()
        .send::<Product>(
            &session.visit,
            Method::POST,
            "/api/v1/products",
            &body,
            None,
        )
        .await
    {
        Ok(product) => layout::redirect_with(
            &session,
            &format!("/admin/products/{}", product.id),
            Flash::ok(format!("{} added to the catalog.", product.name)),
            CookieJar::default(),
        ),
        Err(e) if e.status().is_client_error() => layout::redirect_with(
            &session,
            "/admin/products#new",
            Flash::error(e.message()),
            CookieJar::default(),
        ),
        Err(e) => layout::api_error_page(&session, &e),
    }
}

pub async fn edit(
    State(web): State<Web>,
    Operator(session): Operator,
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
    layout::page(
        &session,
        Face::Console,
        &product.name,
        html! {
            p { a href="/admin/products" { "← Catalog and stock" } }
            h1 { (product.name) }
            ul class="figures" {
                li { span { "On hand" } strong data-figure="on-hand" { (product.on_hand) } }
                li { span { "Reserved by unpaid orders" } strong data-figure="reserved" { (product.reserved) } }
                li { span { "Available" } strong data-figure="available" { (product.available) } }
                li { span { "Price" } strong { (web.money(product.price)) } }
            }
            h2 { "Stock" }
            form method="post" action={"/admin/products/" (product.id) "/stock"} class="row" {
                (csrf_field(&session))
                div {
                    label for="on_hand" { "Set on hand to" }
                    input id="on_hand" name="on_hand" type="number" min=(product.reserved) aria-describedby="on-hand-hint";
                }
                div {
                    label for="adjust" { "Or adjust by" }
                    input id="adjust" name="adjust" type="number" aria-describedby="on-hand-hint";
                }
                button type="submit" { "Change stock" }
            }
            p id="on-hand-hint" class="hint" { "On hand cannot go below what unpaid orders hold (" (product.reserved) ")." }
            h2 { "Details" }
            (product_form(&session, Some(&product)))
        },
    )
}

pub async fn update(
    State(web): State<Web>,
    Operator(session): Operator,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    PageForm(form): PageForm<ProductForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let here = format!("/admin/products/{id}");
    let body = match form.body() {
        Ok(body) => body,
        Err(message) => {
            return layout::redirect_with(
                &session,
                &here,
                Flash::error(message),
                CookieJar::default(),
            );
        }
    };
    let flash = match web
        .api()
        .send::<Product>(
            &session.visit,
            Method::PUT,
            &format!("/api/v1/products/{id}"),
            &body,
            None,
        )
        .await
    {
        Ok(_) => Flash::ok("Saved."),
        Err(e) if e.status().is_client_error() => Flash::error(e.message()),
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::redirect_with(&session, &here, flash, CookieJar::default())
}

#[derive(Deserialize)]
pub struct StockForm {
    csrf: String,
    #[serde(default)]
    on_hand: String,
    #[serde(default)]
    adjust: String,
}

pub async fn stock(
    State(web): State<Web>,
    Operator(session): Operator,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    PageForm(form): PageForm<StockForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let here = format!("/admin/products/{id}");
    let number = |text: &str| text.trim().parse::<i64>().ok();
    let body = match (form.on_hand.trim(), form.adjust.trim()) {
        (set, "") if !set.is_empty() => number(set).map(|n| serde_json::json!({"on_hand": n})),
        ("", by) if !by.is_empty() => number(by).map(|n| serde_json::json!({"adjust": n})),
        _ => None,
    };
    let Some(body) = body else {
        return layout::redirect_with(
            &session,
            &here,
            Flash::error("Give either a new on-hand count or an adjustment, as a whole number."),
            CookieJar::default(),
        );
    };
    let flash = match web
        .api()
        .send::<serde_json::Value>(
            &session.visit,
            Method::PUT,
            &format!("/api/v1/products/{id}/stock"),
            &body,
            None,
        )
        .await
    {
        Ok(_) => Flash::ok("Stock changed."),
        Err(e) if e.status().is_client_error() => Flash::error(e.message()),
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::redirect_with(&session, &here, flash, CookieJar::default())
}
