//! Slowing down password guessing: failed sign-ins are counted per account and per client
//! address over a window; past the limit, further attempts are refused with 429 and
//! `Retry-After` until the window since the first failure ends. A success clears the
//! account's count (not the client's: one valid account must not launder a guessing run).
//!
//! In memory, per users-service instance: with N replicas an attacker gets N times the
//! budget, which still bounds guessing to a few dozen tries per window. Written here because
//! a counter map with a window is smaller than any rate-limiting crate's setup for it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept per map at most; past it, expired ones are dropped, then the map starts over
/// (an attacker spraying addresses cannot grow memory without bound).
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug)]
pub struct LoginThrottle {
    window: Duration,
    account_limit: u32,
    client_limit: u32,
    accounts: Mutex<HashMap<String, (u32, Instant)>>,
    clients: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginThrottle {
    pub fn new(account_limit: u32, client_limit: u32, window: Duration) -> LoginThrottle {
        LoginThrottle {
            window,
            account_limit: account_limit.max(1),
            client_limit: client_limit.max(1),
            accounts: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when this account or this client has failed too often.
    pub fn check(&self, account: &str, client: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let wait = |map: &Mutex<HashMap<String, (u32, Instant)>>, key: &str, limit: u32| {
            let map = map.lock().ok()?;
            let (failures, since) = map.get(key)?;
            let elapsed = now.duration_since(*since);
            (*failures >= limit && elapsed < self.window).then(|| self.window - elapsed)
        };
        match (
            wait(&self.accounts, account, self.account_limit),
            wait(&self.clients, client, self.client_limit),
        ) {
            (None, None) => Ok(()),
            (a, c) => Err(a.max(c).unwrap_or(self.window)),
        }
    }

    pub fn failed(&self, account: &str, client: &str) {
        let now = Instant::now();
        for (map, key) in [(&self.accounts, account), (&self.clients, client)] {
            let Ok(mut map) = map.lock() else { continue };
            if map.len() >= MAX_ENTRIES {
                map.retain(|_, (_, since)| now.duration_since(*since) < self.window);
                if map.len() >= MAX_ENTRIES {
                    map.clear();
                }
            }
            let entry = map.entry(key.to_owned()).or_insert((0, now));
            if now.duration_since(entry.1) >= self.window {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
    }

    pub fn succeeded(&self, account: &str) {
        if let Ok(mut map) = self.accounts.lock() {
            map.remove(account);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_slowed_after_its_limit_and_a_success_clears_it() {
        let t = LoginThrottle::new(3, 10, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(t.check("ada", "10.0.0.1").is_ok());
            t.failed("ada", "10.0.0.1");
        }
        let wait = t.check("ada", "10.0.0.2").unwrap_err();
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        assert!(
            t.check("bob", "10.0.0.2").is_ok(),
            "other accounts unaffected"
        );
        t.succeeded("ada");
        assert!(t.check("ada", "10.0.0.2").is_ok());
    }

    #[test]
    fn a_client_is_slowed_whatever_accounts_it_tries() {
        let t = LoginThrottle::new(100, 4, Duration::from_secs(60));
        for i in 0..4 {
            t.failed(&format!("user{i}"), "10.0.0.9");
        }
        assert!(t.check("someone-new", "10.0.0.9").is_err());
        assert!(t.check("someone-new", "10.0.0.8").is_ok());
    }

    #[test]
    fn the_window_expires() {
        let t = LoginThrottle::new(1, 1, Duration::from_millis(1));
        t.failed("ada", "x");
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.check("ada", "x").is_ok());
    }
}
