//! A local stand-in for the slice of Stripe's REST API the payments service uses
//! (PaymentIntents create+confirm, search by metadata, retrieve; refunds), served by the test
//! itself on a free port. It keeps Stripe's idempotency rule (a repeated `Idempotency-Key`
//! replays the first answer and charges nothing) and COUNTS what it really charged and
//! refunded, so a test can prove "charged exactly once".
//!
//! Payment method tokens, as Stripe's test tokens: `pm_card_visa` succeeds,
//! `pm_card_chargeDeclined` is declined (402 `card_declined`), `pm_card_processing` stays
//! `processing` until a webhook says otherwise.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

pub const SECRET_KEY: &str = "sk_test_fake_0123456789";

#[derive(Default)]
struct Books {
    /// Idempotency-Key → the amount it was first sent with, and (status, body) of its answer.
    answers: HashMap<String, (i64, StatusCode, Value)>,
    intents: Vec<Value>,
    refunds: Vec<Value>,
}

#[derive(Clone, Default)]
pub struct FakeStripe {
    books: Arc<Mutex<Books>>,
    /// Set: the process with this pid is SIGKILLed when a charge arrives, before it is answered
    /// (the charge is taken; the caller never hears of it).
    kill_on_charge: Arc<AtomicU32>,
    pub url: String,
}

impl FakeStripe {
    pub async fn start() -> FakeStripe {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeStripe {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..FakeStripe::default()
        };
        let app = Router::new()
            .route("/v1/payment_intents", post(create_intent))
            .route("/v1/payment_intents/search", get(search_intents))
            .route("/v1/payment_intents/{id}", get(retrieve_intent))
            .route("/v1/refunds", post(create_refund))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// Intents created (real charges attempted), whatever the replays.
    pub fn charges(&self) -> usize {
        self.books.lock().unwrap().intents.len()
    }

    pub fn refunds(&self) -> Vec<Value> {
        self.books.lock().unwrap().refunds.clone()
    }

    pub fn intents(&self) -> Vec<Value> {
        self.books.lock().unwrap().intents.clone()
    }

    pub fn kill_on_charge(&self, pid: u32) {
        self.kill_on_charge.store(pid, Ordering::SeqCst);
    }

    /// Sets an intent's status, as Stripe does when an asynchronous payment completes.
    pub fn settle(&self, intent_id: &str, status: &str) -> Value {
        let mut books = self.books.lock().unwrap();
        let intent = books
            .intents
            .iter_mut()
            .find(|i| i["id"] == intent_id)
            .unwrap();
        intent["status"] = json!(status);
        intent.clone()
    }
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {SECRET_KEY}"))
}

fn error(status: StatusCode, kind: &str, message: &str) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({"error": {"type": kind, "message": message}})),
    )
}

/// Stripe's form encoding, bracketed keys kept as they are (`metadata[order_id]`).
type FormBody = Vec<(String, String)>;

fn parse_form(body: &str) -> FormBody {
    url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

fn field<'a>(form: &'a FormBody, name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn metadata(form: &FormBody) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in form {
        if let Some(name) = k
            .strip_prefix("metadata[")
            .and_then(|k| k.strip_suffix(']'))
        {
            out.insert(name.to_owned(), json!(v));
        }
    }
    Value::Object(out)
}

/// Stripe's idempotency: the first answer again for the same key and parameters, an
/// `idempotency_error` for the same key with others.
fn replay(books: &Books, key: &str, amount: i64) -> Option<(StatusCode, Json<Value>)> {
    let (first_amount, status, body) = books.answers.get(key)?;
    Some(if *first_amount == amount {
        (*status, Json(body.clone()))
    } else {
        error(
            StatusCode::BAD_REQUEST,
            "idempotency_error",
            "Keys for idempotent requests can only be used with the same parameters they were first used with.",
        )
    })
}

async fn create_intent(
    State(fake): State<FakeStripe>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "bad key");
    }
    let form = parse_form(&body);
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the test demands an Idempotency-Key on every charge",
        );
    };
    let (status, body) = {
        let mut books = fake.books.lock().unwrap();
        let amount: i64 = field(&form, "amount").unwrap().parse().unwrap();
        if let Some(answer) = replay(&books, key, amount) {
            return answer;
        }
        let currency = field(&form, "currency").unwrap();
        assert_eq!(currency, currency.to_lowercase(), "Stripe wants lowercase");
        assert_eq!(field(&form, "confirm"), Some("true"));
        let method = field(&form, "payment_method").unwrap_or_default();
        let id = format!("pi_fake_{}", books.intents.len() + 1);
        let (status, intent_status, error_code) = match method {
            "pm_card_chargeDeclined" => (
                StatusCode::PAYMENT_REQUIRED,
                "requires_payment_method",
                Some("card_declined"),
            ),
            "pm_card_processing" => (StatusCode::OK, "processing", None),
            _ => (StatusCode::OK, "succeeded", None),
        };
        let intent = json!({
            "id": id,
            "object": "payment_intent",
            "amount": amount,
            "currency": currency,
            "status": intent_status,
            "metadata": metadata(&form),
            "latest_charge": {
                "id": format!("ch_fake_{}", books.intents.len() + 1),
                "payment_method_details": {"card": {"brand": "visa", "last4": "4242"}}
            },
            "last_payment_error": error_code.map(|c| json!({"code": c})),
        });
        books.intents.push(intent.clone());
        let body = match error_code {
            Some(code) => {
                json!({"error": {"type": "card_error", "code": code, "payment_intent": intent}})
            }
            None => intent,
        };
        books
            .answers
            .insert(key.to_owned(), (amount, status, body.clone()));
        (status, body)
    };
    let pid = fake.kill_on_charge.swap(0, Ordering::SeqCst);
    if pid != 0 {
        std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status()
            .unwrap();
    }
    (status, Json(body))
}

#[derive(serde::Deserialize)]
struct Search {
    query: String,
}

async fn search_intents(
    State(fake): State<FakeStripe>,
    headers: HeaderMap,
    Query(search): Query<Search>,
) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "bad key");
    }
    // Only the one query shape the service sends: metadata['name']:'value'.
    let parsed = search
        .query
        .strip_prefix("metadata['")
        .and_then(|rest| rest.split_once("']:'"))
        .and_then(|(name, value)| Some((name.to_owned(), value.strip_suffix('\'')?.to_owned())));
    let Some((name, value)) = parsed else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "unsupported query",
        );
    };
    let books = fake.books.lock().unwrap();
    let data: Vec<Value> = books
        .intents
        .iter()
        .filter(|i| i["metadata"][&name] == value.as_str())
        .cloned()
        .collect();
    (
        StatusCode::OK,
        Json(json!({"object": "search_result", "data": data, "has_more": false})),
    )
}

async fn retrieve_intent(
    State(fake): State<FakeStripe>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "bad key");
    }
    let books = fake.books.lock().unwrap();
    match books.intents.iter().find(|i| i["id"] == id.as_str()) {
        Some(intent) => (StatusCode::OK, Json(intent.clone())),
        None => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such payment_intent",
        ),
    }
}

async fn create_refund(
    State(fake): State<FakeStripe>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "bad key");
    }
    let form = parse_form(&body);
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the test demands an Idempotency-Key on every refund",
        );
    };
    let mut books = fake.books.lock().unwrap();
    let amount: i64 = field(&form, "amount").unwrap().parse().unwrap();
    if let Some(answer) = replay(&books, key, amount) {
        return answer;
    }
    let intent_id = field(&form, "payment_intent")
        .unwrap_or_default()
        .to_owned();
    let Some(intent) = books.intents.iter().find(|i| i["id"] == intent_id.as_str()) else {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such payment_intent",
        );
    };
    let charged = intent["amount"].as_i64().unwrap();
    let refunded: i64 = books
        .refunds
        .iter()
        .filter(|r| r["payment_intent"] == intent_id.as_str())
        .map(|r| r["amount"].as_i64().unwrap())
        .sum();
    if refunded + amount > charged {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "refund exceeds the charge",
        );
    }
    let refund = json!({
        "id": format!("re_fake_{}", books.refunds.len() + 1),
        "object": "refund",
        "amount": amount,
        "payment_intent": intent_id,
        "status": "succeeded",
        "metadata": metadata(&form),
    });
    books.refunds.push(refund.clone());
    books
        .answers
        .insert(key.to_owned(), (amount, StatusCode::OK, refund.clone()));
    (StatusCode::OK, Json(refund))
}
