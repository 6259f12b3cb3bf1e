//! Mercato's face: the storefront (`/`) and the operator console (`/admin`), rendered on the
//! server with maud, plus one small script of our own for the live parts (statuses,
//! availability, the analytics charts over server-sent events).
//!
//! The pages hold no privilege of their own. Every read and write goes through the platform's
//! public API (the gateway's router, in memory) with the visitor's access token, kept in an
//! HttpOnly cookie: the API decides who may do what exactly as it does for curl, and the pages
//! only decide what to show. A page's handler, like an API handler, says in its signature who
//! may open it ([`session::Visitor`], [`session::Customer`], [`session::Operator`]).

pub mod api;
mod assets;
mod cart;
mod console;
mod format;
mod layout;
mod model;
mod session;
mod shop;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware;
use axum::routing::{any, get, post};
use kit::auth::Auth;

pub use api::Api;

/// Whether a request reached the platform over TLS (decided by the gateway, which knows its
/// trusted proxies).
pub type IsHttps = Arc<dyn Fn(&Request) -> bool + Send + Sync>;

/// What the pages need from the platform around them.
pub struct WebSettings {
    /// The platform's currency (ISO 4217), for formatting prices.
    pub currency: String,
    /// The operations listener of this process (`/ready`, `/metrics`) for the console's
    /// platform page: under `mercato up` it covers every service.
    pub ops_url: Option<String>,
}

/// The pages' shared state.
#[derive(Clone)]
pub struct Web(Arc<Inner>);

struct Inner {
    api: Api,
    auth: Arc<Auth>,
    currency: String,
    is_https: IsHttps,
    ops_url: Option<String>,
    ops_client: reqwest::Client,
}

impl Web {
    pub fn new(api: Api, auth: Arc<Auth>, is_https: IsHttps, settings: WebSettings) -> Web {
        Web(Arc::new(Inner {
            api,
            auth,
            currency: settings.currency,
            is_https,
            ops_url: settings.ops_url,
            ops_client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(3))
                .build()
                .unwrap_or_default(),
        }))
    }

    pub(crate) fn api(&self) -> &Api {
        &self.0.api
    }

    pub(crate) fn money(&self, amount: kit::money::Money) -> String {
        format::money(amount, &self.0.currency)
    }
}

/// A browser asking for an address nothing answers gets a page saying so; anything else (an
/// API client, an `/api/` or `/internal/` path, any method but GET) the same problem+json 404
/// as every service. Every method is routed here, so an unknown address is never a 405.
async fn not_found(State(web): State<Web>, req: Request) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let path = req.uri().path();
    let api = ["/api/", "/internal/", "/.well-known/"]
        .iter()
        .any(|prefix| path.starts_with(prefix));
    let browser = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    let reads = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    if api || !browser || !reads {
        return kit::problem::Problem::not_found("this route").into_response();
    }
    let https = (web.0.is_https)(&req);
    let mut response = layout::error_page(
        &session::Session::anonymous(https),
        http::StatusCode::NOT_FOUND,
        "Not found",
        "There is no page at this address. The catalog is a good place to start.",
    );
    session::security_headers(response.headers_mut(), https);
    response
}

/// The storefront's and the console's routes.
pub fn router(web: Web) -> Router {
    Router::new()
        // The storefront.
        .route("/", get(shop::catalog::catalog))
        .route("/products/{id}", get(shop::catalog::product))
        .route(
            "/products/{id}/availability",
            get(shop::catalog::availability),
        )
        .route("/cart", get(shop::cart::show).post(shop::cart::add))
        .route("/cart/update", post(shop::cart::update))
        .route(
            "/checkout",
            get(shop::checkout::form).post(shop::checkout::place),
        )
        .route("/orders", get(shop::orders::mine))
        .route("/orders/{id}", get(shop::orders::one))
        .route("/orders/{id}/live", get(shop::orders::live))
        .route(
            "/orders/{id}/pay",
            get(shop::checkout::payment_form).post(shop::checkout::pay),
        )
        .route("/orders/{id}/cancel", post(shop::orders::cancel))
        .route("/notifications", get(shop::orders::notifications))
        .route(
            "/login",
            get(shop::account::login_form).post(shop::account::login),
        )
        .route(
            "/register",
            get(shop::account::register_form).post(shop::account::register),
        )
        .route("/logout", post(shop::account::logout))
        // The operator console.
        .route("/admin", get(console::dashboard::show))
        .route("/admin/analytics/stream", get(console::dashboard::stream))
        .route("/admin/analytics/summary", get(console::dashboard::summary))
        .route("/admin/analytics/windows", get(console::dashboard::windows))
        .route(
            "/admin/products",
            get(console::catalog::list).post(console::catalog::create),
        )
        .route(
            "/admin/products/{id}",
            get(console::catalog::edit).post(console::catalog::update),
        )
        .route("/admin/products/{id}/stock", post(console::catalog::stock))
        .route("/admin/orders", get(console::orders::find))
        .route("/admin/customers/{id}", get(console::orders::customer))
        .route("/admin/orders/{id}", get(console::orders::one))
        .route(
            "/admin/orders/{id}/status",
            post(console::orders::set_status),
        )
        .route("/admin/orders/{id}/refund", post(console::orders::refund))
        .route("/admin/platform", get(console::platform::show))
        .layer(middleware::from_fn_with_state(
            web.clone(),
            session::middleware,
        ))
        // Assets need no session, nor does the page for an address nothing answers.
        .route("/assets/app.css", get(assets::css))
        .route("/assets/app.js", get(assets::js))
        .route("/{*address}", any(not_found))
        .with_state(web)
}
