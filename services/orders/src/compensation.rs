//! The orders service's one call into payments: give back the money of a payment whose order
//! can no longer be delivered (it expired or was cancelled while the customer paid), so nobody
//! pays for nothing.

use kit::client::{CallError, ServiceClient};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why orders asks for the money back (payments records it with the refund).
pub const ORDER_CANCELLED: &str = "order_cancelled";

#[derive(Debug, Serialize)]
struct CompensateRequest<'a> {
    reason: &'a str,
}

/// The payment as payments answers it; only what the log needs.
#[derive(Debug, Deserialize)]
pub struct Compensated {
    pub status: String,
}

/// The payments service's internal routes, signed as the orders service.
#[derive(Debug, Clone)]
pub struct PaymentsClient {
    client: ServiceClient,
}

impl PaymentsClient {
    pub fn new(client: ServiceClient) -> PaymentsClient {
        PaymentsClient { client }
    }

    /// Refunds whatever is left of `payment_id`. Idempotent on the payments side: a payment
    /// already refunded answers 200 as well, so a redelivered event may ask again.
    pub async fn compensate(&self, payment_id: Uuid) -> Result<Compensated, CallError> {
        self.client
            .post(
                &format!("/internal/v1/payments/{payment_id}/compensate"),
                &CompensateRequest {
                    reason: ORDER_CANCELLED,
                },
            )
            .await
    }
}

/// Whether a refused compensation should be asked again later rather than given up: payments
/// not trusting this caller (401/403) or shedding load (429) is a state that passes; an unknown
/// payment (404) or one that took no money (409) is not.
pub fn worth_retrying(e: &CallError) -> bool {
    match e.status() {
        None => true,
        Some(status) => matches!(status.as_u16(), 401 | 403 | 408 | 429),
    }
}
