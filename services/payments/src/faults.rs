//! The payment provider while faults may be injected (`kit::faults`): whichever provider is
//! configured (the simulator or Stripe), wrapped so that `payment-timeout` makes a charge fail
//! as an unreachable provider does (nothing charged, the intent withdrawn, 503: the path of the
//! simulator's card 4000 0000 0000 0119) and `payment-decline` makes the provider decline it
//! (the payment fails, the order is cancelled and its stock released, 402). Lookups and refunds
//! pass through untouched.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::provider::{
    ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundOutcome, RefundRequest,
};

/// Why an injected decline says it was declined.
pub const DECLINE_REASON: &str = "card_declined_fault_injected";

/// `provider`, failing charges as the payment faults say.
#[derive(Debug)]
pub struct WithFaults(pub Arc<dyn PaymentProvider>);

#[async_trait]
impl PaymentProvider for WithFaults {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn needs_token(&self) -> bool {
        self.0.needs_token()
    }

    async fn charge(&self, request: &ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError> {
        // The provider never hears of the charge: nothing to look up or refund later.
        if kit::faults::payment_times_out() {
            return Err(ProviderError::NotSent(
                "fault injected: payment-timeout (the provider could not be reached)".into(),
            ));
        }
        if kit::faults::payment_declines() {
            return Ok(ChargeOutcome::Declined {
                reference: None,
                reason: DECLINE_REASON.into(),
            });
        }
        self.0.charge(request).await
    }

    async fn lookup(&self, payment_id: Uuid) -> Result<Option<ChargeOutcome>, ProviderError> {
        self.0.lookup(payment_id).await
    }

    async fn refund(&self, request: &RefundRequest<'_>) -> Result<RefundOutcome, ProviderError> {
        self.0.refund(request).await
    }
}
