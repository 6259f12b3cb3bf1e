//! What takes the money: the [`PaymentProvider`] contract (charge, look a charge up by its
//! idempotency key, refund), the card numbers the simulator accepts, and the brand a card
//! number's BIN names. Implementations: [`crate::simulator`] (development and tests) and
//! [`crate::stripe`].
//!
//! Every charge and refund carries an idempotency key derived from the payment's (or refund's)
//! id, so sending it again (a retry, the reconciler after a crash) never moves money twice and
//! finds the first attempt's outcome.

use async_trait::async_trait;
use kit::Money;
use uuid::Uuid;

/// A card number as a customer typed it, only ever held in memory for one charge.
#[derive(Clone, PartialEq, Eq)]
pub struct Card {
    digits: String,
}

/// A card is never printed with its digits, whatever logs it.
impl std::fmt::Debug for Card {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Card({} ****{})", self.brand(), self.last4())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("card_number must be 12 to 19 digits passing the Luhn check")]
pub struct InvalidCard;

impl Card {
    pub fn parse(raw: &str) -> Result<Card, InvalidCard> {
        let digits: String = raw.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        if !(12..=19).contains(&digits.len())
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || !luhn(&digits)
        {
            return Err(InvalidCard);
        }
        Ok(Card { digits })
    }

    pub fn last4(&self) -> &str {
        &self.digits[self.digits.len() - 4..]
    }

    /// The network, from the leading digits (the BIN).
    pub fn brand(&self) -> &'static str {
        brand_of(&self.digits)
    }

    pub(crate) fn digits(&self) -> &str {
        &self.digits
    }
}

/// visa 4; mastercard 51-55 and 2221-2720; amex 34, 37; rupay 60, 65, 81, 82, 508; else unknown.
pub fn brand_of(digits: &str) -> &'static str {
    let prefix = |n: usize| -> u32 {
        digits
            .get(..n)
            .and_then(|p| p.parse().ok())
            .unwrap_or_default()
    };
    match (prefix(1), prefix(2), prefix(3), prefix(4)) {
        (4, ..) => "visa",
        (_, 51..=55, ..) | (.., 2221..=2720) => "mastercard",
        (_, 34 | 37, ..) => "amex",
        (_, 60 | 65 | 81 | 82, ..) | (_, _, 508, _) => "rupay",
        _ => "unknown",
    }
}

fn luhn(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let dd = d * 2;
                if dd > 9 { dd - 9 } else { dd }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// How the customer pays: a card number (the simulator only) or a provider's payment method
/// token (`pm_...` at Stripe), which keeps card numbers out of this platform entirely.
#[derive(Debug, Clone, Copy)]
pub enum Instrument<'a> {
    Card(&'a Card),
    Token(&'a str),
}

/// One charge, named by the payment it is for.
#[derive(Debug, Clone)]
pub struct ChargeRequest<'a> {
    pub payment_id: Uuid,
    pub order_id: Uuid,
    pub amount: Money,
    /// ISO 4217, as the order has it.
    pub currency: &'a str,
    pub instrument: Instrument<'a>,
    /// The client's free-text method (`credit_card`, ...), passed on as metadata.
    pub method_label: &'a str,
}

impl ChargeRequest<'_> {
    pub fn idempotency_key(&self) -> String {
        charge_key(self.payment_id)
    }
}

/// The idempotency key of a payment's charge: the same for every attempt at that payment.
pub fn charge_key(payment_id: Uuid) -> String {
    format!("mercato-payment-{payment_id}")
}

/// What the provider did with a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded {
        reference: String,
        /// The card's brand and last four, when the provider says (never the number).
        card: Option<(String, String)>,
    },
    Declined {
        reference: Option<String>,
        reason: String,
    },
    /// Accepted, not finished (a bank's confirmation, 3-D Secure): a webhook or the reconciler
    /// finishes the payment.
    Processing { reference: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The request never reached the provider (no connection): nothing can have been charged.
    #[error("the payment provider could not be reached: {0}")]
    NotSent(String),
    /// The request may have reached the provider but no answer came (timeout, 5xx, a reply that
    /// could not be read): the outcome is unknown until the charge is looked up.
    #[error("the payment provider's answer is unknown: {0}")]
    Unknown(String),
    /// The provider refused the request itself (bad token, bad credentials): nothing charged.
    #[error("the payment provider refused the request ({code}): {message}")]
    Refused {
        /// The request was the client's fault (an unknown payment method token), not ours.
        by_client: bool,
        code: String,
        message: String,
    },
}

/// One refund of a charge, named by the refund it records.
#[derive(Debug, Clone)]
pub struct RefundRequest<'a> {
    pub refund_id: Uuid,
    pub payment_id: Uuid,
    /// The charge's reference at the provider.
    pub charge_reference: &'a str,
    pub amount: Money,
    pub currency: &'a str,
}

impl RefundRequest<'_> {
    pub fn idempotency_key(&self) -> String {
        format!("mercato-refund-{}", self.refund_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// Done, or accepted and certain to complete (Stripe's `pending`).
    Refunded {
        reference: String,
    },
    Failed {
        reason: String,
    },
}

/// A payment provider. Implementations must be idempotent by the requests' keys: the same key
/// again returns the first outcome and moves no money.
#[async_trait]
pub trait PaymentProvider: Send + Sync + std::fmt::Debug {
    /// `simulator`, `stripe`: for logs and metrics.
    fn name(&self) -> &'static str;

    /// Whether payments must name a payment method token (a real provider never sees card
    /// numbers) rather than a card number.
    fn needs_token(&self) -> bool;

    async fn charge(&self, request: &ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError>;

    /// The charge made for `payment_id` (with [`charge_key`]), if the provider has one.
    async fn lookup(&self, payment_id: Uuid) -> Result<Option<ChargeOutcome>, ProviderError>;

    async fn refund(&self, request: &RefundRequest<'_>) -> Result<RefundOutcome, ProviderError>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn invalid_numbers_are_refused() {
        assert_eq!(Card::parse("4242424242424241"), Err(InvalidCard));
        assert_eq!(Card::parse("42"), Err(InvalidCard));
        assert_eq!(Card::parse("4242x24242424242"), Err(InvalidCard));
        assert_eq!(Card::parse("4242-4242-4242-4242").unwrap().last4(), "4242");
    }

    #[test]
    fn brands_come_from_the_bin() {
        for (number, brand) in [
            ("4242424242424242", "visa"),
            ("5555555555554444", "mastercard"),
            ("5105105105105100", "mastercard"),
            ("2223003122003222", "mastercard"),
            ("2720990000000007", "mastercard"),
            ("378282246310005", "amex"),
            ("341111111111111", "amex"),
            ("6071234567890123", "rupay"),
            ("6521234567890123", "rupay"),
            ("8112345678901234", "rupay"),
            ("8212345678901234", "rupay"),
            ("5081234567890123", "rupay"),
            ("6011111111111117", "rupay"),
            ("3530111333300000", "unknown"),
            ("2721000000000000", "unknown"),
            ("5612345678901234", "unknown"),
        ] {
            assert_eq!(brand_of(number), brand, "{number}");
        }
    }

    #[test]
    fn a_card_is_never_debug_printed_with_its_digits() {
        let card = Card::parse("5555 5555 5555 4444").unwrap();
        let printed = format!("{card:?} {:?}", Instrument::Card(&card));
        assert!(!printed.contains("55555555"), "{printed}");
        assert!(printed.contains("mastercard") && printed.contains("4444"));
    }
}
