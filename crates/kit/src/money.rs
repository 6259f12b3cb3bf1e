//! Exact money: integer minor units, parsed from and written as JSON decimals.
//!
//! Own type rather than `rust_decimal`: exact parsing of a JSON *number* such as `1999.99`
//! would otherwise need serde_json's `arbitrary_precision` for the whole workspace. Here the
//! number's raw text is read through `RawValue` and converted without ever touching a float.

use std::fmt;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// An amount in cents (two decimal places), never negative. 92 233 720 368 547 758.07 max.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(i64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("amount must be a decimal number with at most two fractional digits, such as 1999.99")]
    Malformed,
    #[error("amount must not be negative")]
    Negative,
    #[error("amount is too large")]
    Overflow,
}

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn from_cents(cents: i64) -> Result<Self, MoneyError> {
        if cents < 0 {
            return Err(MoneyError::Negative);
        }
        Ok(Money(cents))
    }

    pub fn cents(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).filter(|c| *c >= 0).map(Money)
    }

    pub fn checked_mul(self, quantity: i64) -> Option<Money> {
        self.0.checked_mul(quantity).filter(|c| *c >= 0).map(Money)
    }

    /// Divides by `n`, rounding half to even (banker's rounding), as averages are reported.
    pub fn div_round(self, n: i64) -> Option<Money> {
        if n <= 0 {
            return None;
        }
        let (q, r) = (self.0 / n, self.0 % n);
        let twice = r * 2;
        let rounded = if twice > n || (twice == n && q % 2 == 1) {
            q + 1
        } else {
            q
        };
        Some(Money(rounded))
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix('-') {
            return match rest.parse::<Money>() {
                Ok(m) if m.0 == 0 => Ok(m),
                Ok(_) => Err(MoneyError::Negative),
                Err(e) => Err(e),
            };
        }
        let (whole, frac) = match s.split_once('.') {
            Some((w, f)) => (w, f),
            None => (s, ""),
        };
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || !digits(whole)
            || !digits(frac)
            || (s.contains('.') && frac.is_empty())
        {
            return Err(MoneyError::Malformed);
        }
        // Trailing zeros beyond the cents are harmless (1.500); anything else is not exact.
        let frac_trimmed = if frac.len() > 2 {
            if frac[2..].bytes().any(|b| b != b'0') {
                return Err(MoneyError::Malformed);
            }
            &frac[..2]
        } else {
            frac
        };
        let whole: i64 = whole.parse().map_err(|_| MoneyError::Overflow)?;
        let mut cents_part: i64 = if frac_trimmed.is_empty() {
            0
        } else {
            frac_trimmed.parse().map_err(|_| MoneyError::Malformed)?
        };
        if frac_trimmed.len() == 1 {
            cents_part *= 10;
        }
        whole
            .checked_mul(100)
            .and_then(|c| c.checked_add(cents_part))
            .map(Money)
            .ok_or(MoneyError::Overflow)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl Serialize for Money {
    /// Written as a JSON number with exactly two decimals (`1999.90`), as the seed's clients expect.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = RawValue::from_string(self.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    /// Accepts a JSON number (`1999.99`) or a string (`"1999.99"`), exactly.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(deserializer)?;
        let text = raw.get().trim();
        let text = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(inner) => inner,
            None => text,
        };
        text.parse::<Money>().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimals_exactly() {
        assert_eq!("1999.99".parse::<Money>(), Ok(Money(199_999)));
        assert_eq!("0.1".parse::<Money>(), Ok(Money(10)));
        assert_eq!("7".parse::<Money>(), Ok(Money(700)));
        assert_eq!("1.500".parse::<Money>(), Ok(Money(150)));
        assert_eq!("-0".parse::<Money>(), Ok(Money(0)));
    }

    #[test]
    fn rejects_inexact_or_malformed() {
        assert_eq!("1.999".parse::<Money>(), Err(MoneyError::Malformed));
        assert_eq!("1e3".parse::<Money>(), Err(MoneyError::Malformed));
        assert_eq!("".parse::<Money>(), Err(MoneyError::Malformed));
        assert_eq!(".5".parse::<Money>(), Err(MoneyError::Malformed));
        assert_eq!("5.".parse::<Money>(), Err(MoneyError::Malformed));
        assert_eq!("-1.00".parse::<Money>(), Err(MoneyError::Negative));
        assert_eq!(
            "99999999999999999999".parse::<Money>(),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn json_round_trip_keeps_every_cent() {
        let m: Money = serde_json::from_str("1999.99").unwrap();
        assert_eq!(m.checked_mul(2).unwrap().to_string(), "3999.98");
        assert_eq!(serde_json::to_string(&m).unwrap(), "1999.99");
        let s: Money = serde_json::from_str("\"0.30\"").unwrap();
        assert_eq!(s.cents(), 30);
        assert!(serde_json::from_str::<Money>("true").is_err());
        assert!(serde_json::from_str::<Money>("-3").is_err());
    }

    #[test]
    fn average_rounds_half_to_even() {
        assert_eq!(Money(5).div_round(2), Some(Money(2)));
        assert_eq!(Money(7).div_round(2), Some(Money(4)));
        assert_eq!(Money(10).div_round(3), Some(Money(3)));
        assert_eq!(Money(1).div_round(0), None);
    }
}
