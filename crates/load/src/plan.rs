//! What a load run does: which journeys in which mix, the think times between steps, the
//! arrival model (an open rate or a fixed number of users), how long, and which faults to
//! switch on when. Read from a TOML file (`--plan`), then overridden by flags.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::LoadError;

/// A user journey: the steps one visitor (or operator) takes, with think times between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Journey {
    /// The catalog, a product page and a search.
    Browse,
    /// A new customer registers, signs in and reads their profile.
    Register,
    /// A product page, an order and a payment with a card that succeeds.
    Buy,
    /// An order paid with a card the provider declines (the order is cancelled).
    Declined,
    /// An order whose payment meets an unreachable provider, then succeeds on retry.
    NetworkFailure,
    /// An order the customer cancels before paying.
    Cancel,
    /// An order left unpaid until it expires.
    Abandon,
    /// An operator ships a paid order, then marks it delivered.
    Fulfil,
    /// An operator refunds a paid order in full.
    Refund,
    /// One order creation and nothing else (the benchmark's journey).
    Order,
}

impl Journey {
    pub const ALL: [Journey; 10] = [
        Journey::Browse,
        Journey::Register,
        Journey::Buy,
        Journey::Declined,
        Journey::NetworkFailure,
        Journey::Cancel,
        Journey::Abandon,
        Journey::Fulfil,
        Journey::Refund,
        Journey::Order,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Journey::Browse => "browse",
            Journey::Register => "register",
            Journey::Buy => "buy",
            Journey::Declined => "declined",
            Journey::NetworkFailure => "network-failure",
            Journey::Cancel => "cancel",
            Journey::Abandon => "abandon",
            Journey::Fulfil => "fulfil",
            Journey::Refund => "refund",
            Journey::Order => "order",
        }
    }
}

impl FromStr for Journey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Journey::ALL
            .into_iter()
            .find(|j| j.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Journey::ALL.iter().map(|j| j.as_str()).collect();
                format!("unknown journey `{s}` (known: {})", names.join(", "))
            })
    }
}

/// The default mix: mostly browsing, a quarter buying, every failure path a little.
pub fn default_mix() -> BTreeMap<Journey, u32> {
    BTreeMap::from([
        (Journey::Browse, 40),
        (Journey::Register, 4),
        (Journey::Buy, 25),
        (Journey::Declined, 5),
        (Journey::NetworkFailure, 5),
        (Journey::Cancel, 5),
        (Journey::Abandon, 6),
        (Journey::Fulfil, 6),
        (Journey::Refund, 4),
    ])
}

/// A duration written as `250ms`, `10s`, `2m` or `1h` (a bare number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{s}` is not a duration such as 500ms, 10s or 2m"))?;
        let seconds = match unit.trim() {
            "ms" => value / 1000.0,
            "" | "s" => value,
            "m" | "min" => value * 60.0,
            "h" => value * 3600.0,
            other => return Err(format!("unknown unit `{other}` in `{s}` (ms, s, m or h)")),
        };
        if !(0.0..=7.0 * 86400.0).contains(&seconds) {
            return Err(format!("`{s}` is out of range (0 to 7 days)"));
        }
        Ok(Span(Duration::from_secs_f64(seconds)))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// Arrivals per second, written `500/s`, `30/m` or `20` (per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (number, per) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
        let value: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a rate such as 500/s or 30/m"))?;
        let per_second = match per.trim() {
            "s" => value,
            "m" | "min" => value / 60.0,
            other => return Err(format!("unknown rate unit `/{other}` in `{s}` (/s or /m)")),
        };
        if !(per_second > 0.0 && per_second <= 100_000.0) {
            return Err(format!("`{s}` is out of range (above 0, at most 100000/s)"));
        }
        Ok(Rate(per_second))
    }
}

/// A think time: a fixed pause (`1s`) or a uniformly drawn one (`200ms..2s`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Think {
    pub min: Duration,
    pub max: Duration,
}

impl Think {
    pub const NONE: Think = Think {
        min: Duration::ZERO,
        max: Duration::ZERO,
    };

    pub fn draw(&self) -> Duration {
        if self.max <= self.min {
            return self.min;
        }
        let spread = (self.max - self.min).as_micros() as u64;
        self.min + Duration::from_micros(fastrand::u64(0..=spread))
    }
}

impl FromStr for Think {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (a.parse::<Span>()?.0, b.parse::<Span>()?.0),
            None => {
                let d = s.parse::<Span>()?.0;
                (d, d)
            }
        };
        if max < min || max > Duration::from_secs(600) {
            return Err(format!(
                "think time `{s}`: the upper bound must be at least the lower and at most 10m"
            ));
        }
        Ok(Think { min, max })
    }
}

/// What to switch on during a run: `name[:key=value,...][@offset]`, for example
/// `payment-timeout:rate=0.2` (the whole run) or `stream-publish:seconds=10@25s` (25 s in).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultSpec {
    pub name: String,
    pub params: serde_json::Map<String, serde_json::Value>,
    /// How long after the start it is switched on.
    #[serde(serialize_with = "as_seconds")]
    pub at: Duration,
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl FromStr for FaultSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, at) = match s.rsplit_once('@') {
            Some((rest, at)) => (rest, at.parse::<Span>()?.0),
            None => (s, Duration::ZERO),
        };
        let (name, params_text) = rest.split_once(':').unwrap_or((rest, ""));
        let name = name.trim();
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            return Err(format!(
                "fault `{s}`: expected name[:key=value,...][@offset], such as payment-timeout:rate=0.2"
            ));
        }
        let mut params = serde_json::Map::new();
        for pair in params_text.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("fault `{s}`: parameter `{pair}` is not key=value"))?;
            // Numbers stay numbers (rate=0.2, seconds=10); anything else is text (service=orders).
            let value = serde_json::from_str::<serde_json::Number>(value.trim())
                .map(serde_json::Value::Number)
                .unwrap_or_else(|_| serde_json::Value::String(value.trim().to_owned()));
            params.insert(key.trim().to_owned(), value);
        }
        Ok(FaultSpec {
            name: name.to_owned(),
            params,
            at,
        })
    }
}

/// How visitors arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Open model: a new journey starts every 1/rate seconds whatever the server is doing,
    /// so a stalled server meets a queue, as it would in production.
    Rate(Rate),
    /// Closed model: this many users, each starting a new journey after the last one ends.
    Users(u32),
}

impl fmt::Display for Arrivals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arrivals::Rate(r) => write!(f, "open model, {} journeys/s", r.0),
            Arrivals::Users(n) => write!(f, "closed model, {n} users"),
        }
    }
}

/// A whole run, after the file and the flags are merged.
#[derive(Debug, Clone)]
pub struct Plan {
    pub duration: Duration,
    pub arrivals: Arrivals,
    pub think: Think,
    pub mix: BTreeMap<Journey, u32>,
    /// Customers registered before the run, whose journeys share them.
    pub customers: u32,
    /// Products created for the run (the verifier knows their initial stock).
    pub products: u32,
    pub stock: u64,
    pub faults: Vec<FaultSpec>,
    /// Journeys in flight at most; an arrival beyond it is counted as `client-saturated`.
    pub max_in_flight: usize,
    pub timeout: Duration,
}

impl Plan {
    /// The journey for a draw in `0..total_weight`.
    pub fn pick(&self, mut draw: u32) -> Journey {
        for (journey, weight) in &self.mix {
            if draw < *weight {
                return *journey;
            }
            draw -= weight;
        }
        Journey::Browse
    }

    pub fn total_weight(&self) -> u32 {
        self.mix.values().sum()
    }
}

/// The plan file: every field optional, flags win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    pub duration: Option<String>,
    pub rate: Option<String>,
    pub users: Option<u32>,
    pub think: Option<String>,
    pub customers: Option<u32>,
    pub products: Option<u32>,
    pub stock: Option<u64>,
    pub max_in_flight: Option<usize>,
    pub timeout: Option<String>,
    pub mix: Option<BTreeMap<String, u32>>,
    #[serde(default)]
    pub faults: Vec<String>,
}

impl PlanFile {
    pub fn read(path: &std::path::Path) -> Result<PlanFile, LoadError> {
        use figment::Figment;
        use figment::providers::{Format as _, Toml};
        Figment::from(Toml::file_exact(path))
            .extract()
            .map_err(|e| LoadError::Plan(format!("plan file {}: {e}", path.display())))
    }
}

/// `browse=40,buy=25`: a mix from flags.
pub fn parse_mix(text: &str) -> Result<BTreeMap<Journey, u32>, String> {
    let mut mix = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, weight) = pair.split_once('=').unwrap_or((pair, "1"));
        let journey: Journey = name.trim().parse()?;
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| format!("weight of `{}` must be a whole number", name.trim()))?;
        mix.insert(journey, weight);
    }
    check_mix(mix)
}

pub fn check_mix(mix: BTreeMap<Journey, u32>) -> Result<BTreeMap<Journey, u32>, String> {
    let total: u64 = mix.values().map(|w| u64::from(*w)).sum();
    if total == 0 || total > 1_000_000 {
        return Err(
            "the mix needs at least one journey with a weight above 0 (at most 1000000 in all)"
                .into(),
        );
    }
    Ok(mix.into_iter().filter(|(_, w)| *w > 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_rates_and_think_times_parse_or_say_why() {
        assert_eq!(
            "250ms".parse::<Span>().map(|s| s.0),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            "2m".parse::<Span>().map(|s| s.0),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(
            "10".parse::<Span>().map(|s| s.0),
            Ok(Duration::from_secs(10))
        );
        assert!("ten".parse::<Span>().is_err());
        assert!("10y".parse::<Span>().is_err());
        assert!("-1s".parse::<Span>().is_err());
        assert_eq!("500/s".parse::<Rate>(), Ok(Rate(500.0)));
        assert_eq!("30/m".parse::<Rate>(), Ok(Rate(0.5)));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("1e9/s".parse::<Rate>().is_err());
        let think: Think = "200ms..1s".parse().unwrap();
        for _ in 0..100 {
            let d = think.draw();
            assert!(d >= Duration::from_millis(200) && d <= Duration::from_secs(1));
        }
        assert!("2s..1s".parse::<Think>().is_err());
    }

    #[test]
    fn faults_name_params_and_offset() {
        let f: FaultSpec = "stream-publish:seconds=10@25s".parse().unwrap();
        assert_eq!(f.name, "stream-publish");
        assert_eq!(f.params["seconds"], serde_json::json!(10));
        assert_eq!(f.at, Duration::from_secs(25));
        let f: FaultSpec = "route-latency:service=orders,ms=50".parse().unwrap();
        assert_eq!(f.params["service"], serde_json::json!("orders"));
        assert_eq!(f.at, Duration::ZERO);
        assert!("Payment Timeout".parse::<FaultSpec>().is_err());
        assert!("payment-timeout:rate".parse::<FaultSpec>().is_err());
    }

    #[test]
    fn the_documented_drill_plan_reads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/drill.toml");
        let file = PlanFile::read(&path).unwrap();
        assert_eq!(file.rate.as_deref(), Some("8/s"));
        assert_eq!(file.faults.len(), 2);
        for fault in &file.faults {
            fault.parse::<FaultSpec>().unwrap();
        }
        for name in file.mix.unwrap().keys() {
            name.parse::<Journey>().unwrap();
        }
    }

    #[test]
    fn mixes_pick_by_weight() {
        let mix = parse_mix("browse=1,buy=3").unwrap();
        let plan = Plan {
            duration: Duration::from_secs(1),
            arrivals: Arrivals::Users(1),
            think: Think::NONE,
            mix,
            customers: 1,
            products: 1,
            stock: 1,
            faults: vec![],
            max_in_flight: 1,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(plan.total_weight(), 4);
        assert_eq!(plan.pick(0), Journey::Browse);
        assert_eq!(plan.pick(1), Journey::Buy);
        assert_eq!(plan.pick(3), Journey::Buy);
        assert!(parse_mix("browse=0").is_err());
        assert!(parse_mix("dance=1").is_err());
    }
}
