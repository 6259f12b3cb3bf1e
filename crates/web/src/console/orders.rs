//! Orders for operators: find one (by id, or through its customer), its timeline (the events
//! in order, payments and refunds), the status moves an operator may make from where it is, and
//! refunds.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Redirect, Response};
use kit::money::Money;
use maud::html;
use serde::Deserialize;
use uuid::Uuid;

use crate::Web;
use crate::format::{self, status_label};
use crate::layout::{self, Face, Flash, csrf_field};
use crate::model::{Notification, Order, User, UserOrders};
use crate::session::{CookieJar, Operator, PageForm, csrf_refusal};
use crate::shop::orders::{OrderInFull, live_status, order_in_full, order_lines, payments_table};
use crate::shop::short_id;

/// The moves an operator may ask for from a status (the API allows these and no others; the
/// rest follow payments).
fn operator_moves(status: &str) -> &'static [&'static str] {
    match status {
        "pending" | "payment_failed" => &["cancelled"],
        "paid" => &["shipped"],
        "shipped" => &["delivered"],
        _ => &[],
    }
}

#[derive(Deserialize, Default)]
pub struct FindQuery {
    #[serde(default)]
    order: Option<String>,
}

pub async fn find(
    State(web): State<Web>,
    Operator(session): Operator,
    Query(query): Query<FindQuery>,
) -> Response {
    let wanted = query
        .order
        .as_deref()
        .map(str::trim)
        .filter(|o| !o.is_empty());
    if let Some(wanted) = wanted {
        return match wanted.parse::<Uuid>() {
            Ok(id) => Redirect::to(&format!("/admin/orders/{id}")).into_response(),
            Err(_) => layout::redirect_with(
                &session,
                "/admin/orders",
                Flash::error("An order id looks like 0191e3c5-8c1e-7d4a-9f00-3a2b1c0d4e5f."),
                CookieJar::default(),
            ),
        };
    }
    let customers = match web
        .api()
        .list::<Vec<User>>(&session.visit, "/api/v1/users?limit=100")
        .await
    {
        Ok(page) => page.items,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::page(
        &session,
        Face::Console,
        "Orders",
        html! {
            h1 { "Orders" }
            form method="get" action="/admin/orders" class="search" role="search" {
                div {
                    label for="order" { "Order id" }
                    input id="order" name="order" required maxlength="40" autocomplete="off";
                }
                button type="submit" { "Open" }
            }
            h2 { "By customer" }
            div class="table-wrap" {
                table {
                    caption class="visually-hidden" { "Customers" }
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Email" } th scope="col" { "Role" } th scope="col" { "Since" } } }
                    tbody {
                        @for user in &customers {
                            tr {
                                td { a href={"/admin/customers/" (user.id)} { (user.name) } }
                                td { (user.email) }
                                td { (user.role) }
                                td { (format::when(user.created_at)) }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub async fn customer(
    State(web): State<Web>,
    Operator(session): Operator,
    Path(id): Path<Uuid>,
) -> Response {
    let user = match web
        .api()
        .get::<User>(&session.visit, &format!("/api/v1/users/{id}"))
        .await
    {
        Ok(user) => user,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    let orders = match web
        .api()
        .get::<UserOrders>(
            &session.visit,
            &format!("/api/v1/orders/user/{id}?limit=100"),
        )
        .await
    {
        Ok(page) => page.orders,
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::page(
        &session,
        Face::Console,
        &user.name,
        html! {
            p { a href="/admin/orders" { "← Orders" } }
            h1 { (user.name) }
            p class="muted" { (user.email) }
            @if orders.is_empty() { p { "No orders." } }
            div class="table-wrap" {
                table {
                    caption class="visually-hidden" { "Orders of this customer" }
                    thead { tr { th scope="col" { "Order" } th scope="col" { "Placed" } th scope="col" class="num" { "Total" } th scope="col" { "Status" } } }
                    tbody {
                        @for order in &orders {
                            tr {
                                td { a href={"/admin/orders/" (order.id)} { (short_id(order.id)) } }
                                td { (format::when(order.created_at)) }
                                td class="num" { (web.money(order.total_amount)) }
                                td { span class="status" data-status=(order.status) { (status_label(&order.status)) } }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub async fn one(
    State(web): State<Web>,
    Operator(session): Operator,
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
    let mut events = web
        .api()
        .get::<Vec<Notification>>(
            &session.visit,
            &format!("/api/v1/notifications?order_id={id}&limit=100"),
        )
        .await
        .unwrap_or_default();
    events.sort_by_key(|e| e.created_at);
    let refundable: Vec<_> = payments
        .iter()
        .filter(|p| matches!(p.status.as_str(), "succeeded" | "partially_refunded"))
        .collect();
    layout::page(
        &session,
        Face::Console,
        &format!("Order {}", short_id(order.id)),
        html! {
            p { a href={"/admin/customers/" (order.user_id)} { "← This customer's orders" } }
            h1 { "Order " (short_id(order.id)) }
            p class="muted" { (order.id) }
            p { "Status: " (live_status(&order, &format!("/orders/{}/live", order.id))) }
            p class="visually-hidden" aria-live="polite" data-live-note {}
            @let moves = operator_moves(&order.status);
            @if !moves.is_empty() {
                div class="row" {
                    @for next in moves {
                        form method="post" action={"/admin/orders/" (order.id) "/status"} {
                            (csrf_field(&session))
                            input type="hidden" name="status" value=(next);
                            button type="submit" class=(if *next == "cancelled" { "danger" } else { "" }) {
                                @match *next { "shipped" => "Mark shipped", "delivered" => "Mark delivered", _ => "Cancel the order" }
                            }
                        }
                    }
                }
            }
            (order_lines(&web, &order, &products))
            p { "Ship to: " (order.address_line()) }
            h2 { "Timeline" }
            ol class="timeline" {
                li { (format::moment(order.created_at)) ": placed, " (web.money(order.total_amount)) }
                @for event in &events {
                    li { (format::moment(event.created_at)) ": " (status_label(event.event_type.trim_start_matches("order."))) " — " (event.subject) }
                }
                @if events.is_empty() && order.status != "pending" {
                    li { (format::moment(order.updated_at)) ": " (status_label(&order.status)) }
                }
            }
            h2 { "Payments and refunds" }
            @if payments.is_empty() { p { "No payment yet." } } @else { (payments_table(&payments)) }
            @for payment in &refundable {
                form method="post" action={"/admin/orders/" (order.id) "/refund"} class="row" {
                    (csrf_field(&session))
                    input type="hidden" name="payment_id" value=(payment.id);
                    input type="hidden" name="attempt" value=(Uuid::new_v4());
                    div {
                        label for={"amount-" (payment.id)} { "Refund amount" }
                        input id={"amount-" (payment.id)} name="amount" inputmode="decimal" pattern="[0-9]+(\\.[0-9]{1,2})?"
                            placeholder=(payment.amount.checked_sub(payment.refunded_amount).unwrap_or(Money::ZERO).to_string()) aria-describedby={"refund-hint-" (payment.id)};
                    }
                    button type="submit" class="danger" { "Refund" }
                }
                p id={"refund-hint-" (payment.id)} class="hint" { "Leave empty to refund everything not yet refunded." }
            }
        },
    )
}

#[derive(Deserialize)]
pub struct StatusForm {
    csrf: String,
    status: String,
}

pub async fn set_status(
    State(web): State<Web>,
    Operator(session): Operator,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    PageForm(form): PageForm<StatusForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let body = serde_json::json!({"status": form.status});
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
        Ok(order) => Flash::ok(format!(
            "The order is now {}.",
            status_label(&order.status).to_lowercase()
        )),
        Err(e) if e.status().is_client_error() => Flash::error(e.message()),
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::redirect_with(
        &session,
        &format!("/admin/orders/{id}"),
        flash,
        CookieJar::default(),
    )
}

#[derive(Deserialize)]
pub struct RefundForm {
    csrf: String,
    payment_id: Uuid,
    attempt: Uuid,
    #[serde(default)]
    amount: String,
}

pub async fn refund(
    State(web): State<Web>,
    Operator(session): Operator,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    PageForm(form): PageForm<RefundForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let here = format!("/admin/orders/{id}");
    let body = match form.amount.trim() {
        "" => serde_json::json!({}),
        text => match text.parse::<Money>() {
            Ok(amount) => serde_json::json!({"amount": amount}),
            Err(_) => {
                return layout::redirect_with(
                    &session,
                    &here,
                    Flash::error(format!("“{text}” is not an amount: write it like 250.00.")),
                    CookieJar::default(),
                );
            }
        },
    };
    // One refund per rendered form: a resent form (a double click) is answered once.
    let key = format!("web-refund-{}", form.attempt);
    let flash = match web
        .api()
        .send::<serde_json::Value>(
            &session.visit,
            Method::POST,
            &format!("/api/v1/payments/{}/refund", form.payment_id),
            &body,
            Some(&key),
        )
        .await
    {
        Ok(_) => Flash::ok("Refund issued."),
        Err(e) if e.status().is_client_error() => Flash::error(e.message()),
        Err(e) => return layout::api_error_page(&session, &e),
    };
    layout::redirect_with(&session, &here, flash, CookieJar::default())
}
