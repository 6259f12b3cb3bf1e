//! The storefront's and console's pages over plain HTTP, as an attacker sends them: forms
//! without or with a wrong CSRF token, from another site, unreadable; redirects that would leave
//! the site; cookies and headers every page must carry. (The journeys themselves are in
//! browser.rs, in a real browser.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::{ADMIN_EMAIL, ADMIN_PASSWORD, spawn_app};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, LOCATION, SET_COOKIE};

/// A browser-like client over plain HTTP: keeps the site's cookies (name → value), sends them
/// back, and does not follow redirects (the tests look at them).
struct Browser {
    client: reqwest::Client,
    jar: Mutex<BTreeMap<String, String>>,
}

fn browser() -> Browser {
    Browser {
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        jar: Mutex::default(),
    }
}

impl Browser {
    fn cookie_line(&self) -> String {
        let jar = self.jar.lock().unwrap();
        jar.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        extra_cookie: Option<&str>,
    ) -> reqwest::Response {
        let mut line = self.cookie_line();
        if let Some(extra) = extra_cookie {
            line = if line.is_empty() {
                extra.to_owned()
            } else {
                format!("{line}; {extra}")
            };
        }
        let request = if line.is_empty() {
            request
        } else {
            request.header("cookie", line)
        };
        let answer = request.send().await.unwrap();
        let mut jar = self.jar.lock().unwrap();
        for header in answer.headers().get_all(SET_COOKIE) {
            let text = header.to_str().unwrap();
            let (pair, attributes) = text.split_once(';').unwrap_or((text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), value.to_owned());
            }
        }
        answer
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.send(self.client.get(url), None).await
    }

    /// A GET with one more cookie than the jar holds.
    async fn get_with_cookie(&self, url: &str, cookie: &str) -> reqwest::Response {
        self.send(self.client.get(url), Some(cookie)).await
    }

    async fn post_form<T: serde::Serialize + ?Sized>(
        &self,
        url: &str,
        form: &T,
    ) -> reqwest::Response {
        self.post_form_with(url, form, &[]).await
    }

    /// A form sent the way another site's page would send it.
    async fn post_form_cross_site<T: serde::Serialize + ?Sized>(
        &self,
        url: &str,
        form: &T,
    ) -> reqwest::Response {
        self.post_form_with(url, form, &[("sec-fetch-site", "cross-site")])
            .await
    }

    async fn post_form_with<T: serde::Serialize + ?Sized>(
        &self,
        url: &str,
        form: &T,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded_body(form));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request, None).await
    }
}

/// A form body (pairs of text) as a browser encodes it.
fn serde_urlencoded_body<T: serde::Serialize + ?Sized>(form: &T) -> String {
    let pairs: Vec<(String, String)> =
        serde_json::from_value(serde_json::to_value(form).unwrap()).unwrap();
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(&k, &v);
    }
    out.finish()
}

/// The CSRF token a page's forms carry.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF field")
        + 19;
    html[at..at + 64].to_owned()
}

async fn page(client: &Browser, url: &str) -> (StatusCode, String) {
    let answer = client.get(url).await;
    (answer.status(), answer.text().await.unwrap())
}

#[tokio::test]
async fn every_page_carries_a_strict_policy_and_http_only_cookies() {
    let app = spawn_app().await;
    let client = browser();
    let answer = client.get(&format!("{}/", app.gateway)).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let headers = answer.headers();
    let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-store");
    let cookies: Vec<&str> = headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(!cookies.is_empty());
    for cookie in &cookies {
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
            "{cookie}"
        );
        // Plain HTTP from a client the gateway does not trust as a proxy: not Secure.
        assert!(!cookie.contains("Secure"), "{cookie}");
    }
    let html = answer.text().await.unwrap();
    assert!(!html.contains("<script>"), "no inline script");
    assert!(!html.contains(" style="), "no inline style");

    // Static assets are cached for good (their URL changes with their content).
    let css = client.get(&format!("{}/assets/app.css", app.gateway)).await;
    assert_eq!(css.status(), StatusCode::OK);
    assert!(
        css.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    app.stop().await;
}

#[tokio::test]
async fn forms_refuse_a_missing_wrong_or_cross_site_csrf_token() {
    let app = spawn_app().await;
    let client = browser();
    let (_, html) = page(&client, &format!("{}/login", app.gateway)).await;
    let csrf = csrf_of(&html);
    let login = |token: &str| {
        vec![
            ("csrf", token.to_owned()),
            ("email", ADMIN_EMAIL.to_owned()),
            ("password", ADMIN_PASSWORD.to_owned()),
            ("next", "/admin".to_owned()),
        ]
    };
    let url = format!("{}/login", app.gateway);

    // No token, a wrong one, and the right one sent from another site: refused, no session.
    let missing = client
        .post_form(
            &url,
            &[("email", ADMIN_EMAIL), ("password", ADMIN_PASSWORD)],
        )
        .await;
    assert!(missing.status().is_client_error(), "{}", missing.status());
    let wrong = client.post_form(&url, &login(&"0".repeat(64))).await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    assert!(
        wrong
            .text()
            .await
            .unwrap()
            .contains("This form has expired")
    );
    let cross_site = client.post_form_cross_site(&url, &login(&csrf)).await;
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    let (status, _) = page(&client, &format!("{}/admin", app.gateway)).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "still signed out");

    // Another client's token is no good either: it is bound to the cookie.
    let stranger = browser();
    let refused = stranger.post_form(&url, &login(&csrf)).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // The right token from this site signs in.
    let signed_in = client.post_form(&url, &login(&csrf)).await;
    assert_eq!(signed_in.status(), StatusCode::SEE_OTHER);
    assert_eq!(signed_in.headers()[LOCATION], "/admin");
    let (status, html) = page(&client, &format!("{}/admin", app.gateway)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Dashboard"));
    app.stop().await;
}

#[tokio::test]
async fn sign_in_never_redirects_off_the_site() {
    let app = spawn_app().await;
    for next in [
        "//evil.example/steal",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
    ] {
        let client = browser();
        let (_, html) = page(&client, &format!("{}/login", app.gateway)).await;
        let answer = client
            .post_form(
                &format!("{}/login", app.gateway),
                &[
                    ("csrf", csrf_of(&html).as_str()),
                    ("email", ADMIN_EMAIL),
                    ("password", ADMIN_PASSWORD),
                    ("next", next),
                ],
            )
            .await;
        assert_eq!(answer.status(), StatusCode::SEE_OTHER, "{next}");
        assert_eq!(answer.headers()[LOCATION], "/", "{next}");
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_readable_page_not_a_crash() {
    let app = spawn_app().await;
    let client = browser();
    let (_, html) = page(&client, &format!("{}/login", app.gateway)).await;
    let csrf = csrf_of(&html);

    // A wrong password: the form again, with a message, not the API's JSON.
    let answer = client
        .post_form(
            &format!("{}/login", app.gateway),
            &[
                ("csrf", csrf.as_str()),
                ("email", ADMIN_EMAIL),
                ("password", "wrong"),
            ],
        )
        .await;
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    let text = answer.text().await.unwrap();
    assert!(
        text.contains("do not match an account") && !text.contains("\"type\""),
        "{text}"
    );

    // A form with a field that cannot be read.
    let answer = client
        .post_form(
            &format!("{}/cart", app.gateway),
            &[
                ("csrf", csrf.as_str()),
                ("product_id", "not-a-uuid"),
                ("quantity", "lots"),
            ],
        )
        .await;
    assert!(answer.status().is_client_error(), "{}", answer.status());
    assert!(answer.text().await.unwrap().contains("could not be read"));

    // An unknown product, a garbage cart cookie, a search too long: pages, not errors.
    let (status, _) = page(
        &client,
        &format!(
            "{}/products/00000000-0000-4000-8000-000000000000",
            app.gateway
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let garbage = client
        .get_with_cookie(&format!("{}/cart", app.gateway), "mercato_cart=%00|x:y|zz")
        .await;
    assert_eq!(garbage.status(), StatusCode::OK);
    // An address nothing answers: a page for a browser, problem+json for anything else.
    let lost = client
        .send(
            client
                .client
                .get(format!("{}/no/such/page", app.gateway))
                .header("accept", "text/html,application/xhtml+xml"),
            None,
        )
        .await;
    assert_eq!(lost.status(), StatusCode::NOT_FOUND);
    assert!(
        lost.headers()[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("'self'")
    );
    assert!(
        lost.text()
            .await
            .unwrap()
            .contains("There is no page at this address")
    );
    for (path, accept) in [
        ("/no/such/page", "application/json"),
        ("/api/v1/nothing", "text/html"),
        ("/internal/v1/orders/x", "text/html"),
    ] {
        let answer = client
            .send(
                client
                    .client
                    .get(format!("{}{path}", app.gateway))
                    .header("accept", accept),
                None,
            )
            .await;
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            answer.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    let (status, text) = page(&client, &format!("{}/?q={}", app.gateway, "x".repeat(500))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("at most 100 characters"), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn customers_and_strangers_cannot_use_the_console() {
    let app = spawn_app().await;
    let (_, token) = app.register("shopper@example.com").await;
    let stranger = browser();
    for path in [
        "/admin",
        "/admin/products",
        "/admin/platform",
        "/admin/analytics/stream",
    ] {
        let answer = stranger.get(&format!("{}{path}", app.gateway)).await;
        assert_eq!(answer.status(), StatusCode::SEE_OTHER, "{path}");
        assert!(
            answer.headers()[LOCATION]
                .to_str()
                .unwrap()
                .starts_with("/login?next="),
            "{path}"
        );
    }
    // A customer's session cookie (set as the pages would).
    let customer = browser();
    for path in [
        "/admin",
        "/admin/products",
        "/admin/orders",
        "/admin/platform",
        "/admin/analytics/stream",
    ] {
        let answer = customer
            .get_with_cookie(
                &format!("{}{path}", app.gateway),
                &format!("mercato_session={token}"),
            )
            .await;
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{path}");
    }
    // A forged cookie is no session at all.
    let forged = customer
        .get_with_cookie(
            &format!("{}/orders", app.gateway),
            "mercato_session=eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        )
        .await;
    assert_eq!(forged.status(), StatusCode::SEE_OTHER);
    // And the API never takes the cookie in place of a bearer token.
    let api = customer
        .get_with_cookie(
            &format!("{}/api/v1/users/me", app.gateway),
            &format!("mercato_session={token}"),
        )
        .await;
    assert_eq!(api.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

/// Who may open a page.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Owner {
    Anyone,
    Customer,
    Operator,
}

/// Every page route (method, template as `crates/web/src/lib.rs` writes it) and who may open
/// it. A route added there without a line here fails the test below.
const PAGES: &[(&str, &str, Owner)] = &[
    ("GET", "/", Owner::Anyone),
    ("GET", "/products/{id}", Owner::Anyone),
    ("GET", "/products/{id}/availability", Owner::Anyone),
    ("GET", "/cart", Owner::Anyone),
    ("POST", "/cart", Owner::Anyone),
    ("POST", "/cart/update", Owner::Anyone),
    ("GET", "/checkout", Owner::Customer),
    ("POST", "/checkout", Owner::Customer),
    ("GET", "/orders", Owner::Customer),
    ("GET", "/orders/{id}", Owner::Customer),
    ("GET", "/orders/{id}/live", Owner::Customer),
    ("GET", "/orders/{id}/pay", Owner::Customer),
    ("POST", "/orders/{id}/pay", Owner::Customer),
    ("POST", "/orders/{id}/cancel", Owner::Customer),
    ("GET", "/notifications", Owner::Customer),
    ("GET", "/login", Owner::Anyone),
    ("POST", "/login", Owner::Anyone),
    ("GET", "/register", Owner::Anyone),
    ("POST", "/register", Owner::Anyone),
    ("POST", "/logout", Owner::Anyone),
    ("GET", "/admin", Owner::Operator),
    ("GET", "/admin/analytics/stream", Owner::Operator),
    ("GET", "/admin/analytics/summary", Owner::Operator),
    ("GET", "/admin/analytics/windows", Owner::Operator),
    ("GET", "/admin/products", Owner::Operator),
    ("POST", "/admin/products", Owner::Operator),
    ("GET", "/admin/products/{id}", Owner::Operator),
    ("POST", "/admin/products/{id}", Owner::Operator),
    ("POST", "/admin/products/{id}/stock", Owner::Operator),
    ("GET", "/admin/orders", Owner::Operator),
    ("GET", "/admin/customers/{id}", Owner::Operator),
    ("GET", "/admin/orders/{id}", Owner::Operator),
    ("POST", "/admin/orders/{id}/status", Owner::Operator),
    ("POST", "/admin/orders/{id}/refund", Owner::Operator),
    ("GET", "/admin/platform", Owner::Operator),
    ("GET", "/assets/app.css", Owner::Anyone),
    ("GET", "/assets/app.js", Owner::Anyone),
    ("GET", "/{*address}", Owner::Anyone),
];

#[tokio::test]
async fn every_page_route_has_an_owner_and_keeps_to_it() {
    // Every template the router registers is in the table.
    let router = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/src/lib.rs"),
    )
    .unwrap();
    for chunk in router.split(".route(").skip(1) {
        let template = chunk.split('"').nth(1).unwrap();
        assert!(
            PAGES.iter().any(|(_, t, _)| *t == template),
            "{template} has no owner in PAGES"
        );
    }

    let app = spawn_app().await;
    let (_, token) = app.register("owner-check@example.com").await;
    let session = format!("mercato_session={token}");
    let some_id = "00000000-0000-4000-8000-000000000000";
    for (method, template, owner) in PAGES {
        if *owner == Owner::Anyone {
            continue;
        }
        let url = format!("{}{}", app.gateway, template.replace("{id}", some_id));
        let ask = |cookie: Option<&str>| {
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            let mut request = match *method {
                "GET" => client.get(&url),
                _ => client
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body("csrf=x"),
            };
            if let Some(cookie) = cookie {
                request = request.header("cookie", cookie);
            }
            async move { request.send().await.unwrap() }
        };
        // A stranger is sent to sign in, whatever the method.
        let stranger = ask(None).await;
        assert_eq!(
            stranger.status(),
            StatusCode::SEE_OTHER,
            "{method} {template}"
        );
        assert!(
            stranger.headers()[LOCATION]
                .to_str()
                .unwrap()
                .starts_with("/login?next="),
            "{method} {template}"
        );
        // A customer may not use the console, and is not sent to sign in for their own pages.
        let customer = ask(Some(&session)).await;
        match owner {
            Owner::Operator => {
                assert_eq!(
                    customer.status(),
                    StatusCode::FORBIDDEN,
                    "{method} {template}"
                )
            }
            _ => {
                let to_login = customer
                    .headers()
                    .get(LOCATION)
                    .is_some_and(|l| l.to_str().unwrap().starts_with("/login"));
                assert!(!to_login, "{method} {template}: a customer sent to sign in");
                assert!(
                    !customer.status().is_server_error(),
                    "{method} {template}: {}",
                    customer.status()
                );
            }
        }
    }
    app.stop().await;
}
