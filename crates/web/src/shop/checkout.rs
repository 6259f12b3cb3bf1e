//! Checkout (the cart becomes an order, with a structured shipping address) and payment with a
//! card. Each form carries an attempt id sent as the `Idempotency-Key`, so a double click or a
//! resent form places one order and charges once.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Web;
use crate::api::ApiError;
use crate::format;
use crate::layout::{self, Face, Flash, csrf_field};
use crate::model::{Order, Payment};
use crate::session::{CART_COOKIE, CookieJar, Customer, PageForm, Session, csrf_refusal};
use crate::shop::{products_by_id, short_id};

#[derive(Deserialize, Serialize, Default, Clone)]
pub struct Address {
    #[serde(default)]
    street: String,
    #[serde(default)]
    city: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    zip: String,
    #[serde(default)]
    country: String,
}

#[derive(Deserialize)]
pub struct CheckoutForm {
    csrf: String,
    attempt: Uuid,
    #[serde(flatten)]
    address: Address,
}

pub async fn form(State(web): State<Web>, Customer(session, _): Customer) -> Response {
    let address = Address {
        country: "India".into(),
        ..Address::default()
    };
    checkout_page(&web, &session, &address, None, Uuid::new_v4()).await
}

async fn checkout_page(
    web: &Web,
    session: &Session,
    address: &Address,
    error: Option<&str>,
    attempt: Uuid,
) -> Response {
    if session.cart.is_empty() {
        return Redirect::to("/cart").into_response();
    }
    let products = products_by_id(
        web,
        &session.visit,
        session.cart.lines().iter().map(|l| l.0).collect(),
    )
    .await;
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let field = |id: &str, label: &str, value: &str, autocomplete: &str, max: u32| -> Markup {
        html! {
            label for=(id) { (label) }
            input id=(id) name=(id) value=(value) autocomplete=(autocomplete) maxlength=(max) required;
        }
    };
    let mut response = layout::page(
        session,
        Face::Shop,
        "Checkout",
        html! {
            h1 { "Checkout" }
            @if let Some(error) = error { p class="flash error" role="alert" { (error) } }
            div class="split" {
                form method="post" action="/checkout" {
                    (csrf_field(session))
                    input type="hidden" name="attempt" value=(attempt);
                    fieldset {
                        legend { "Shipping address" }
                        (field("street", "Street and number", &address.street, "street-address", 200))
                        (field("city", "City", &address.city, "address-level2", 60))
                        (field("state", "State", &address.state, "address-level1", 60))
                        (field("zip", "PIN code", &address.zip, "postal-code", 12))
                        (field("country", "Country", &address.country, "country-name", 56))
                    }
                    p { button type="submit" { "Place order" } }
                    p class="hint" { "Stock is held for you while you pay." }
                }
                div class="card" {
                    h2 { "Your order" }
                    ul {
                        @for (id, quantity) in session.cart.lines() {
                            li { (quantity) " × " (products.get(id).map_or("a product no longer sold", |p| p.name.as_str())) }
                        }
                    }
                }
            }
        },
    );
    *response.status_mut() = status;
    response
}

#[derive(Serialize)]
struct NewOrderItem {
    product_id: Uuid,
    quantity: i64,
}

#[derive(Serialize)]
struct NewOrder<'a> {
    items: Vec<NewOrderItem>,
    shipping_address: &'a Address,
}

pub async fn place(
    State(web): State<Web>,
    Customer(session, _): Customer,
    headers: HeaderMap,
    PageForm(form): PageForm<CheckoutForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    if session.cart.is_empty() {
        return Redirect::to("/cart").into_response();
    }
    let order = NewOrder {
        items: session
            .cart
            .lines()
            .iter()
            .map(|(product_id, quantity)| NewOrderItem {
                product_id: *product_id,
                quantity: *quantity,
            })
            .collect(),
        shipping_address: &form.address,
    };
    let key = format!("web-order-{}", form.attempt);
    match web
        .api()
        .send::<Order>(
            &session.visit,
            Method::POST,
            "/api/v1/orders",
            &order,
            Some(&key),
        )
        .await
    {
        Ok(order) => {
            let mut jar = CookieJar::default();
            jar.clear(session.https, CART_COOKIE);
            let flash = Flash::ok(format!(
                "Order {} placed: {}. Your items are held until {}.",
                short_id(order.id),
                web.money(order.total_amount),
                format::when(order.expires_at)
            ));
            layout::redirect_with(&session, &format!("/orders/{}/pay", order.id), flash, jar)
        }
        Err(e @ ApiError::Problem { .. })
            if e.status().is_client_error() && e.status() != StatusCode::UNAUTHORIZED =>
        {
            checkout_page(
                &web,
                &session,
                &form.address,
                Some(&e.message()),
                Uuid::new_v4(),
            )
            .await
        }
        Err(e) => layout::api_error_page(&session, &e),
    }
}

pub async fn payment_form(
    State(web): State<Web>,
    Customer(session, _): Customer,
    Path(id): Path<Uuid>,
) -> Response {
    let order = match web
        .api()
        .get::<Order>(&session.visit, &format!("/api/v1/orders/{id}"))
        .await
    {
        Ok(order) => order,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    if order.status != "pending" {
        return Redirect::to(&format!("/orders/{id}")).into_response();
    }
    layout::page(
        &session,
        Face::Shop,
        "Payment",
        html! {
            h1 { "Pay for order " (short_id(order.id)) }
            p { "Amount due: " strong { (web.money(order.total_amount)) } ". Pay before " (format::when(order.expires_at)) ", when the held stock goes back." }
            form method="post" action={"/orders/" (order.id) "/pay"} {
                (csrf_field(&session))
                input type="hidden" name="attempt" value=(Uuid::new_v4());
                label for="card_number" { "Card number" }
                input id="card_number" name="card_number" inputmode="numeric" autocomplete="cc-number"
                    maxlength="23" pattern="[0-9 ]{12,23}" required aria-describedby="cards";
                div id="cards" class="hint" {
                    p { "Test cards of the simulated payment provider:" }
                    ul {
                        li { "4242 4242 4242 4242: paid" }
                        li { "4000 0000 0000 0002: declined" }
                        li { "4000 0000 0000 9995: declined, insufficient funds" }
                        li { "4000 0000 0000 0119: the provider cannot be reached" }
                    }
                }
                p { button type="submit" { "Pay " (web.money(order.total_amount)) } }
            }
            form method="post" action={"/orders/" (order.id) "/cancel"} {
                (csrf_field(&session))
                button type="submit" class="secondary" { "Cancel the order" }
            }
        },
    )
}

#[derive(Deserialize)]
pub struct PaymentForm {
    csrf: String,
    attempt: Uuid,
    card_number: String,
}

#[derive(Serialize)]
struct NewPayment<'a> {
    order_id: Uuid,
    card_number: &'a str,
}

pub async fn pay(
    State(web): State<Web>,
    Customer(session, _): Customer,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    PageForm(form): PageForm<PaymentForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let key = format!("web-pay-{}", form.attempt);
    let payment = NewPayment {
        order_id: id,
        card_number: form.card_number.trim(),
    };
    let answer = web
        .api()
        .send::<Payment>(
            &session.visit,
            Method::POST,
            "/api/v1/payments",
            &payment,
            Some(&key),
        )
        .await;
    let order_page = format!("/orders/{id}");
    let jar = CookieJar::default();
    match answer {
        Ok(payment) if payment.status == "succeeded" => {
            let card = match (&payment.card_brand, &payment.card_last4) {
                (Some(brand), Some(last4)) => {
                    format!(" with {} ending {last4}", format::status_label(brand))
                }
                _ => String::new(),
            };
            let flash = Flash::ok(format!(
                "Payment of {} accepted{card}. Thank you!",
                web.money(payment.amount)
            ));
            layout::redirect_with(&session, &order_page, flash, jar)
        }
        Ok(payment) if payment.status == "failed" => {
            let reason = payment
                .failure_reason
                .as_deref()
                .map(|r| format::status_label(r).to_lowercase())
                .unwrap_or_else(|| "declined".to_owned());
            let flash = Flash::error(format!(
                "Your card was declined ({reason}). The order is cancelled and its items are back in stock; nothing was charged."
            ));
            layout::redirect_with(&session, &order_page, flash, jar)
        }
        Ok(_) => {
            let flash = Flash::ok(
                "Your payment is being processed; this page shows the outcome as soon as it is known.",
            );
            layout::redirect_with(&session, &order_page, flash, jar)
        }
        Err(ApiError::Problem { kind, message, .. }) if kind == "payment-declined" => {
            let flash = Flash::error(format!(
                "{} The order is cancelled and its items are back in stock; nothing was charged.",
                message.replace('_', " ")
            ));
            layout::redirect_with(&session, &order_page, flash, jar)
        }
        Err(e) if e.status() == StatusCode::SERVICE_UNAVAILABLE => {
            let flash = Flash::error(
                "The payment provider could not be reached, so nothing was charged. Your order is still held: try again in a moment.",
            );
            layout::redirect_with(&session, &format!("/orders/{id}/pay"), flash, jar)
        }
        Err(e @ ApiError::Problem { .. })
            if e.status().is_client_error() && e.status() != StatusCode::UNAUTHORIZED =>
        {
            let flash = Flash::error(e.message());
            let back = if e.status() == StatusCode::CONFLICT {
                order_page
            } else {
                format!("/orders/{id}/pay")
            };
            layout::redirect_with(&session, &back, flash, jar)
        }
        Err(e) => layout::api_error_page(&session, &e),
    }
}
