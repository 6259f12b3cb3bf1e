//! The storefront and the console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver with fantoccini): a customer's journey, a declined
//! card, an operator shipping, refunding and watching the analytics chart, who may open what,
//! and axe-core's accessibility rules on every page visited.
//!
//! Screenshots of the main pages go to `$BROWSER_SCREENSHOTS` when it is set (the README shows
//! the ones in `docs/screenshots/`: `BROWSER_SCREENSHOTS=docs/screenshots`), else to the test's
//! temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, spawn_app};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const INSTALL: &str = "apt-get install -y chromium chromium-driver (scripts/test installs them)";

/// The axe-core script: `$AXE_CORE_JS`, which scripts/test sets after fetching it from the
/// npm registry.
fn axe_source() -> String {
    let path = std::env::var("AXE_CORE_JS").unwrap_or_else(|_| {
        panic!(
            "AXE_CORE_JS is not set: scripts/test fetches axe-core from the npm registry \
             (scripts/check-browser prints the path)"
        )
    });
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading axe-core at {path}: {e}; run scripts/check-browser"))
}

fn executable(env: &str, default: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.to_owned()));
    assert!(
        path.exists(),
        "{} not found ({env} to point elsewhere): {INSTALL}",
        path.display()
    );
    path
}

/// A chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let binary = executable("CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // A process group of its own: the browsers it starts are in it, and go with it.
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting chromedriver: {e}; {INSTALL}"));
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(answer) = client.get(format!("{url}/status")).send().await
                && answer.status().is_success()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver did not answer on {url}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { child, url }
    }

    /// A browser of its own (its own cookies): one per person in the test.
    async fn browser(&self) -> Client {
        let chromium = executable("CHROME_BIN", "/usr/bin/chromium");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-crash-reporter", "--disable-breakpad",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         "--lang=en-IN"],
            }),
        );
        let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("a Chromium session: {e}; {INSTALL}"));
        // axe takes a while on a busy machine; no page takes more than this to load.
        browser
            .update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
                Some(Duration::from_secs(60)),
                Some(Duration::from_secs(60)),
                None,
            ))
            .await
            .unwrap();
        browser
    }
}

impl Drop for Driver {
    /// Stops chromedriver and every browser it started, also when the test failed half-way
    /// (its sessions never closed).
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One person's browser on the platform, checking every page it opens with axe.
struct Person {
    browser: Client,
    base: String,
    axe: String,
    shots: PathBuf,
}

impl Person {
    async fn open(&self, path: &str) {
        self.browser
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
        self.check_accessibility(path).await;
    }

    /// Runs axe-core's WCAG 2.x A/AA rules on the page: no serious or critical violation.
    /// axe is loaded and run in one script, so a navigation in between cannot lose it.
    async fn check_accessibility(&self, page: &str) {
        let script = format!(
            "const done = arguments[arguments.length - 1];
             {axe}
             ;axe.run(document, {{runOnly: {{type: 'tag', values:
                 ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa']}}}})
               .then(r => done(r.violations
                   .filter(v => v.impact === 'serious' || v.impact === 'critical')
                   .map(v => v.id + ' (' + v.impact + '): ' + v.help + ' at ' +
                        v.nodes.map(n => n.target.join(' ')).slice(0, 3).join(', '))))
               .catch(e => done(['axe failed: ' + e]));",
            axe = self.axe
        );
        let started = Instant::now();
        let violations = self
            .browser
            .execute_async(&script, vec![])
            .await
            .unwrap_or_else(|e| panic!("axe on {page} after {:?}: {e}", started.elapsed()));
        let violations: Vec<String> = serde_json::from_value(violations).unwrap();
        assert!(
            violations.is_empty(),
            "accessibility violations on {page}:\n{}",
            violations.join("\n")
        );
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.browser.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Clicks something that leads to another page (a link, a form's button) and waits until
    /// that page has loaded: a click returns before the navigation ends.
    async fn click(&self, css: &str) {
        self.browser
            .execute("window.mercatoOldPage = true; return true;", vec![])
            .await
            .unwrap();
        self.browser
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap();
        let started = Instant::now();
        loop {
            let loaded = self
                .browser
                .execute(
                    "return window.mercatoOldPage !== true && document.readyState === 'complete';",
                    vec![],
                )
                .await;
            // A script may meet the page in the middle of changing: ask again.
            if matches!(loaded, Ok(Value::Bool(true))) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "clicking {css} led nowhere"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits a form and checks the page it leads to.
    async fn submit(&self, css: &str) {
        self.click(css).await;
        let url = self.browser.current_url().await.unwrap();
        self.check_accessibility(url.path()).await;
    }

    async fn text(&self, css: &str) -> String {
        self.browser
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    async fn page_text(&self) -> String {
        self.text("main").await
    }

    async fn path(&self) -> String {
        self.browser.current_url().await.unwrap().path().to_owned()
    }

    /// Waits (without reloading) until `css`'s text is `want`.
    async fn until_text(&self, css: &str, want: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let now = self.text(css).await;
            if now == want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{css} still reads {now:?}, not {want:?}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.browser.screenshot().await.unwrap();
        std::fs::create_dir_all(&self.shots).unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}

fn screenshots_dir() -> PathBuf {
    match std::env::var("BROWSER_SCREENSHOTS") {
        Ok(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        // Relative to the repository (tests run in the crate's directory).
        Ok(dir) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(dir),
        Err(_) => Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"),
    }
}

async fn product(
    app: &TestApp,
    name: &str,
    description: &str,
    price: &str,
    stock: i64,
    category: &str,
) -> String {
    let sku = name.to_uppercase().replace(' ', "-");
    let answer = app
        .post(
            "/api/v1/products",
            json!({"name": name, "description": description, "price": price.parse::<f64>().unwrap(),
                   "stock": stock, "sku": sku, "category": category}),
        )
        .await;
    assert_eq!(answer.status.as_u16(), 201, "{:?}", answer.body);
    answer.body["id"].as_str().unwrap().to_owned()
}

/// The order id in a path like `/orders/{id}` or `/orders/{id}/pay`.
fn order_in(path: &str) -> String {
    path.trim_start_matches("/orders/")
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_and_an_operator_use_the_shop_in_a_real_browser() {
    let axe = axe_source();
    let app = spawn_app().await;
    let tea = product(
        &app,
        "Darjeeling Tea",
        "First flush, 250 g tin",
        "450",
        10,
        "tea",
    )
    .await;
    let teapot = product(
        &app,
        "Brass Teapot",
        "Pours tea for four",
        "1299.5",
        5,
        "kitchen",
    )
    .await;
    let apron = product(
        &app,
        "Cotton Apron",
        "Block-printed in Jaipur",
        "120000",
        3,
        "kitchen",
    )
    .await;
    let driver = Driver::start().await;
    let shots = screenshots_dir();
    let customer = Person {
        browser: driver.browser().await,
        base: app.gateway.clone(),
        axe: axe.clone(),
        shots: shots.clone(),
    };
    let operator = Person {
        browser: driver.browser().await,
        base: app.gateway.clone(),
        axe,
        shots,
    };

    // A stranger may browse but not see orders or the console.
    customer.open("/orders").await;
    assert_eq!(customer.path().await, "/login");
    customer.open("/admin").await;
    assert_eq!(customer.path().await, "/login");

    // A customer registers...
    customer.open("/register").await;
    customer.screenshot("register").await;
    customer.fill("#name", "Asha Rao").await;
    customer.fill("#email", "asha@example.com").await;
    customer.fill("#phone", "+91 98450 12345").await;
    customer.fill("#password", "masala chai every day").await;
    customer
        .submit("form[action='/register'] button[type=submit]")
        .await;
    assert_eq!(customer.path().await, "/");
    assert!(
        customer
            .page_text()
            .await
            .contains("Welcome to Mercato, Asha Rao.")
    );

    // ...searches, and adds two products to the cart.
    customer.fill("#q", "tea").await;
    customer.submit("form.search button[type=submit]").await;
    let results = customer.page_text().await;
    assert!(results.contains("Results for “tea”"), "{results}");
    assert!(results.contains("Darjeeling Tea") && results.contains("Brass Teapot"));
    assert!(!results.contains("Cotton Apron"), "{results}");
    assert!(
        results.contains("₹450.00") && results.contains("₹1,299.50"),
        "{results}"
    );
    customer.screenshot("catalog").await;
    // At phone width the catalog fits the screen: nothing scrolls sideways.
    customer.browser.set_window_size(390, 844).await.unwrap();
    customer.open("/?q=tea").await;
    let overflows: Value = customer
        .browser
        .execute(
            "return document.documentElement.scrollWidth > window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        overflows,
        json!(false),
        "the catalog scrolls sideways at 390 px"
    );
    customer.screenshot("catalog-phone").await;
    customer.browser.set_window_size(1280, 1000).await.unwrap();
    customer
        .submit(&format!("form[data-product='{tea}'] button"))
        .await;
    assert!(
        customer
            .page_text()
            .await
            .contains("Darjeeling Tea added to your cart.")
    );
    customer.open(&format!("/products/{teapot}")).await;
    customer.screenshot("product").await;
    customer.fill("#quantity", "2").await;
    customer
        .submit("form[action='/cart'] button[type=submit]")
        .await;
    assert_eq!(customer.path().await, "/cart");
    assert_eq!(customer.text("[data-cart-total]").await, "₹3,049.00");
    customer.screenshot("cart").await;

    // Checkout with the structured address, then the success card.
    customer.click("a[href='/checkout']").await;
    customer.check_accessibility("/checkout").await;
    customer.fill("#street", "12 MG Road").await;
    customer.fill("#city", "Pune").await;
    customer.fill("#state", "MH").await;
    customer.fill("#zip", "411001").await;
    customer.screenshot("checkout").await;
    customer
        .submit("form[action='/checkout'] button[type=submit]")
        .await;
    let path = customer.path().await;
    assert!(
        path.ends_with("/pay"),
        "{path}: {}",
        customer.page_text().await
    );
    let paid_order = order_in(&path);
    assert!(customer.page_text().await.contains("Amount due: ₹3,049.00"));
    assert_eq!(app.stock(&teapot).await, 3, "the order holds two teapots");
    customer.fill("#card_number", "4242 4242 4242 4242").await;
    customer.screenshot("payment").await;
    customer
        .submit("form[action$='/pay'] button[type=submit]")
        .await;
    assert_eq!(customer.path().await, format!("/orders/{paid_order}"));
    assert!(
        customer
            .page_text()
            .await
            .contains("Payment of ₹3,049.00 accepted")
    );
    customer
        .until_text("[data-live-order]", "Paid", Duration::from_secs(10))
        .await;
    customer.screenshot("order-paid").await;

    // A declined card: the message, the order cancelled, its stock back.
    customer.open(&format!("/products/{apron}")).await;
    customer
        .submit("form[action='/cart'] button[type=submit]")
        .await;
    customer.open("/checkout").await;
    for (field, value) in [
        ("#street", "4 Park Street"),
        ("#city", "Kolkata"),
        ("#state", "WB"),
        ("#zip", "700016"),
    ] {
        customer.fill(field, value).await;
    }
    customer
        .submit("form[action='/checkout'] button[type=submit]")
        .await;
    let declined_order = order_in(&customer.path().await);
    assert_eq!(app.stock(&apron).await, 2);
    // The provider cannot be reached: nothing charged, the order still held, try again.
    customer.fill("#card_number", "4000 0000 0000 0119").await;
    customer
        .submit("form[action$='/pay'] button[type=submit]")
        .await;
    assert_eq!(
        customer.path().await,
        format!("/orders/{declined_order}/pay")
    );
    let page = customer.page_text().await;
    assert!(
        page.contains("could not be reached, so nothing was charged"),
        "{page}"
    );
    assert_eq!(app.stock(&apron).await, 2, "still held");
    customer.fill("#card_number", "4000 0000 0000 0002").await;
    customer
        .submit("form[action$='/pay'] button[type=submit]")
        .await;
    assert_eq!(customer.path().await, format!("/orders/{declined_order}"));
    let page = customer.page_text().await;
    assert!(
        page.contains("The card was declined: card declined."),
        "{page}"
    );
    assert!(
        page.contains("The order is cancelled and its items are back in stock"),
        "{page}"
    );
    customer
        .until_text("[data-live-order]", "Cancelled", Duration::from_secs(10))
        .await;
    assert_eq!(
        app.stock(&apron).await,
        3,
        "the declined order's stock is back"
    );

    // "My orders" lists both; notifications arrive.
    customer.open("/orders").await;
    let mine = customer.page_text().await;
    assert!(
        mine.contains("Paid") && mine.contains("Cancelled"),
        "{mine}"
    );
    customer.screenshot("my-orders").await;
    let started = Instant::now();
    loop {
        customer.open("/notifications").await;
        if customer.page_text().await.contains("₹3,049.00") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no notification of the order"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    customer.screenshot("notifications").await;

    // The customer may not open the console, nor someone else's order.
    customer.open("/admin").await;
    assert!(
        customer
            .page_text()
            .await
            .contains("The console is for operators")
    );
    let (_, other_token) = app.register("someone.else@example.com").await;
    let other = app
        .as_caller(Some(&other_token))
        .post(
            "/api/v1/orders",
            json!({"items": [{"product_id": tea, "quantity": 1}], "shipping_address": "1 Other Road, Chennai"}),
        )
        .await;
    let other_order = other.body["id"].as_str().unwrap().to_owned();
    customer.open(&format!("/orders/{other_order}")).await;
    let refused = customer.page_text().await;
    assert!(refused.contains("not yours to see"), "{refused}");
    assert!(!refused.contains("Other Road"), "{refused}");

    // The operator signs in (and lands where they were going)...
    operator.open("/login?next=/admin").await;
    operator.screenshot("login").await;
    operator.fill("#email", ADMIN_EMAIL).await;
    operator.fill("#password", ADMIN_PASSWORD).await;
    operator
        .submit("form[action='/login'] button[type=submit]")
        .await;
    assert_eq!(operator.path().await, "/admin");

    // ...ships the paid order, which the customer's open page shows without reloading.
    customer.open(&format!("/orders/{paid_order}")).await;
    operator.open(&format!("/admin/orders/{paid_order}")).await;
    let timeline = operator.page_text().await;
    assert!(timeline.contains("Mark shipped"), "{timeline}");
    assert!(
        !timeline.contains("Mark delivered"),
        "only the legal moves: {timeline}"
    );
    operator.screenshot("console-order").await;
    operator
        .submit("form[action$='/status'] button[type=submit]")
        .await;
    assert!(
        operator
            .page_text()
            .await
            .contains("The order is now shipped.")
    );
    customer
        .until_text("[data-live-order]", "Shipped", Duration::from_secs(10))
        .await;

    // ...refunds another customer's paid order.
    let pay = app
        .as_caller(Some(&other_token))
        .post(
            "/api/v1/payments",
            json!({"order_id": other_order, "card_number": "4242424242424242"}),
        )
        .await;
    assert_eq!(pay.status.as_u16(), 201, "{:?}", pay.body);
    operator.open(&format!("/admin/orders/{other_order}")).await;
    operator
        .submit("form[action$='/refund'] button[type=submit]")
        .await;
    assert!(operator.page_text().await.contains("Refund issued."));
    operator
        .until_text("[data-live-order]", "Refunded", Duration::from_secs(10))
        .await;

    // ...manages stock, and sees the platform.
    operator.open("/admin/products").await;
    operator.screenshot("console-catalog").await;
    operator.open(&format!("/admin/products/{apron}")).await;
    operator.fill("#on_hand", "7").await;
    operator
        .submit("form[action$='/stock'] button[type=submit]")
        .await;
    assert!(operator.page_text().await.contains("Stock changed."));
    assert_eq!(operator.text("[data-figure=available]").await, "7");
    operator.open("/admin/platform").await;
    let platform = operator.page_text().await;
    assert!(
        platform.contains("orders") && platform.contains("ready"),
        "{platform}"
    );
    operator.screenshot("console-platform").await;

    // ...and watches the analytics chart count a new order within 2 s.
    operator.open("/admin").await;
    let counted = |text: String| text.parse::<i64>().unwrap();
    // The charts start from the recent windows; wait for them to settle.
    let started = Instant::now();
    let mut before = counted(operator.text("[data-figure=chart-orders]").await);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = counted(operator.text("[data-figure=chart-orders]").await);
        if now == before && now >= 3 {
            break;
        }
        before = now;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the chart never settled"
        );
    }
    let placed = app
        .as_caller(Some(&other_token))
        .post(
            "/api/v1/orders",
            json!({"items": [{"product_id": tea, "quantity": 2}], "shipping_address": "1 Other Road, Chennai"}),
        )
        .await;
    assert_eq!(placed.status.as_u16(), 201);
    let want = (before + 1).to_string();
    let took = operator
        .until_text("[data-figure=chart-orders]", &want, Duration::from_secs(2))
        .await;
    eprintln!("the chart counted the new order after {took:?}");
    operator.screenshot("console-dashboard").await;

    customer.browser.close().await.unwrap();
    operator.browser.close().await.unwrap();
    drop(driver);
    app.stop().await;
}
