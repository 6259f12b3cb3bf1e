//! The page shell both faces share (header, navigation, one-shot messages, footer), the error
//! page, and the small pieces every form needs.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};

use crate::api::ApiError;
use crate::assets;
use crate::session::{CookieJar, FLASH_COOKIE, Session};

/// A one-shot message shown on the next page (after a form's redirect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

/// The longest message a flash cookie carries.
const MAX_FLASH_CHARS: usize = 300;

impl Flash {
    pub fn ok(text: impl Into<String>) -> Flash {
        Flash {
            ok: true,
            text: text.into(),
        }
    }

    pub fn error(text: impl Into<String>) -> Flash {
        Flash {
            ok: false,
            text: text.into(),
        }
    }

    pub fn from_cookie(value: &str) -> Option<Flash> {
        let (kind, text) = value.split_once('~')?;
        let text: String = url::form_urlencoded::parse(format!("m={text}").as_bytes())
            .next()
            .map(|(_, v)| v.chars().take(MAX_FLASH_CHARS).collect())?;
        match kind {
            "ok" => Some(Flash::ok(text)),
            "err" => Some(Flash::error(text)),
            _ => None,
        }
    }

    fn to_cookie(&self) -> String {
        let text: String = self.text.chars().take(MAX_FLASH_CHARS).collect();
        let encoded: String = url::form_urlencoded::byte_serialize(text.as_bytes()).collect();
        format!("{}~{encoded}", if self.ok { "ok" } else { "err" })
    }
}

/// A redirect after a form (303, so the browser follows with GET), with a message for the
/// next page and any cookies the form changed.
pub fn redirect_with(session: &Session, to: &str, flash: Flash, mut jar: CookieJar) -> Response {
    jar.set(session.https, FLASH_COOKIE, &flash.to_cookie(), 60);
    with_cookies(Redirect::to(to).into_response(), jar)
}

/// Hands cookies to the session middleware, which sets them on the answer.
pub fn with_cookies(mut response: Response, jar: CookieJar) -> Response {
    response.extensions_mut().insert(jar);
    response
}

/// Which face a page belongs to (its navigation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Face {
    Shop,
    Console,
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// A whole page: the shell around `content`.
pub fn page(session: &Session, face: Face, title: &str, content: Markup) -> Response {
    render(session, face, StatusCode::OK, title, content)
}

fn render(
    session: &Session,
    face: Face,
    status: StatusCode,
    title: &str,
    content: Markup,
) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Mercato" @if face == Face::Console { " console" } }
                link rel="stylesheet" href=(assets::css_url());
                link rel="icon" href="data:,";
                script src=(assets::js_url()) defer {}
            }
            body class=(if face == Face::Console { "console" } else { "shop" }) {
                a class="skip" href="#main" { "Skip to content" }
                header class="top" {
                    a class="brand" href=(if face == Face::Console { "/admin" } else { "/" }) {
                        "Mercato" @if face == Face::Console { " console" }
                    }
                    nav aria-label="Main" {
                        ul {
                            @match face {
                                Face::Shop => {
                                    li { a href="/" { "Catalog" } }
                                    li { a href="/cart" { "Cart" @if !session.cart.is_empty() { " (" span data-cart-count { (session.cart.count()) } ")" } } }
                                    @if session.caller.is_some() {
                                        li { a href="/orders" { "My orders" } }
                                        li { a href="/notifications" { "Notifications" } }
                                    }
                                    @if session.is_admin() {
                                        li { a href="/admin" { "Console" } }
                                    }
                                }
                                Face::Console => {
                                    li { a href="/admin" { "Dashboard" } }
                                    li { a href="/admin/products" { "Catalog & stock" } }
                                    li { a href="/admin/orders" { "Orders" } }
                                    li { a href="/admin/platform" { "Platform" } }
                                    li { a href="/" { "Storefront" } }
                                }
                            }
                            @if session.caller.is_some() {
                                li {
                                    form method="post" action="/logout" class="inline" {
                                        (csrf_field(session))
                                        button type="submit" class="link" { "Sign out" }
                                    }
                                }
                            } @else {
                                li { a href="/login" { "Sign in" } }
                                li { a href="/register" { "Register" } }
                            }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    @if let Some(flash) = &session.flash {
                        div class=(if flash.ok { "flash ok" } else { "flash error" })
                            role=(if flash.ok { "status" } else { "alert" }) {
                            (flash.text)
                        }
                    }
                    (content)
                }
                footer {
                    p { "Mercato, an open reference shop · " a href="/openapi.json" { "API" } }
                }
            }
        }
    };
    (status, Html(markup.into_string())).into_response()
}

/// A page saying what went wrong, with the status it deserves.
pub fn error_page(session: &Session, status: StatusCode, title: &str, message: &str) -> Response {
    let face = Face::Shop;
    render(
        session,
        face,
        status,
        title,
        html! {
            h1 { (title) }
            p class="flash error" role="alert" { (message) }
            p { a href="/" { "Back to the catalog" } }
        },
    )
}

/// What a page answers when the API said no: sign in again on 401, else the API's message.
pub fn api_error_page(session: &Session, error: &ApiError) -> Response {
    let status = error.status();
    match status {
        StatusCode::UNAUTHORIZED => Redirect::to("/login").into_response(),
        StatusCode::NOT_FOUND => error_page(
            session,
            status,
            "Not found",
            "There is nothing here, or it is not yours to see.",
        ),
        s if s.is_client_error() => {
            error_page(session, status, "That did not work", &error.message())
        }
        _ => error_page(
            session,
            StatusCode::SERVICE_UNAVAILABLE,
            "Please try again",
            &error.message(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_messages_survive_their_cookie() {
        for flash in [
            Flash::ok("Paid: ₹1,23,456.78; thanks!"),
            Flash::error("Card declined = no"),
        ] {
            let cookie = flash.to_cookie();
            assert!(
                cookie
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b';' && b != b','),
                "{cookie}"
            );
            assert_eq!(Flash::from_cookie(&cookie), Some(flash));
        }
        assert_eq!(Flash::from_cookie("weird~x"), None);
        assert_eq!(Flash::from_cookie("nothing"), None);
    }
}
