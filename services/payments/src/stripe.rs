//! The Stripe adapter: PaymentIntents created and confirmed in one call (amount in minor units,
//! currency lowercase, the payment's `Idempotency-Key`), found again by the payment id in their
//! metadata (the search API), refunds with the refund's key; and the verification of Stripe's
//! signed webhooks (`Stripe-Signature`: HMAC-SHA256 over `{t}.{body}`, 5 minutes' tolerance,
//! constant-time comparison).
//!
//! Stripe's search index lags writes by up to a minute, so the reconciler waits longer than
//! that (`payments.reconcile_after_secs`) before it takes "not found" for "never charged".

use std::time::Duration;

use async_trait::async_trait;
use hmac::{KeyInit, Mac};
use kit::config::Secret;
use reqwest::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

use crate::provider::{
    ChargeOutcome, ChargeRequest, Instrument, PaymentProvider, ProviderError, RefundOutcome,
    RefundRequest,
};

/// The metadata key naming the payment: what the reconciler and webhooks find it by.
pub const PAYMENT_ID_METADATA: &str = "mercato_payment_id";
/// How old a webhook's signature timestamp may be.
pub const WEBHOOK_TOLERANCE_SECS: i64 = 300;

pub struct Stripe {
    http: reqwest::Client,
    api_base: String,
    secret_key: Secret,
}

/// The key is a [`Secret`]: this never prints it.
impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripe")
            .field("api_base", &self.api_base)
            .field("secret_key", &self.secret_key)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub metadata: std::collections::HashMap<String, String>,
    #[serde(default)]
    latest_charge: Option<serde_json::Value>,
    #[serde(default)]
    last_payment_error: Option<StripeError>,
}

#[derive(Debug, Default, Deserialize)]
struct StripeError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    payment_intent: Option<Box<PaymentIntent>>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: StripeError,
}

#[derive(Debug, Deserialize)]
struct SearchResult {
    data: Vec<PaymentIntent>,
}

#[derive(Debug, Deserialize)]
struct StripeRefund {
    id: String,
    status: String,
    #[serde(default)]
    failure_reason: Option<String>,
}

impl PaymentIntent {
    /// The payment this intent was created for, from its metadata.
    pub fn payment_id(&self) -> Option<Uuid> {
        self.metadata.get(PAYMENT_ID_METADATA)?.parse().ok()
    }

    /// What the intent's status means for the payment.
    pub fn outcome(&self) -> ChargeOutcome {
        match self.status.as_str() {
            "succeeded" => ChargeOutcome::Succeeded {
                reference: self.id.clone(),
                card: self.card(),
            },
            // The card was refused (the intent waits for another method, which this platform
            // never sends: a new attempt is a new payment) or the intent was cancelled.
            "requires_payment_method" | "canceled" => ChargeOutcome::Declined {
                reference: Some(self.id.clone()),
                reason: self
                    .last_payment_error
                    .as_ref()
                    .and_then(|e| e.decline_code.clone().or_else(|| e.code.clone()))
                    .unwrap_or_else(|| self.status.clone()),
            },
            _ => ChargeOutcome::Processing {
                reference: self.id.clone(),
            },
        }
    }

    fn card(&self) -> Option<(String, String)> {
        let card = self
            .latest_charge
            .as_ref()?
            .get("payment_method_details")?
            .get("card")?;
        Some((
            card.get("brand")?.as_str()?.to_owned(),
            card.get("last4")?.as_str()?.to_owned(),
        ))
    }
}

fn unknown(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Unknown(e.to_string())
}

/// A failed send: a connection never made moved nothing; anything later may have.
fn send_error(e: reqwest::Error) -> ProviderError {
    if e.is_connect() {
        ProviderError::NotSent(e.to_string())
    } else {
        ProviderError::Unknown(e.to_string())
    }
}

impl Stripe {
    pub fn new(
        api_base: &str,
        secret_key: Secret,
        timeout: Duration,
    ) -> Result<Stripe, reqwest::Error> {
        Ok(Stripe {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .build()?,
            api_base: api_base.trim_end_matches('/').to_owned(),
            secret_key,
        })
    }

    fn post(&self, path: &str, key: &str, form: &[(&str, String)]) -> reqwest::RequestBuilder {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        self.http
            .post(format!("{}{path}", self.api_base))
            .bearer_auth(self.secret_key.expose())
            .header("idempotency-key", key)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    }

    /// Errors other than a decline: 409 (the same key still in flight) and 429/5xx leave the
    /// outcome to be looked up again; other 4xx mean Stripe refused the request itself.
    async fn refusal(status: StatusCode, response: reqwest::Response) -> ProviderError {
        let text = response.text().await.unwrap_or_default();
        let error = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or_default();
        if status == StatusCode::CONFLICT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            return ProviderError::Unknown(format!("stripe answered {status}"));
        }
        ProviderError::Refused {
            // An unknown or unusable payment method is the client's; bad keys are ours.
            by_client: matches!(status, StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND)
                && error.kind.as_deref() == Some("invalid_request_error"),
            code: error.code.unwrap_or_else(|| status.as_u16().to_string()),
            message: error.message.unwrap_or_default(),
        }
    }
}

#[async_trait]
impl PaymentProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn needs_token(&self) -> bool {
        true
    }

    async fn charge(&self, request: &ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError> {
        let Instrument::Token(token) = request.instrument else {
            return Err(ProviderError::Refused {
                by_client: true,
                code: "payment_method_token_required".into(),
                message: "card numbers are never sent to Stripe".into(),
            });
        };
        let form = [
            ("amount", request.amount.cents().to_string()),
            ("currency", request.currency.to_ascii_lowercase()),
            ("payment_method", token.to_owned()),
            ("confirm", "true".into()),
            // Server-side confirmation: no redirect-based methods, so no return_url needed.
            ("automatic_payment_methods[enabled]", "true".into()),
            ("automatic_payment_methods[allow_redirects]", "never".into()),
            ("expand[]", "latest_charge".into()),
            (
                "metadata[mercato_payment_id]",
                request.payment_id.to_string(),
            ),
            ("metadata[mercato_order_id]", request.order_id.to_string()),
            ("metadata[payment_method]", request.method_label.to_owned()),
        ];
        let response = self
            .post("/v1/payment_intents", &request.idempotency_key(), &form)
            .send()
            .await
            .map_err(send_error)?;
        let status = response.status();
        if status.is_success() {
            let intent: PaymentIntent = response.json().await.map_err(unknown)?;
            return Ok(intent.outcome());
        }
        if status == StatusCode::PAYMENT_REQUIRED {
            // A card error: Stripe made the intent and declined it.
            let body: ErrorBody = response.json().await.map_err(unknown)?;
            let reason = body
                .error
                .decline_code
                .clone()
                .or(body.error.code.clone())
                .unwrap_or_else(|| "card_declined".into());
            return Ok(ChargeOutcome::Declined {
                reference: body.error.payment_intent.map(|i| i.id),
                reason,
            });
        }
        Err(Self::refusal(status, response).await)
    }

    async fn lookup(&self, payment_id: Uuid) -> Result<Option<ChargeOutcome>, ProviderError> {
        let query = format!("metadata['{PAYMENT_ID_METADATA}']:'{payment_id}'");
        let response = self
            .http
            .get(format!("{}/v1/payment_intents/search", self.api_base))
            .bearer_auth(self.secret_key.expose())
            .query(&[("query", query.as_str())])
            .send()
            .await
            .map_err(send_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(Self::refusal(status, response).await);
        }
        let found: SearchResult = response.json().await.map_err(unknown)?;
        // One key, one intent; should several exist, a success is what matters.
        let mut outcomes: Vec<ChargeOutcome> =
            found.data.iter().map(PaymentIntent::outcome).collect();
        outcomes.sort_by_key(|o| !matches!(o, ChargeOutcome::Succeeded { .. }));
        Ok(outcomes.into_iter().next())
    }

    async fn refund(&self, request: &RefundRequest<'_>) -> Result<RefundOutcome, ProviderError> {
        let form = [
            ("payment_intent", request.charge_reference.to_owned()),
            ("amount", request.amount.cents().to_string()),
            ("metadata[mercato_refund_id]", request.refund_id.to_string()),
            (
                "metadata[mercato_payment_id]",
                request.payment_id.to_string(),
            ),
        ];
        let response = self
            .post("/v1/refunds", &request.idempotency_key(), &form)
            .send()
            .await
            .map_err(send_error)?;
        let status = response.status();
        if !status.is_success() {
            return match Self::refusal(status, response).await {
                ProviderError::Refused { code, message, .. } => Ok(RefundOutcome::Failed {
                    reason: format!("{code}: {message}"),
                }),
                other => Err(other),
            };
        }
        let refund: StripeRefund = response.json().await.map_err(unknown)?;
        Ok(match refund.status.as_str() {
            "failed" | "canceled" => RefundOutcome::Failed {
                reason: refund.failure_reason.unwrap_or(refund.status),
            },
            _ => RefundOutcome::Refunded {
                reference: refund.id,
            },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("the Stripe-Signature header is missing or malformed")]
    Malformed,
    #[error("the webhook's timestamp is outside the 5 minute tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

/// Checks `header` (`t=<unix secs>,v1=<hex>[,v1=..]`) over `body` with `secret` at `now`.
pub fn verify_signature(
    header: &str,
    body: &[u8],
    secret: &str,
    now: i64,
) -> Result<(), WebhookError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", hex)) => signatures.push(hex),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(WebhookError::Malformed)?;
    if signatures.is_empty() {
        return Err(WebhookError::Malformed);
    }
    // `abs_diff`: the timestamp is the sender's, and `now - i64::MIN` would overflow.
    if now.abs_diff(timestamp) > WEBHOOK_TOLERANCE_SECS.unsigned_abs() {
        return Err(WebhookError::Stale);
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| WebhookError::Malformed)?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let matches = signatures.iter().any(|hex| {
        kit::digest::from_hex(hex).is_some_and(|bytes| mac.clone().verify_slice(&bytes).is_ok())
    });
    if matches {
        Ok(())
    } else {
        Err(WebhookError::Mismatch)
    }
}

/// The part of a Stripe event the webhook acts on.
#[derive(Debug, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sign(body: &str, t: i64, secret: &str) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("t={t},v1={hex}")
    }

    #[test]
    fn signatures_are_checked_over_timestamp_and_body() {
        let body = r#"{"type":"payment_intent.succeeded"}"#;
        let now = 1_764_000_000;
        let good = sign(body, now, "whsec_a");
        assert_eq!(
            verify_signature(&good, body.as_bytes(), "whsec_a", now),
            Ok(())
        );
        assert_eq!(
            verify_signature(&good, body.as_bytes(), "whsec_a", now + 299),
            Ok(()),
            "within the tolerance"
        );
        // Stripe sends one v1 per active secret while a secret is being rolled.
        let rolled = format!("{good},v1={}", "00".repeat(32));
        assert_eq!(
            verify_signature(&rolled, body.as_bytes(), "whsec_a", now),
            Ok(())
        );
        assert_eq!(
            verify_signature(&good, body.as_bytes(), "whsec_b", now),
            Err(WebhookError::Mismatch)
        );
        assert_eq!(
            verify_signature(&good, b"{}", "whsec_a", now),
            Err(WebhookError::Mismatch)
        );
        assert_eq!(
            verify_signature(&good, body.as_bytes(), "whsec_a", now + 301),
            Err(WebhookError::Stale)
        );
        for extreme in [i64::MIN, i64::MAX] {
            let far = sign(body, extreme, "whsec_a");
            assert_eq!(
                verify_signature(&far, body.as_bytes(), "whsec_a", now),
                Err(WebhookError::Stale),
                "a timestamp at {extreme} neither overflows nor passes"
            );
        }
        for malformed in ["", "t=x,v1=00", &format!("t={now}"), "v1=00"] {
            assert_eq!(
                verify_signature(malformed, body.as_bytes(), "whsec_a", now),
                Err(WebhookError::Malformed),
                "{malformed}"
            );
        }
        let odd = format!("t={now},v1=abc");
        assert_eq!(
            verify_signature(&odd, body.as_bytes(), "whsec_a", now),
            Err(WebhookError::Mismatch)
        );
    }

    #[test]
    fn intents_map_to_outcomes() {
        let intent =
            |json: serde_json::Value| -> PaymentIntent { serde_json::from_value(json).unwrap() };
        let paid = intent(serde_json::json!({
            "id": "pi_1", "status": "succeeded",
            "metadata": {"mercato_payment_id": "01a20f00-0000-7000-8000-000000000001"},
            "latest_charge": {"payment_method_details": {"card": {"brand": "visa", "last4": "4242"}}}
        }));
        assert_eq!(
            paid.outcome(),
            ChargeOutcome::Succeeded {
                reference: "pi_1".into(),
                card: Some(("visa".into(), "4242".into()))
            }
        );
        assert!(paid.payment_id().is_some());
        let declined = intent(serde_json::json!({
            "id": "pi_2", "status": "requires_payment_method",
            "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"}
        }));
        assert_eq!(
            declined.outcome(),
            ChargeOutcome::Declined {
                reference: Some("pi_2".into()),
                reason: "insufficient_funds".into()
            }
        );
        let waiting = intent(serde_json::json!({"id": "pi_3", "status": "requires_action"}));
        assert_eq!(
            waiting.outcome(),
            ChargeOutcome::Processing {
                reference: "pi_3".into()
            }
        );
        assert_eq!(waiting.payment_id(), None);
    }

    #[test]
    fn the_secret_key_is_never_printed() {
        let stripe = Stripe::new(
            "http://127.0.0.1:1",
            Secret("sk_live_very_secret".into()),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{stripe:?}").contains("very_secret"));
    }
}
