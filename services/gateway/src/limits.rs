//! Rate limits at the edge, on `governor`'s GCRA limiters: per client address on every route,
//! per signed-in user on the routes that need sign-in, and per route class for all clients
//! together (signing in, reads, writes). A request over a limit gets 429 problem+json with
//! `Retry-After`, before anything reaches a service; and who the client is, behind trusted
//! proxies, is decided here once.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use kit::Problem;
use kit::config::RateLimitSettings;
use uuid::Uuid;

/// Clients tracked before the ones back to a fresh state are dropped. A client's state is
/// fresh again within its burst (2 s), so what stays is the clients of the last seconds.
const MAX_TRACKED: usize = 100_000;
/// How often (in checks) the tracked clients are looked over.
const PRUNE_EVERY: u64 = 4_096;

/// The class of a route, for the limits all clients share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// Logging in, registering, refreshing: where passwords are guessed.
    SignIn,
    Read,
    Write,
}

/// Who a request is from, as the limits see it: an address (IPv6 by its /64, which one
/// subscriber usually holds whole) or a signed-in user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    Address(IpAddr),
    User(Uuid),
}

fn address_key(ip: IpAddr) -> Client {
    match ip {
        IpAddr::V4(_) => Client::Address(ip),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Client::Address(IpAddr::V4(v4)),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Client::Address(IpAddr::V6(prefix.into()))
            }
        },
    }
}

/// A refused request: how long until it would pass.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    pub retry_after: Duration,
    pub scope: &'static str,
}

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let secs = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        metrics::counter!("gateway_rate_limited_total", "scope" => self.scope).increment(1);
        let mut response = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
        )
        .with_detail(format!(
            "the {} request limit was reached; retry in {secs} s",
            self.scope
        ))
        .into_response();
        if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// Every limit of one gateway process. Replicas each keep their own: the configured figures
/// are per replica.
#[derive(Debug)]
pub struct Limits {
    per_client: Option<DefaultKeyedRateLimiter<Client>>,
    per_user: Option<DefaultKeyedRateLimiter<Client>>,
    sign_in: Option<DefaultDirectRateLimiter>,
    reads: Option<DefaultDirectRateLimiter>,
    writes: Option<DefaultDirectRateLimiter>,
    trusted: Vec<(IpAddr, u8)>,
    checks: AtomicU64,
    clock: DefaultClock,
}

/// A per-second quota with a burst of twice the rate; `None` when 0 (off).
fn quota(per_sec: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(per_sec.saturating_mul(2)).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

#[derive(Debug, thiserror::Error)]
#[error("rate_limit.trusted_proxies: `{0}` is not an address or CIDR such as 10.0.0.0/16")]
pub struct BadProxy(String);

/// Parses `10.0.0.0/16`, `fd00::/8` or a bare address.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), BadProxy> {
    let bad = || BadProxy(text.to_owned());
    let (addr, bits) = match text.split_once('/') {
        Some((addr, bits)) => (addr, Some(bits)),
        None => (text, None),
    };
    let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => b.trim().parse::<u8>().map_err(|_| bad())?,
        None => max,
    };
    if bits > max {
        return Err(bad());
    }
    Ok((addr, bits))
}

fn in_cidr(ip: IpAddr, (net, bits): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The limits' names: the `scope` of a refusal (its problem and `gateway_rate_limited_total`).
const PER_CLIENT: &str = "per-client";
const PER_USER: &str = "per-user";
const SIGN_IN: &str = "sign-in";
const READ: &str = "read";
const WRITE: &str = "write";

impl Limits {
    pub fn new(settings: &RateLimitSettings) -> Result<Limits, BadProxy> {
        // Each limit's refusal counter exists at zero from the start, so `increase()` (the
        // heavy-limiting alert, the dashboard) sees its first refusal.
        for scope in [PER_CLIENT, PER_USER, SIGN_IN, READ, WRITE] {
            metrics::counter!("gateway_rate_limited_total", "scope" => scope).increment(0);
        }
        Ok(Limits {
            per_client: quota(settings.per_address_per_sec).map(RateLimiter::keyed),
            per_user: quota(settings.per_user_per_sec).map(RateLimiter::keyed),
            sign_in: quota(settings.sign_in_per_sec).map(RateLimiter::direct),
            reads: quota(settings.reads_per_sec).map(RateLimiter::direct),
            writes: quota(settings.writes_per_sec).map(RateLimiter::direct),
            trusted: settings
                .trusted_proxies
                .iter()
                .map(|p| parse_cidr(p))
                .collect::<Result<_, _>>()?,
            checks: AtomicU64::new(0),
            clock: DefaultClock::default(),
        })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| in_cidr(ip, *net))
    }

    /// The client's address: the peer, unless the peer is a trusted proxy; then the last
    /// address of `X-Forwarded-For` that is not a trusted proxy (what a client writes in front
    /// of the chain is never believed).
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        let hops: Vec<&str> = headers
            .get_all(crate::proxy::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }

    /// The scheme the client used: what a trusted proxy says, else `http` (the gateway's own
    /// listener speaks plain HTTP).
    pub fn client_scheme(&self, peer: IpAddr, headers: &HeaderMap) -> &'static str {
        let said = headers
            .get(crate::proxy::X_FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        if self.trusts(peer) && said.is_some_and(|s| s.eq_ignore_ascii_case("https")) {
            "https"
        } else {
            "http"
        }
    }

    /// The limits every request meets before its token is looked at: its address, then its
    /// route class for everyone. In that order: a flood its own address's limit refuses must
    /// not spend the budget every other client shares.
    pub fn admit_request(&self, class: RouteClass, client: IpAddr) -> Result<(), Limited> {
        self.check_keyed(&self.per_client, address_key(client), PER_CLIENT)?;
        let shared = match class {
            RouteClass::SignIn => (&self.sign_in, SIGN_IN),
            RouteClass::Read => (&self.reads, READ),
            RouteClass::Write => (&self.writes, WRITE),
        };
        if let (Some(limiter), scope) = shared {
            limiter.check().map_err(|not_until| Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
                scope,
            })?;
        }
        Ok(())
    }

    /// The limit of a signed-in user, once the token said who it is.
    pub fn admit_user(&self, user: Uuid) -> Result<(), Limited> {
        self.check_keyed(&self.per_user, Client::User(user), PER_USER)
    }

    fn check_keyed(
        &self,
        limiter: &Option<DefaultKeyedRateLimiter<Client>>,
        key: Client,
        scope: &'static str,
    ) -> Result<(), Limited> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(PRUNE_EVERY)
        {
            self.prune();
        }
        limiter.check_key(&key).map_err(|not_until| Limited {
            retry_after: not_until.wait_time_from(self.clock.now()),
            scope,
        })
    }

    /// Drops clients whose state is back to fresh.
    fn prune(&self) {
        for limiter in [&self.per_client, &self.per_user].into_iter().flatten() {
            if limiter.len() > MAX_TRACKED {
                limiter.retain_recent();
                limiter.shrink_to_fit();
                if limiter.len() > MAX_TRACKED {
                    tracing::warn!(
                        tracked = limiter.len(),
                        "more clients active within seconds than expected"
                    );
                }
            }
        }
    }

    /// Clients currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        [&self.per_client, &self.per_user]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_address: u32, trusted: &[&str]) -> Limits {
        Limits::new(&RateLimitSettings {
            per_address_per_sec: per_address,
            trusted_proxies: trusted.iter().map(|s| (*s).to_owned()).collect(),
            ..RateLimitSettings::off()
        })
        .unwrap()
    }

    #[test]
    fn a_client_gets_its_burst_then_waits_while_another_is_served() {
        let l = limits(5, &[]);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..10 {
            l.admit_request(RouteClass::Read, a).unwrap();
        }
        let refused = l.admit_request(RouteClass::Read, a).unwrap_err();
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_millis(200));
        l.admit_request(RouteClass::Read, b).unwrap();
    }

    #[test]
    fn a_flood_refused_by_its_address_limit_leaves_the_shared_budget_to_others() {
        // The soak's finding: a flood's refused requests spent the reads budget everyone
        // shares, so well-behaved clients got 429 too.
        let l = Limits::new(&RateLimitSettings {
            per_address_per_sec: 5,
            reads_per_sec: 50,
            ..RateLimitSettings::off()
        })
        .unwrap();
        let flooder: IpAddr = "10.0.0.66".parse().unwrap();
        for _ in 0..1_000 {
            let _ = l.admit_request(RouteClass::Read, flooder);
        }
        for n in 1..=50u8 {
            let neighbour = IpAddr::from([10, 0, 1, n]);
            assert!(
                l.admit_request(RouteClass::Read, neighbour).is_ok(),
                "client {n} refused: the flood took the shared budget"
            );
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64_prefix() {
        let l = limits(1, &[]);
        l.admit_request(RouteClass::Read, "2001:db8::1".parse().unwrap())
            .unwrap();
        l.admit_request(RouteClass::Read, "2001:db8::2".parse().unwrap())
            .unwrap();
        assert!(
            l.admit_request(RouteClass::Read, "2001:db8::ffff".parse().unwrap())
                .is_err()
        );
        l.admit_request(RouteClass::Read, "2001:db8:0:1::1".parse().unwrap())
            .unwrap();
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let l = limits(0, &["10.0.0.0/16", "fd00::/8"]);
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 203.0.113.7, 10.0.3.3"),
        );
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let proxy: IpAddr = "10.0.1.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        // Through the load balancer: the last address before the trusted hops; what the client
        // wrote in front (1.2.3.4) is not believed.
        assert_eq!(
            l.client_address(proxy, &headers),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(l.client_scheme(proxy, &headers), "https");
        // From anyone else, the header is the client's own claim.
        assert_eq!(l.client_address(stranger, &headers), stranger);
        assert_eq!(l.client_scheme(stranger, &headers), "http");
        // Garbage in the chain stops the walk at the last good address.
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("not-an-ip, 10.0.2.2"),
        );
        assert_eq!(
            l.client_address(proxy, &headers),
            "10.0.2.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn proxies_must_be_addresses_or_cidrs() {
        for bad in ["10.0.0.0/33", "example.com", "fd00::/129", "10.0.0.0/x"] {
            assert!(
                Limits::new(&RateLimitSettings {
                    trusted_proxies: vec![bad.to_owned()],
                    ..RateLimitSettings::off()
                })
                .is_err(),
                "{bad}"
            );
        }
        assert!(in_cidr(
            "10.1.2.3".parse().unwrap(),
            parse_cidr("10.0.0.0/8").unwrap()
        ));
        assert!(!in_cidr(
            "11.1.2.3".parse().unwrap(),
            parse_cidr("10.0.0.0/8").unwrap()
        ));
        assert!(in_cidr(
            "9.9.9.9".parse().unwrap(),
            parse_cidr("0.0.0.0/0").unwrap()
        ));
    }

    #[test]
    fn tracked_clients_stay_bounded() {
        let l = limits(1_000, &[]);
        for i in 0..(MAX_TRACKED as u32 + 2 * PRUNE_EVERY as u32) {
            let _ = l.admit_request(RouteClass::Read, IpAddr::V4(i.into()));
        }
        assert!(
            l.tracked() <= MAX_TRACKED + PRUNE_EVERY as usize,
            "{}",
            l.tracked()
        );
    }
}
