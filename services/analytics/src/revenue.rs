//! Sums of money over many orders. One order's amount fits [`Money`] (64-bit cents, up to
//! 92,233,720,368,547,758.07), but two such orders do not: window totals, product revenue and
//! their averages are 128-bit cents, written like `Money` (a JSON number with two decimals).
//!
//! Adding saturates instead of failing, so no event can stop a window from being applied,
//! reported or emitted. Saturation is unreachable from valid input: it takes more than 2^64
//! orders at the largest amount, and the store could not hold that many event ids.

use std::fmt;
use std::str::FromStr;

use kit::Money;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// An exact total in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revenue(i128);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a revenue must be a decimal number with at most two fractional digits, such as 1999.99")]
pub struct MalformedRevenue;

impl Revenue {
    pub const ZERO: Revenue = Revenue(0);

    pub fn from_cents(cents: i128) -> Revenue {
        Revenue(cents)
    }

    pub fn cents(self) -> i128 {
        self.0
    }

    pub fn plus(self, other: Revenue) -> Revenue {
        Revenue(self.0.saturating_add(other.0))
    }

    /// `price` × `quantity`, exact: both are 64-bit, so the product fits 128 bits.
    pub fn of_line(price: Money, quantity: i64) -> Revenue {
        Revenue(i128::from(price.cents()) * i128::from(quantity))
    }

    /// Divided by `n`, rounded half to even, as averages are reported; zero when `n` is not
    /// positive (an empty window).
    pub fn average(self, n: i64) -> Revenue {
        if n <= 0 {
            return Revenue::ZERO;
        }
        let n = i128::from(n);
        let (q, r) = (self.0.div_euclid(n), self.0.rem_euclid(n));
        let twice = r * 2;
        if twice > n || (twice == n && q % 2 != 0) {
            Revenue(q + 1)
        } else {
            Revenue(q)
        }
    }
}

impl From<Money> for Revenue {
    fn from(m: Money) -> Revenue {
        Revenue(i128::from(m.cents()))
    }
}

impl fmt::Display for Revenue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl FromStr for Revenue {
    type Err = MalformedRevenue;

    /// `1999.99`, `7`, `0.1`, `-3.00` (only a store damaged by the old 64-bit sums holds a
    /// negative one); more than two fractional digits only when the rest are zeros.
    fn from_str(text: &str) -> Result<Revenue, MalformedRevenue> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(frac) {
            return Err(MalformedRevenue);
        }
        let (kept, rest) = frac.split_at(frac.len().min(2));
        if rest.bytes().any(|b| b != b'0') {
            return Err(MalformedRevenue);
        }
        let whole: i128 = whole.parse().map_err(|_| MalformedRevenue)?;
        let mut cents: i128 = if kept.is_empty() {
            0
        } else {
            kept.parse().map_err(|_| MalformedRevenue)?
        };
        if kept.len() == 1 {
            cents *= 10;
        }
        let total = whole
            .checked_mul(100)
            .and_then(|w| w.checked_add(cents))
            .ok_or(MalformedRevenue)?;
        Ok(Revenue(if negative { -total } else { total }))
    }
}

impl Serialize for Revenue {
    /// A JSON number with exactly two decimals, as [`Money`] is written.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = RawValue::from_string(self.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Revenue {
    /// A JSON number or string, exactly (never through a float).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(deserializer)?;
        let text = raw.get().trim();
        let text = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        text.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_ORDER: i64 = i64::MAX;

    #[test]
    fn sums_past_64_bit_cents_stay_exact() {
        let huge = Revenue::from(Money::from_cents(MAX_ORDER).unwrap());
        let two = huge.plus(huge);
        assert_eq!(two.cents(), 2 * i128::from(i64::MAX));
        assert_eq!(two.to_string(), "184467440737095516.14");
        assert_eq!(two.average(2), huge);
        assert_eq!(
            Revenue::of_line(Money::from_cents(MAX_ORDER).unwrap(), i64::MAX).cents(),
            i128::from(i64::MAX) * i128::from(i64::MAX)
        );
        assert_eq!(
            Revenue::from_cents(i128::MAX).plus(huge).cents(),
            i128::MAX,
            "saturates rather than wraps"
        );
    }

    #[test]
    fn averages_round_half_to_even() {
        assert_eq!(Revenue::from_cents(1_000).average(3).cents(), 333);
        assert_eq!(Revenue::from_cents(3_001).average(2).cents(), 1_500);
        assert_eq!(Revenue::from_cents(3_003).average(2).cents(), 1_502);
        assert_eq!(Revenue::from_cents(5).average(0), Revenue::ZERO);
    }

    #[test]
    fn json_round_trip_keeps_every_cent() {
        let r = Revenue::from_cents(18_000_000_000_000_000_001);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "180000000000000000.01");
        assert_eq!(serde_json::from_str::<Revenue>(&json).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Revenue>(r#""7.5""#).unwrap().cents(),
            750
        );
        assert_eq!(Revenue::from_cents(-150).to_string(), "-1.50");
        assert_eq!("-1.50".parse::<Revenue>().unwrap().cents(), -150);
        assert_eq!("1.500".parse::<Revenue>().unwrap().cents(), 150);
        for bad in ["", "1.234", "1e3", "abc", ".5", "1.-5"] {
            assert_eq!(bad.parse::<Revenue>(), Err(MalformedRevenue), "{bad}");
        }
    }
}
