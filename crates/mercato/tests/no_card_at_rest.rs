//! Issue 13, finding 6: a card number sent to the payments API must never rest anywhere. After
//! payments with an `Idempotency-Key` (approved and declined, plain, spaced and dashed
//! numbers, replays and a reused key), no byte of any file in the data directory (databases,
//! their `-wal` and `-shm` files, anything else) and no log line at debug level holds a card
//! number in any of the forms it was sent in, and the answers show only the last four. The
//! same holds for a number sent through the storefront's payment form.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::spawn_app;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Every log line of the process, at debug level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The forms a number can be written in: `4242424242424242`, `4242 4242 4242 4242`,
/// `4242-4242-4242-4242`.
fn forms(digits: &str) -> Vec<String> {
    let groups: Vec<&str> = digits
        .as_bytes()
        .chunks(4)
        .map(|g| std::str::from_utf8(g).unwrap())
        .collect();
    vec![digits.to_owned(), groups.join(" "), groups.join("-")]
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Every (file, form) where a card number was found under `dir`.
fn card_numbers_in_files(dir: &Path, cards: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    let mut found = Vec::new();
    for file in files {
        // A file can vanish between listing and reading (a checkpoint removes a WAL).
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        for card in cards {
            for form in forms(card) {
                if bytes.windows(form.len()).any(|w| w == form.as_bytes()) {
                    found.push(format!("{form} in {}", file.display()));
                }
            }
        }
    }
    found
}

fn card_numbers_in_logs(logs: &str, cards: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for line in logs.lines() {
        for card in cards {
            for form in forms(card) {
                if line.contains(&form) {
                    found.push(format!("{form} in the log line {line}"));
                }
            }
        }
    }
    found
}

#[tokio::test]
async fn a_test_reads_every_table_and_log_line_after_a_payment_and_finds_no_pan() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_writer(logs.clone())
        .with_ansi(false)
        .init();

    let mut app = spawn_app().await;
    let user = app.create_user("cards@example.com").await;
    let product = app.create_product("CARD-1", "12.34", 100).await;
    // (as sent, its digits, approved?)
    let payments = [
        ("4242424242424242", "4242424242424242", true),
        ("4000000000000002", "4000000000000002", false),
        ("5555555555554444", "5555555555554444", true),
        ("4242 4242 4242 4242", "4242424242424242", true),
        ("5555-5555-5555-4444", "5555555555554444", true),
        ("4000 0000 0000 0002", "4000000000000002", false),
    ];
    // The last one is only ever sent under a reused key, and refused.
    let cards = [
        "4242424242424242",
        "4000000000000002",
        "5555555555554444",
        "4000056655665556",
    ];
    for (n, (sent, digits, approved)) in payments.iter().enumerate() {
        let order = app.place_order(&user, &[(&product, 1)]).await;
        let key = format!("card-key-{n}");
        let body = json!({"order_id": order, "payment_method": "credit_card", "card_number": sent});
        let (status, text, replayed) = app.post_with_key("/api/v1/payments", &key, &body).await;
        let expected = if *approved {
            StatusCode::CREATED
        } else {
            StatusCode::PAYMENT_REQUIRED
        };
        assert_eq!((status, replayed), (expected, false), "{sent}: {text}");
        for form in forms(digits) {
            assert!(!text.contains(&form), "the answer holds {form}: {text}");
        }
        if *approved {
            let answer: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(answer["card_last4"], &digits[12..], "{text}");
        }
        // The replay comes from the idempotency record, which must still tell this request
        // from another one under the same key.
        let again = app.post_with_key("/api/v1/payments", &key, &body).await;
        assert_eq!(again, (status, text.clone(), true), "{sent}: a replay");
        let other = json!({"order_id": order, "card_number": "4000 0566 5566 5556"});
        let (status, text, _) = app.post_with_key("/api/v1/payments", &key, &other).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{sent}: the same key with another card is refused: {text}"
        );
    }

    // The storefront's payment form carries the number through the web pages too: refused by
    // CSRF, refused as unreadable, then paid. None of it may rest either.
    let (_, customer) = app.register("web-cards@example.com").await;
    let placed = app
        .as_caller(Some(&customer))
        .post(
            "/api/v1/orders",
            json!({"items": [{"product_id": product, "quantity": 1}], "shipping_address": "1 Card Road, Pune"}),
        )
        .await;
    let order = placed.body["id"].as_str().unwrap().to_owned();
    let pages = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let pay_url = format!("{}/orders/{order}/pay", app.gateway);
    let form_page = pages
        .get(&pay_url)
        .header("cookie", format!("mercato_session={customer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(form_page.status(), StatusCode::OK);
    let csrf = form_page
        .headers()
        .get_all("set-cookie")
        .iter()
        .find_map(|c| c.to_str().unwrap().strip_prefix("mercato_csrf="))
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned();
    let cookie = format!("mercato_session={customer}; mercato_csrf={csrf}");
    let attempt = uuid::Uuid::new_v4();
    for (form, expected) in [
        (
            format!("csrf=wrong&attempt={attempt}&card_number=4242+4242+4242+4242"),
            StatusCode::FORBIDDEN,
        ),
        (
            format!("csrf={csrf}&card_number=4242424242424242"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!("csrf={csrf}&attempt={attempt}&card_number=4242-4242-4242-4242"),
            StatusCode::SEE_OTHER,
        ),
    ] {
        let answer = pages
            .post(&pay_url)
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), expected, "{form}");
        let text = answer.text().await.unwrap();
        for form in forms("4242424242424242") {
            assert!(!text.contains(&form), "the page holds {form}");
        }
    }
    let paid = app
        .as_caller(Some(&customer))
        .get(&format!("/api/v1/orders/{order}"))
        .await;
    assert_eq!(paid.body["status"], "paid", "{}", paid.body);

    let dir = app.dir.path().to_owned();
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().ends_with("payments.db-wal")),
        "the payments database runs in WAL mode: {files:?}"
    );
    let mut found = card_numbers_in_files(&dir, &cards);
    // Stopped, the stores close and checkpoint: read what that wrote too (the directory lives
    // as long as `app`).
    if let Some(platform) = app.platform.take() {
        platform.stop().await;
    }
    found.extend(
        card_numbers_in_files(&dir, &cards)
            .into_iter()
            .map(|f| format!("after stop: {f}")),
    );
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("payment"),
        "the capture saw the platform's debug logs"
    );
    // The gateway's access log is among the lines read: one per request, naming the client.
    assert!(
        text.lines().any(|l| l.contains(" access:")
            && l.contains("client=127.0.0.1")
            && l.contains("status=402")
            && l.contains("route=\"/api/v1/payments\"")),
        "an access line for a declined payment, with the client's address"
    );
    found.extend(card_numbers_in_logs(&text, &cards));
    assert!(found.is_empty(), "card numbers at rest: {found:#?}");
}
