//! A visitor's session: who they are (the access token in an HttpOnly cookie, renewed with the
//! refresh token when it lapses), their CSRF token, cart and one-shot message, and the
//! extractors that say who may open a page ([`Visitor`], [`Customer`], [`Operator`]).
//!
//! Cookies never reach the API routes: only these pages turn a cookie into a bearer token, and
//! every form they take checks the CSRF token first ([`Csrf`]), so a cookie alone never changes
//! anything.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use kit::auth::Caller;
use serde::Deserialize;
use uuid::Uuid;

use crate::Web;
use crate::api::{ApiError, Visit};
use crate::cart::Cart;
use crate::layout::{self, Flash};
use crate::model::SignedIn;

pub const ACCESS_COOKIE: &str = "mercato_session";
pub const REFRESH_COOKIE: &str = "mercato_refresh";
pub const CSRF_COOKIE: &str = "mercato_csrf";
pub const CART_COOKIE: &str = "mercato_cart";
pub const FLASH_COOKIE: &str = "mercato_flash";

/// What a page knows of the visitor, set by [`middleware`] on every page request.
#[derive(Clone)]
pub struct Session {
    /// The verified caller, when signed in.
    pub caller: Option<Caller>,
    /// How to reach the API as this visitor (token, client address).
    pub visit: Visit,
    pub csrf: String,
    pub cart: Cart,
    pub flash: Option<Flash>,
    /// Whether the visitor reached us over TLS (cookies are `Secure` then).
    pub https: bool,
}

impl Session {
    /// A visitor known by nothing (no cookie read): for pages that need no session.
    pub fn anonymous(https: bool) -> Session {
        Session {
            caller: None,
            visit: Visit::new(None, &HeaderMap::new(), None),
            csrf: String::new(),
            cart: Cart::default(),
            flash: None,
            https,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.caller.as_ref().is_some_and(Caller::is_admin)
    }

    pub fn user_id(&self) -> Option<Uuid> {
        self.caller.as_ref().and_then(Caller::user_id)
    }
}

/// Cookies a handler wants set (or cleared) on its answer, gathered by [`middleware`].
#[derive(Clone, Default)]
pub struct CookieJar(Vec<HeaderValue>);

impl CookieJar {
    pub fn set(&mut self, https: bool, name: &str, value: &str, max_age_secs: u64) {
        self.push(cookie(https, name, value, Some(max_age_secs)));
    }

    pub fn clear(&mut self, https: bool, name: &str) {
        self.push(cookie(https, name, "", Some(0)));
    }

    fn push(&mut self, text: String) {
        if let Ok(value) = HeaderValue::from_str(&text) {
            self.0.push(value);
        }
    }

    /// Adds the cookies to a response.
    pub fn apply(self, response: &mut Response) {
        for value in self.0 {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
}

/// A `Set-Cookie` value: HttpOnly always, `Secure` over TLS, `SameSite=Lax` so that a link
/// from elsewhere (an email) opens the shop signed in, while the CSRF token guards the forms.
fn cookie(https: bool, name: &str, value: &str, max_age_secs: Option<u64>) -> String {
    let mut text = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
    if https {
        text.push_str("; Secure");
    }
    if let Some(age) = max_age_secs {
        text.push_str(&format!("; Max-Age={age}"));
    }
    text
}

/// The value of one cookie of a request (the first, when sent twice).
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// A fresh CSRF token: 244 random bits as hex.
fn fresh_token() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// Whether a cookie value looks like one of our tokens (hex, the right length).
fn plausible_csrf(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Cookie values we hand out are URL-safe; anything else is not ours.
fn plausible_token(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 4096
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// Every page request: reads the session from its cookies (renewing a lapsed access token
/// with the refresh token once), hands it to the page, sets the cookies the page changed and
/// the security headers every page carries.
pub async fn middleware(State(web): State<Web>, mut req: Request, next: Next) -> Response {
    let https = (web.0.is_https)(&req);
    let headers = req.headers();
    let mut jar = CookieJar::default();
    let access = cookie_value(headers, ACCESS_COOKIE)
        .filter(|t| plausible_token(t))
        .map(str::to_owned);
    let refresh = cookie_value(headers, REFRESH_COOKIE)
        .filter(|t| plausible_token(t))
        .map(str::to_owned);
    let csrf = match cookie_value(headers, CSRF_COOKIE).filter(|t| plausible_csrf(t)) {
        Some(token) => token.to_owned(),
        None => {
            let token = fresh_token();
            jar.set(https, CSRF_COOKIE, &token, 60 * 60 * 24 * 30);
            token
        }
    };
    let cart = Cart::from_cookie(cookie_value(headers, CART_COOKIE).unwrap_or(""));
    let flash = cookie_value(headers, FLASH_COOKIE).and_then(Flash::from_cookie);
    if flash.is_some() {
        jar.clear(https, FLASH_COOKIE);
    }
    let connect_info = req.extensions().get::<ConnectInfo<SocketAddr>>().copied();
    let mut visit = Visit::new(connect_info, headers, None);

    let mut caller = match &access {
        Some(token) => web.0.auth.caller(&bearer(token)).await.ok().flatten(),
        None => None,
    };
    if caller.is_some() {
        visit.token = access.clone();
    } else if access.is_some() || refresh.is_some() {
        // A lapsed (or unknown) access token: renew it once with the refresh token, on page
        // loads and forms only. The live JSON polls answer 401 instead, so two requests in
        // flight never present one refresh token twice (a reuse would revoke the session).
        let renews = req.headers().get("accept").is_none_or(|accept| {
            accept
                .to_str()
                .is_ok_and(|a| !a.starts_with("application/json"))
        });
        let renewed = match (&refresh, renews) {
            (Some(refresh), true) => renew(&web, &visit, refresh).await,
            _ => None,
        };
        match renewed {
            Some(tokens) => {
                caller = web
                    .0
                    .auth
                    .caller(&bearer(&tokens.access_token))
                    .await
                    .ok()
                    .flatten();
                jar.set(
                    https,
                    ACCESS_COOKIE,
                    &tokens.access_token,
                    tokens.expires_in,
                );
                jar.set(
                    https,
                    REFRESH_COOKIE,
                    &tokens.refresh_token,
                    tokens.refresh_expires_in,
                );
                visit.token = Some(tokens.access_token);
            }
            None if renews => {
                jar.clear(https, ACCESS_COOKIE);
                jar.clear(https, REFRESH_COOKIE);
            }
            None => {}
        }
    }
    req.extensions_mut().insert(Session {
        caller,
        visit,
        csrf,
        cart,
        flash,
        https,
    });
    let mut response = next.run(req).await;
    // A page's own cookies come back in its response's extensions.
    if let Some(more) = response.extensions_mut().remove::<CookieJar>() {
        jar.0.extend(more.0);
    }
    jar.apply(&mut response);
    security_headers(response.headers_mut(), https);
    response
}

async fn renew(web: &Web, visit: &Visit, refresh: &str) -> Option<SignedIn> {
    let body = serde_json::json!({"grant_type": "refresh_token", "refresh_token": refresh});
    match web
        .0
        .api
        .send::<SignedIn>(visit, Method::POST, "/api/v1/auth/token", &body, None)
        .await
    {
        Ok(tokens) => Some(tokens),
        Err(ApiError::Problem { .. }) => None,
        Err(e) => {
            tracing::warn!(error = %e, "renewing a session failed");
            None
        }
    }
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(header::AUTHORIZATION, value);
    }
    headers
}

/// The Content-Security-Policy of every page: our own scripts and styles only (no inline
/// script, no inline style), no framing, forms post back here only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(crate) fn security_headers(headers: &mut HeaderMap, https: bool) {
    let fixed = [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
    ];
    for (name, value) in fixed {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    if https {
        headers
            .entry("strict-transport-security")
            .or_insert(HeaderValue::from_static("max-age=31536000"));
    }
    // Pages show one person's orders: never kept by a shared cache.
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

fn session_of(parts: &Parts) -> Option<Session> {
    parts.extensions.get::<Session>().cloned()
}

/// A page route assembled without [`middleware`]: a wiring fault.
fn missing_session() -> Response {
    tracing::error!("a page was served without the session middleware");
    (StatusCode::INTERNAL_SERVER_ERROR, "session missing").into_response()
}

/// Where a sign-in should lead back to: this page (a path of ours, never another site).
fn login_redirect(parts: &Parts) -> Response {
    let here = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let next: String = url::form_urlencoded::byte_serialize(here.as_bytes()).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

/// Anyone, signed in or not.
pub struct Visitor(pub Session);

impl<S: Send + Sync> FromRequestParts<S> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        session_of(parts).map(Visitor).ok_or_else(missing_session)
    }
}

/// A signed-in visitor (customer or operator); others are sent to the sign-in page.
pub struct Customer(pub Session, pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Customer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let session = session_of(parts).ok_or_else(missing_session)?;
        match session.user_id() {
            Some(id) => Ok(Customer(session, id)),
            None => Err(login_redirect(parts)),
        }
    }
}

/// An operator; a customer is told the console is not theirs (403), a stranger sent to sign in.
pub struct Operator(pub Session);

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let session = session_of(parts).ok_or_else(missing_session)?;
        if session.is_admin() {
            Ok(Operator(session))
        } else if session.caller.is_some() {
            Err(layout::error_page(
                &session,
                StatusCode::FORBIDDEN,
                "The console is for operators",
                "You are signed in as a customer. Sign in with an operator account to open it.",
            ))
        } else {
            Err(login_redirect(parts))
        }
    }
}

/// The CSRF check every state-changing form passes first (`Some` is the refusal): the form's
/// `csrf` field equals the visitor's CSRF cookie (which another site can neither read nor set),
/// and the browser does not say the request came from another site.
pub fn csrf_refusal(session: &Session, headers: &HeaderMap, sent: &str) -> Option<Response> {
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|site| site.as_bytes() == b"cross-site");
    (cross_site || !constant_time_eq(sent.as_bytes(), session.csrf.as_bytes())).then(|| {
        layout::error_page(
            session,
            StatusCode::FORBIDDEN,
            "This form has expired",
            "Go back, reload the page and send it again.",
        )
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A page's form body: one that cannot be read (a field missing or of the wrong kind) is
/// answered with a page saying so, never axum's plain-text rejection.
pub struct PageForm<T>(pub T);

impl<S, T> FromRequest<S> for PageForm<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let session = req.extensions().get::<Session>().cloned();
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(form)) => Ok(PageForm(form)),
            Err(rejection) => Err(match session {
                Some(session) => layout::error_page(
                    &session,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "That form could not be read",
                    "A field was missing or not what the form expects. Go back, check it and send it again.",
                ),
                None => rejection.into_response(),
            }),
        }
    }
}

/// A form field carrying the CSRF token; every form a page renders includes it.
#[derive(Deserialize)]
pub struct Csrf {
    pub csrf: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("x_mercato_cart=evil; mercato_cart=a:1; other=2"),
        );
        assert_eq!(cookie_value(&headers, CART_COOKIE), Some("a:1"));
        assert_eq!(cookie_value(&headers, "missing"), None);
    }

    #[test]
    fn set_cookies_are_http_only_lax_and_secure_over_tls() {
        let plain = cookie(false, "a", "b", Some(5));
        assert_eq!(plain, "a=b; Path=/; HttpOnly; SameSite=Lax; Max-Age=5");
        assert!(cookie(true, "a", "b", None).ends_with("; Secure"));
    }

    #[test]
    fn csrf_tokens_are_fresh_and_recognised() {
        let (a, b) = (fresh_token(), fresh_token());
        assert_ne!(a, b);
        assert!(plausible_csrf(&a));
        assert!(!plausible_csrf("short"));
        assert!(!plausible_token("a;b"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
