//! A deterministic stand-in for a card network, with test numbers like the big payment APIs:
//!
//! | card number          | outcome                              |
//! |----------------------|--------------------------------------|
//! | 4242 4242 4242 4242  | succeeds (also the default)          |
//! | 4000 0000 0000 0002  | declined: `card_declined`            |
//! | 4000 0000 0000 9995  | declined: `insufficient_funds`       |
//! | 4000 0000 0000 0119  | provider unreachable (network error) |
//! | any other Luhn-valid | succeeds                             |

use kit::Money;
use uuid::Uuid;

pub const SUCCESS_CARD: &str = "4242424242424242";
pub const DECLINED_CARD: &str = "4000000000000002";
pub const INSUFFICIENT_FUNDS_CARD: &str = "4000000000009995";
pub const NETWORK_ERROR_CARD: &str = "4000000000000119";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    digits: String,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    Succeeded {
        reference: String,
    },
    Declined {
        reason: &'static str,
    },
    /// The provider could not be reached; nothing was charged.
    Unreachable,
}

pub fn charge(card: &Card, _amount: Money) -> Charge {
    match card.digits.as_str() {
        DECLINED_CARD => Charge::Declined {
            reason: "card_declined",
        },
        INSUFFICIENT_FUNDS_CARD => Charge::Declined {
            reason: "insufficient_funds",
        },
        NETWORK_ERROR_CARD => Charge::Unreachable,
        _ => Charge::Succeeded {
            reference: format!("sim_{}", Uuid::new_v4().simple()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cards_behave_as_documented() {
        let amount = Money::from_cents(100).unwrap();
        assert!(matches!(
            charge(&Card::parse("4242 4242 4242 4242").unwrap(), amount),
            Charge::Succeeded { .. }
        ));
        assert_eq!(
            charge(&Card::parse(DECLINED_CARD).unwrap(), amount),
            Charge::Declined {
                reason: "card_declined"
            }
        );
        assert_eq!(
            charge(&Card::parse(INSUFFICIENT_FUNDS_CARD).unwrap(), amount),
            Charge::Declined {
                reason: "insufficient_funds"
            }
        );
        assert_eq!(
            charge(&Card::parse(NETWORK_ERROR_CARD).unwrap(), amount),
            Charge::Unreachable
        );
        assert_eq!(Card::parse("4242-4242-4242-4242").unwrap().last4(), "4242");
    }

    #[test]
    fn invalid_numbers_are_refused() {
        assert_eq!(Card::parse("4242424242424241"), Err(InvalidCard));
        assert_eq!(Card::parse("42"), Err(InvalidCard));
        assert_eq!(Card::parse("4242x24242424242"), Err(InvalidCard));
    }
}
