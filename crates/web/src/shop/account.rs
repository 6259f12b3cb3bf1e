//! Registering, signing in and out. The tokens the API issues go into HttpOnly cookies; the
//! password goes to the API and nowhere else.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::{Deserialize, Serialize};

use crate::Web;
use crate::api::ApiError;
use crate::layout::{self, Face, Flash, csrf_field};
use crate::model::SignedIn;
use crate::session::{
    ACCESS_COOKIE, CookieJar, Csrf, PageForm, REFRESH_COOKIE, Session, Visitor, cookie_value,
    csrf_refusal,
};

/// Where to go after signing in: a path of this site only (never `//elsewhere` or a URL).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.contains('\\')
                && !path.chars().any(char::is_control) =>
        {
            path
        }
        _ => "/",
    }
}

#[derive(Deserialize, Default)]
pub struct NextQuery {
    #[serde(default)]
    next: Option<String>,
}

fn login_page(session: &Session, email: &str, next: &str, error: Option<&str>) -> Response {
    let mut response = layout::page(
        session,
        Face::Shop,
        "Sign in",
        html! {
            h1 { "Sign in" }
            @if let Some(error) = error { p class="flash error" role="alert" { (error) } }
            form method="post" action="/login" {
                (csrf_field(session))
                input type="hidden" name="next" value=(next);
                label for="email" { "Email" }
                input id="email" name="email" type="email" autocomplete="username" value=(email) required maxlength="254";
                label for="password" { "Password" }
                input id="password" name="password" type="password" autocomplete="current-password" required maxlength="1024";
                p { button type="submit" { "Sign in" } }
            }
            p { "New here? " a href="/register" { "Create an account" } "." }
        },
    );
    if error.is_some() {
        *response.status_mut() = StatusCode::UNAUTHORIZED;
    }
    response
}

pub async fn login_form(Visitor(session): Visitor, Query(query): Query<NextQuery>) -> Response {
    login_page(&session, "", safe_next(query.next.as_deref()), None)
}

#[derive(Deserialize)]
pub struct LoginForm {
    csrf: String,
    email: String,
    password: String,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Serialize)]
struct PasswordGrant<'a> {
    email: &'a str,
    password: &'a str,
}

/// Signs in and sets the session cookies on a redirect to `next`.
async fn sign_in(
    web: &Web,
    session: &Session,
    email: &str,
    password: &str,
    next: &str,
    welcome: Flash,
) -> Result<Response, ApiError> {
    let tokens: SignedIn = web
        .api()
        .send(
            &session.visit,
            Method::POST,
            "/api/v1/auth/token",
            &PasswordGrant { email, password },
            None,
        )
        .await?;
    let mut jar = CookieJar::default();
    jar.set(
        session.https,
        ACCESS_COOKIE,
        &tokens.access_token,
        tokens.expires_in,
    );
    jar.set(
        session.https,
        REFRESH_COOKIE,
        &tokens.refresh_token,
        tokens.refresh_expires_in,
    );
    Ok(layout::redirect_with(session, next, welcome, jar))
}

pub async fn login(
    State(web): State<Web>,
    Visitor(session): Visitor,
    headers: HeaderMap,
    PageForm(form): PageForm<LoginForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let next = safe_next(form.next.as_deref());
    match sign_in(
        &web,
        &session,
        form.email.trim(),
        &form.password,
        next,
        Flash::ok("Welcome back."),
    )
    .await
    {
        Ok(response) => response,
        Err(e)
            if e.status() == StatusCode::UNAUTHORIZED
                || e.status() == StatusCode::BAD_REQUEST
                || e.status() == StatusCode::UNPROCESSABLE_ENTITY =>
        {
            login_page(
                &session,
                &form.email,
                next,
                Some("That email and password do not match an account."),
            )
        }
        Err(e) if e.status() == StatusCode::TOO_MANY_REQUESTS => {
            login_page(&session, &form.email, next, Some(&e.message()))
        }
        Err(e) => layout::api_error_page(&session, &e),
    }
}

#[derive(Deserialize, Serialize, Default)]
pub struct RegisterForm {
    #[serde(skip_serializing, default)]
    csrf: String,
    name: String,
    email: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "empty_is_none"
    )]
    phone: Option<String>,
    password: String,
}

fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    Ok(value.filter(|v| !v.trim().is_empty()))
}

fn register_page(session: &Session, form: &RegisterForm, error: Option<&str>) -> Response {
    let mut response = layout::page(
        session,
        Face::Shop,
        "Create an account",
        html! {
            h1 { "Create an account" }
            @if let Some(error) = error { p class="flash error" role="alert" { (error) } }
            form method="post" action="/register" {
                (csrf_field(session))
                label for="name" { "Name" }
                input id="name" name="name" autocomplete="name" value=(form.name) required maxlength="100";
                label for="email" { "Email" }
                input id="email" name="email" type="email" autocomplete="email" value=(form.email) required maxlength="254";
                label for="phone" { "Phone (optional)" }
                input id="phone" name="phone" type="tel" autocomplete="tel" value=[form.phone.as_deref()] maxlength="20";
                label for="password" { "Password" }
                input id="password" name="password" type="password" autocomplete="new-password" required minlength="8" maxlength="1024" aria-describedby="password-hint";
                p id="password-hint" class="hint" { "At least 8 characters." }
                p { button type="submit" { "Create account" } }
            }
            p { "Already registered? " a href="/login" { "Sign in" } "." }
        },
    );
    if error.is_some() {
        *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
    }
    response
}

pub async fn register_form(Visitor(session): Visitor) -> Response {
    register_page(&session, &RegisterForm::default(), None)
}

pub async fn register(
    State(web): State<Web>,
    Visitor(session): Visitor,
    headers: HeaderMap,
    PageForm(form): PageForm<RegisterForm>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let created = web
        .api()
        .send::<serde_json::Value>(&session.visit, Method::POST, "/api/v1/users", &form, None)
        .await;
    match created {
        Ok(_) => {}
        Err(e) if e.status().is_client_error() => {
            return register_page(&session, &form, Some(&e.message()));
        }
        Err(e) => return layout::api_error_page(&session, &e),
    }
    let welcome = Flash::ok(format!("Welcome to Mercato, {}.", form.name.trim()));
    match sign_in(
        &web,
        &session,
        form.email.trim(),
        &form.password,
        "/",
        welcome,
    )
    .await
    {
        Ok(response) => response,
        Err(_) => Redirect::to("/login").into_response(),
    }
}

pub async fn logout(
    State(web): State<Web>,
    Visitor(session): Visitor,
    headers: HeaderMap,
    PageForm(form): PageForm<Csrf>,
) -> Response {
    if let Some(refused) = csrf_refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    if let Some(refresh) = cookie_value(&headers, REFRESH_COOKIE) {
        // Revokes the refresh token (its family); the access token lapses within 15 minutes.
        let body = serde_json::json!({"refresh_token": refresh});
        if let Err(e) = web
            .api()
            .send::<serde_json::Value>(
                &session.visit,
                Method::POST,
                "/api/v1/auth/logout",
                &body,
                None,
            )
            .await
        {
            tracing::debug!(error = %e, "revoking a refresh token at sign-out");
        }
    }
    let mut jar = CookieJar::default();
    jar.clear(session.https, ACCESS_COOKIE);
    jar.clear(session.https, REFRESH_COOKIE);
    layout::redirect_with(&session, "/", Flash::ok("You are signed out."), jar)
}
