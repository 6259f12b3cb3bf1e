//! A deterministic stand-in for a card network, with test numbers like the big payment APIs;
//! no money moves, so it is refused in production:
//!
//! | card number          | outcome                              |
//! |----------------------|--------------------------------------|
//! | 4242 4242 4242 4242  | succeeds (also the default)          |
//! | 4000 0000 0000 0002  | declined: `card_declined`            |
//! | 4000 0000 0000 9995  | declined: `insufficient_funds`       |
//! | 4000 0000 0000 0119  | provider unreachable (network error) |
//! | any other Luhn-valid | succeeds                             |
//!
//! Like a real provider it is idempotent by key (in memory: a restart forgets, and a pending
//! payment it cannot find is then abandoned by the reconciler, as nothing was taken).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use uuid::Uuid;

use crate::provider::{
    Card, ChargeOutcome, ChargeRequest, Instrument, PaymentProvider, ProviderError, RefundOutcome,
    RefundRequest, charge_key,
};

pub const SUCCESS_CARD: &str = "4242424242424242";
pub const DECLINED_CARD: &str = "4000000000000002";
pub const INSUFFICIENT_FUNDS_CARD: &str = "4000000000009995";
pub const NETWORK_ERROR_CARD: &str = "4000000000000119";

/// Outcomes remembered per key; the oldest are forgotten past this (a development process).
const REMEMBERED: usize = 100_000;

#[derive(Debug, Default)]
pub struct Simulator {
    charges: Mutex<Remembered<ChargeOutcome>>,
    refunds: Mutex<Remembered<RefundOutcome>>,
}

/// Outcomes by key, with the amount each key was first sent with.
#[derive(Debug)]
struct Remembered<T> {
    by_key: HashMap<String, (i64, T)>,
    order: VecDeque<String>,
}

/// A key sent again with another amount: refused, as Stripe refuses a reused key with other
/// parameters, so a replay can never stand for a different request.
#[derive(Debug)]
struct KeyReused;

impl<T> Default for Remembered<T> {
    fn default() -> Self {
        Remembered {
            by_key: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<T: Clone> Remembered<T> {
    /// The outcome stored under `key` (sent with `cents`), or `make`'s, stored.
    fn get_or(
        &mut self,
        key: String,
        cents: i64,
        make: impl FnOnce() -> T,
    ) -> Result<T, KeyReused> {
        if let Some((first_cents, known)) = self.by_key.get(&key) {
            return if *first_cents == cents {
                Ok(known.clone())
            } else {
                Err(KeyReused)
            };
        }
        let outcome = make();
        if self.order.len() >= REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_key.remove(&oldest);
        }
        self.order.push_back(key.clone());
        self.by_key.insert(key, (cents, outcome.clone()));
        Ok(outcome)
    }
}

/// What the test card table says about `card`; `None` for the unreachable one.
pub fn outcome_for(card: &Card) -> Option<ChargeOutcome> {
    let declined = |reason: &str| ChargeOutcome::Declined {
        reference: None,
        reason: reason.to_owned(),
    };
    match card.digits() {
        DECLINED_CARD => Some(declined("card_declined")),
        INSUFFICIENT_FUNDS_CARD => Some(declined("insufficient_funds")),
        NETWORK_ERROR_CARD => None,
        _ => Some(ChargeOutcome::Succeeded {
            reference: format!("sim_{}", Uuid::new_v4().simple()),
            card: Some((card.brand().to_owned(), card.last4().to_owned())),
        }),
    }
}

fn poisoned() -> ProviderError {
    ProviderError::Unknown("the simulator's memory is poisoned".into())
}

#[async_trait]
impl PaymentProvider for Simulator {
    fn name(&self) -> &'static str {
        "simulator"
    }

    fn needs_token(&self) -> bool {
        false
    }

    async fn charge(&self, request: &ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError> {
        let Instrument::Card(card) = request.instrument else {
            return Err(ProviderError::Refused {
                by_client: true,
                code: "card_number_required".into(),
                message: "the simulator charges test card numbers only".into(),
            });
        };
        // The unreachable card never gets as far as the memory: nothing happened.
        let Some(outcome) = outcome_for(card) else {
            return Err(ProviderError::NotSent(
                "simulated network error (test card 4000 0000 0000 0119)".into(),
            ));
        };
        let mut charges = self.charges.lock().map_err(|_| poisoned())?;
        charges
            .get_or(request.idempotency_key(), request.amount.cents(), || {
                outcome
            })
            .map_err(|KeyReused| ProviderError::Refused {
                by_client: false,
                code: "idempotency_key_reused".into(),
                message: "this key was sent with another amount".into(),
            })
    }

    async fn lookup(&self, payment_id: Uuid) -> Result<Option<ChargeOutcome>, ProviderError> {
        let charges = self.charges.lock().map_err(|_| poisoned())?;
        Ok(charges
            .by_key
            .get(&charge_key(payment_id))
            .map(|(_, outcome)| outcome.clone()))
    }

    async fn refund(&self, request: &RefundRequest<'_>) -> Result<RefundOutcome, ProviderError> {
        let mut refunds = self.refunds.lock().map_err(|_| poisoned())?;
        let made = refunds.get_or(request.idempotency_key(), request.amount.cents(), || {
            RefundOutcome::Refunded {
                reference: format!("sim_re_{}", Uuid::new_v4().simple()),
            }
        });
        Ok(made.unwrap_or_else(|KeyReused| RefundOutcome::Failed {
            reason: "idempotency_key_reused: this refund was requested with another amount".into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use kit::Money;

    use super::*;

    fn request(payment_id: Uuid, card: &Card) -> ChargeRequest<'_> {
        ChargeRequest {
            payment_id,
            order_id: Uuid::now_v7(),
            amount: Money::from_cents(100).unwrap(),
            currency: "INR",
            instrument: Instrument::Card(card),
            method_label: "credit_card",
        }
    }

    #[tokio::test]
    async fn test_cards_behave_as_documented() {
        let sim = Simulator::default();
        let charge = |number: &str| {
            let card = Card::parse(number).unwrap();
            let sim = &sim;
            async move { sim.charge(&request(Uuid::now_v7(), &card)).await }
        };
        assert!(matches!(
            charge("4242 4242 4242 4242").await,
            Ok(ChargeOutcome::Succeeded { card: Some((brand, last4)), .. })
                if brand == "visa" && last4 == "4242"
        ));
        for (number, reason) in [
            (DECLINED_CARD, "card_declined"),
            (INSUFFICIENT_FUNDS_CARD, "insufficient_funds"),
        ] {
            assert_eq!(
                charge(number).await,
                Ok(ChargeOutcome::Declined {
                    reference: None,
                    reason: reason.into()
                })
            );
        }
        assert!(matches!(
            charge(NETWORK_ERROR_CARD).await,
            Err(ProviderError::NotSent(_))
        ));
        assert!(matches!(
            sim.charge(&ChargeRequest {
                instrument: Instrument::Token("pm_card_visa"),
                ..request(Uuid::now_v7(), &Card::parse(SUCCESS_CARD).unwrap())
            })
            .await,
            Err(ProviderError::Refused {
                by_client: true,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn one_key_charges_once_and_is_found_again() {
        let sim = Simulator::default();
        let card = Card::parse(SUCCESS_CARD).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(sim.lookup(id).await.unwrap(), None);
        let first = sim.charge(&request(id, &card)).await.unwrap();
        let again = sim.charge(&request(id, &card)).await.unwrap();
        assert_eq!(first, again, "the same reference: one charge");
        assert_eq!(sim.lookup(id).await.unwrap(), Some(first));
        let refund = RefundRequest {
            refund_id: Uuid::now_v7(),
            payment_id: id,
            charge_reference: "sim_x",
            amount: Money::from_cents(100).unwrap(),
            currency: "INR",
        };
        assert_eq!(
            sim.refund(&refund).await.unwrap(),
            sim.refund(&refund).await.unwrap()
        );
        // The same key for another amount is another request: refused, never a replay.
        let other = RefundRequest {
            amount: Money::from_cents(50).unwrap(),
            ..refund.clone()
        };
        assert!(matches!(
            sim.refund(&other).await.unwrap(),
            RefundOutcome::Failed { .. }
        ));
        let mut cheaper = request(id, &card);
        cheaper.amount = Money::from_cents(1).unwrap();
        assert!(matches!(
            sim.charge(&cheaper).await,
            Err(ProviderError::Refused { .. })
        ));
    }
}
