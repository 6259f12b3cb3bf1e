//! The cart page and its forms (add, change a quantity, remove).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use maud::html;
use serde::Deserialize;
use uuid::Uuid;

use crate::Web;
use crate::cart::MAX_QUANTITY;
use crate::layout::{self, Face, Flash, csrf_field};
use crate::model::Product;
use crate::session::{CART_COOKIE, CookieJar, PageForm, Visitor, csrf_refusal};
use crate::shop::products_by_id;

/// A cart cookie lives a month.
const CART_AGE_SECS: u64 = 60 * 60 * 24 * 30;

/// The cookie that keeps `cart`.
fn saved(session: &crate::session::Session, cart: &crate::cart::Cart) -> CookieJar {
    let mut jar = CookieJar::default();
    jar.set(session.https, CART_COOKIE, &cart.to_cookie(), CART_AGE_SECS);
    jar
}

#[derive(Deserialize)]
pub struct CartLine {
    csrf: String,
    product_id: Uuid,
    quantity: i64,
}

pub async fn show(State(web): State<Web>, Visitor(session): Visitor) -> Response {
    let products = products_by_id(
        &web,
        &session.visit,
        session.cart.lines().iter().map(|l| l.0).collect(),
    )
    .await;
    let mut total = Some(kit::money::Money::ZERO);
    let lines: Vec<(Uuid, i64, Option<&Product>)> = session
        .cart
        .lines()
        .iter()
        .map(|(id, quantity)| (*id, *quantity, products.get(id)))
        .collect();
    for (_, quantity, product) in &lines {
        if let Some(product) = product {
            total = total.and_then(|t| t.checked_add(product.price.checked_mul(*quantity)?));
        }
    }
    layout::page(
        &session,
        Face::Shop,
        "Your cart",
        html! {
            h1 { "Your cart" }
            @if lines.is_empty() {
                p { "Your cart is empty. " a href="/" { "Browse the catalog" } "." }
            } @else {
                div class="table-wrap" {
                    table {
                        caption class="visually-hidden" { "Products in your cart" }
                        thead { tr { th scope="col" { "Product" } th scope="col" class="num" { "Price" } th scope="col" { "Quantity" } th scope="col" class="num" { "Subtotal" } th scope="col" { span class="visually-hidden" { "Remove" } } } }
                        tbody {
                            @for (id, quantity, product) in &lines {
                                tr {
                                    @if let Some(product) = product {
                                        td { a href={"/products/" (id)} { (product.name) }
                                             @if product.available < *quantity { p class="flash error" { "Only " (product.available.max(0)) " available now." } } }
                                        td class="num" { (web.money(product.price)) }
                                        td {
                                            form method="post" action="/cart/update" class="row" {
                                                (csrf_field(&session))
                                                input type="hidden" name="product_id" value=(id);
                                                label class="visually-hidden" for={"q-" (id)} { "Quantity of " (product.name) }
                                                input id={"q-" (id)} name="quantity" type="number" min="0" max=(MAX_QUANTITY) value=(quantity);
                                                button type="submit" class="secondary" { "Update" }
                                            }
                                        }
                                        td class="num" { (product.price.checked_mul(*quantity).map(|m| web.money(m)).unwrap_or_default()) }
                                    } @else {
                                        td colspan="4" { "A product that is no longer sold." }
                                    }
                                    td {
                                        form method="post" action="/cart/update" {
                                            (csrf_field(&session))
                                            input type="hidden" name="product_id" value=(id);
                                            input type="hidden" name="quantity" value="0";
                                            button type="submit" class="link" { "Remove" span class="visually-hidden" { ": " (product.map_or("a product no longer sold", |p| p.name.as_str())) } }
                                        }
                                    }
                                }
                            }
                        }
                        tfoot { tr { th scope="row" colspan="3" { "Total" } td class="num" { strong data-cart-total { (total.map(|t| web.money(t)).unwrap_or_default()) } } td {} } }
                    }
                }
                p { a class="button" href="/checkout" { "Check out" } }
            }
        },
    )
}

pub async fn add(
    State(web): State<Web>,
    Visitor(session): Visitor,
    headers: HeaderMap,
    PageForm(line): PageForm<CartLine>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &line.csrf) {
        return refused;
    }
    let product = match web
        .api()
        .get::<Product>(
            &session.visit,
            &format!("/api/v1/products/{}", line.product_id),
        )
        .await
    {
        Ok(product) => product,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    let mut cart = session.cart.clone();
    let flash = if line.quantity < 1 {
        Flash::error("Choose a quantity of at least 1.")
    } else if cart.add(product.id, line.quantity) {
        Flash::ok(format!("{} added to your cart.", product.name))
    } else {
        Flash::error("Your cart is full: check out or remove something first.")
    };
    layout::redirect_with(&session, "/cart", flash, saved(&session, &cart))
}

pub async fn update(
    Visitor(session): Visitor,
    headers: HeaderMap,
    PageForm(line): PageForm<CartLine>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &line.csrf) {
        return refused;
    }
    let mut cart = session.cart.clone();
    cart.set(line.product_id, line.quantity);
    let jar = saved(&session, &cart);
    let flash = if line.quantity <= 0 {
        Flash::ok("Removed from your cart.")
    } else {
        Flash::ok("Cart updated.")
    };
    layout::redirect_with(&session, "/cart", flash, jar)
}
