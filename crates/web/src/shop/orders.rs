//! A customer's orders (each status live while the saga moves it), one order with its
//! payments, cancelling a pending order, and the notifications inbox.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::Web;
use crate::format::{self, is_settled, status_label};
use crate::layout::{self, Face, Flash, csrf_field};
use crate::model::{Notification, Order, OrderPayments, UserOrders};
use crate::session::{CookieJar, Csrf, Customer, PageForm, Session, csrf_refusal};
use crate::shop::{products_by_id, short_id};

/// An order's status that keeps itself current (see `app.js`); `live_url` answers its JSON.
pub(crate) fn live_status(order: &Order, live_url: &str) -> Markup {
    html! {
        span class="status" data-live-order data-status=(order.status)
            data-settled=(if is_settled(&order.status) { "true" } else { "false" })
            data-src=(live_url) {
            (status_label(&order.status))
        }
    }
}

#[derive(Deserialize, Default)]
pub struct PageQuery {
    #[serde(default)]
    cursor: Option<String>,
}

pub async fn mine(
    State(web): State<Web>,
    Customer(session, me): Customer,
    Query(query): Query<PageQuery>,
) -> Response {
    let mut path = format!("/api/v1/orders/user/{me}?limit=20");
    if let Some(cursor) = &query.cursor {
        let encoded: String = url::form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
        path.push_str(&format!("&cursor={encoded}"));
    }
    let page = match web.api().get::<UserOrders>(&session.visit, &path).await {
        Ok(page) => page,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::page(
        &session,
        Face::Shop,
        "My orders",
        html! {
            h1 { "My orders" }
            p class="visually-hidden" aria-live="polite" data-live-note {}
            @if page.orders.is_empty() {
                p { "No orders yet. " a href="/" { "Browse the catalog" } "." }
            } @else {
                div class="table-wrap" {
                    table {
                        caption class="visually-hidden" { "Your orders" }
                        thead { tr { th scope="col" { "Order" } th scope="col" { "Placed" } th scope="col" class="num" { "Items" } th scope="col" class="num" { "Total" } th scope="col" { "Status" } } }
                        tbody {
                            @for order in &page.orders {
                                tr {
                                    td { a href={"/orders/" (order.id)} { (short_id(order.id)) } }
                                    td { (format::when(order.created_at)) }
                                    td class="num" { (order.items.iter().map(|l| l.quantity).sum::<i64>()) }
                                    td class="num" { (web.money(order.total_amount)) }
                                    td { (live_status(order, &format!("/orders/{}/live", order.id))) }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(next) = &page.next {
                nav class="pager" aria-label="Pages" {
                    a href={"/orders?cursor=" (next)} rel="next" { "Older orders" }
                }
            }
        },
    )
}

pub async fn one(
    State(web): State<Web>,
    Customer(session, _): Customer,
    Path(id): Path<Uuid>,
) -> Response {
    let OrderInFull {
        order,
        payments,
        products,
    } = match order_in_full(&web, &session, id).await {
        Ok(full) => full,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::page(
        &session,
        Face::Shop,
        &format!("Order {}", short_id(order.id)),
        html! {
            p { a href="/orders" { "← My orders" } }
            h1 { "Order " (short_id(order.id)) }
            p { "Status: " (live_status(&order, &format!("/orders/{}/live", order.id))) }
            p class="visually-hidden" aria-live="polite" data-live-note {}
            (order_lines(&web, &order, &products))
            p { "Ship to: " (order.address_line()) }
            p class="muted" { "Placed " (format::when(order.created_at)) }
            @if order.status == "pending" {
                p class="row" {
                    a class="button" href={"/orders/" (order.id) "/pay"} { "Pay " (web.money(order.total_amount)) }
                }
                p class="hint" { "Unpaid orders are cancelled at " (format::when(order.expires_at)) "." }
                form method="post" action={"/orders/" (order.id) "/cancel"} {
                    (csrf_field(&session))
                    button type="submit" class="secondary" { "Cancel the order" }
                }
            }
            @if !payments.is_empty() {
                h2 { "Payments" }
                (payments_table(&payments))
            }
        },
    )
}

/// An order with its payments and the products it names: what an order's page shows, to its
/// customer and to an operator.
pub(crate) struct OrderInFull {
    pub order: Order,
    pub payments: Vec<crate::model::Payment>,
    pub products: std::collections::HashMap<Uuid, crate::model::Product>,
}

pub(crate) async fn order_in_full(
    web: &Web,
    session: &Session,
    id: Uuid,
) -> Result<OrderInFull, crate::api::ApiError> {
    let order: Order = web
        .api()
        .get(&session.visit, &format!("/api/v1/orders/{id}"))
        .await?;
    // Payments are the payments service's: the order is shown without them if it is down.
    let payments = web
        .api()
        .get::<OrderPayments>(&session.visit, &format!("/api/v1/payments/order/{id}"))
        .await
        .map(|p| p.payments)
        .unwrap_or_default();
    let products = products_by_id(
        web,
        &session.visit,
        order.items.iter().map(|l| l.product_id).collect(),
    )
    .await;
    Ok(OrderInFull {
        order,
        payments,
        products,
    })
}

/// The lines of an order as a table (shared with the console).
pub(crate) fn order_lines(
    web: &Web,
    order: &Order,
    products: &std::collections::HashMap<Uuid, crate::model::Product>,
) -> Markup {
    html! {
        div class="table-wrap" {
            table {
                caption class="visually-hidden" { "Items of the order" }
                thead { tr { th scope="col" { "Product" } th scope="col" class="num" { "Quantity" } th scope="col" class="num" { "Unit price" } th scope="col" class="num" { "Subtotal" } } }
                tbody {
                    @for line in &order.items {
                        tr {
                            td { (products.get(&line.product_id).map_or_else(|| short_id(line.product_id), |p| p.name.clone())) }
                            td class="num" { (line.quantity) }
                            td class="num" { (web.money(line.unit_price)) }
                            td class="num" { (web.money(line.line_total)) }
                        }
                    }
                }
                tfoot { tr { th scope="row" colspan="3" { "Total" } td class="num" { strong { (web.money(order.total_amount)) } } } }
            }
        }
    }
}

/// An order's payments as a table (shared with the console).
pub(crate) fn payments_table(payments: &[crate::model::Payment]) -> Markup {
    html! {
        div class="table-wrap" {
            table {
                caption class="visually-hidden" { "Payments of the order" }
                thead { tr { th scope="col" { "When" } th scope="col" { "Card" } th scope="col" class="num" { "Amount" } th scope="col" class="num" { "Refunded" } th scope="col" { "Outcome" } } }
                tbody {
                    @for payment in payments {
                        tr {
                            td { (format::when(payment.created_at)) }
                            td { (status_label(payment.card_brand.as_deref().unwrap_or("card"))) " " (payment.card_last4.as_deref().map(|l| format!("•••• {l}")).unwrap_or_default()) }
                            td class="num" { (format::money(payment.amount, &payment.currency)) }
                            td class="num" { (format::money(payment.refunded_amount, &payment.currency)) }
                            td { (status_label(&payment.status))
                                 @if let Some(reason) = &payment.failure_reason { " (" (reason.replace('_', " ")) ")" } }
                        }
                    }
                }
            }
        }
        @if let Some(last) = payments.iter().map(|p| p.updated_at).max() {
            p class="muted" { "Last payment change " (format::when(last)) }
        }
    }
}

/// `{"status", "label", "settled"}`: what the live status asks every second.
pub async fn live(
    State(web): State<Web>,
    Customer(session, _): Customer,
    Path(id): Path<Uuid>,
) -> Response {
    live_json(&web, &session, id).await
}

pub(crate) async fn live_json(web: &Web, session: &Session, id: Uuid) -> Response {
    match web
        .api()
        .get::<Order>(&session.visit, &format!("/api/v1/orders/{id}"))
        .await
    {
        Ok(order) => Json(serde_json::json!({
            "status": order.status,
            "label": status_label(&order.status),
            "settled": is_settled(&order.status),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn cancel(
    State(web): State<Web>,
    Customer(session, _): Customer,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    PageForm(form): PageForm<Csrf>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let body = serde_json::json!({"status": "cancelled"});
    let flash = match web
        .api()
        .send::<Order>(
            &session.visit,
            Method::PUT,
            &format!("/api/v1/orders/{id}/status"),
            &body,
            None,
        )
        .await
    {
        Ok(_) => Flash::ok("Your order is cancelled and its items are back in stock."),
        Err(e) if e.status().is_client_error() => Flash::error(e.message()),
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::redirect_with(
        &session,
        &format!("/orders/{id}"),
        flash,
        CookieJar::default(),
    )
}

pub async fn notifications(State(web): State<Web>, Customer(session, _): Customer) -> Response {
    let notes = match web
        .api()
        .get::<Vec<Notification>>(&session.visit, "/api/v1/notifications?limit=50")
        .await
    {
        Ok(notes) => notes,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::page(
        &session,
        Face::Shop,
        "Notifications",
        html! {
            h1 { "Notifications" }
            @if notes.is_empty() {
                p { "Nothing yet: you hear from us when an order is placed, paid, shipped or refunded." }
            }
            ul class="grid" {
                @for note in notes.iter().rev() {
                    li class="card" {
                        h2 { (note.subject) }
                        p { (note.body) }
                        p class="muted" {
                            (format::when(note.created_at)) " · "
                            a href={"/orders/" (note.order_id)} { "Order " (short_id(note.order_id)) }
                            " · " (status_label(note.event_type.trim_start_matches("order."))) " · "
                            (format::money(note.amount, &note.currency))
                        }
                    }
                }
            }
        },
    )
}
