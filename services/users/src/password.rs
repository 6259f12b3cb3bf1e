//! Passwords: what is acceptable (a length floor and ceiling, not on a small list of the most
//! breached ones), and hashing them with argon2id off the async runtime.
//!
//! Hashing is deliberately slow (about 19 MiB and tens of milliseconds per attempt, OWASP's
//! parameters), so it runs on the blocking pool behind a semaphore: a burst of logins queues
//! instead of taking every core and all memory. A sign-in for an e-mail nobody has still
//! checks a hash (a fixed dummy one), so the answer takes as long as for a real account.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// NIST SP 800-63B's floor for user-chosen passwords is 8; the ceiling bounds hashing work.
pub const MIN_CHARS: usize = 10;
pub const MAX_CHARS: usize = 128;

/// The most common passwords of public breach corpora that meet the length floor (lower case;
/// compared case-insensitively). A full breached-password service is an operator's choice.
const COMMON: &[&str] = &[
    "1234567890",
    "12345678910",
    "0123456789",
    "1111111111",
    "0987654321",
    "1q2w3e4r5t",
    "qwertyuiop",
    "1qaz2wsx3edc",
    "password12",
    "password123",
    "password1234",
    "passw0rd123",
    "iloveyou123",
    "qwerty1234",
    "qwerty12345",
    "qwerty123456",
    "abcdefghij",
    "abc1234567",
    "1234qwerty",
    "letmein123",
    "welcome123",
    "football123",
    "baseball123",
    "dragon1234",
    "monkey1234",
    "sunshine123",
    "princess123",
    "superman123",
    "starwars123",
    "trustno1234",
    "administrator",
    "changeme123",
    "mercato123",
    "mercato1234",
    "1234512345",
    "5555555555",
    "aaaaaaaaaa",
    "asdfghjkl1",
    "zxcvbnm123",
    "india12345",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("password must be {MIN_CHARS} to {MAX_CHARS} characters")]
    Length,
    #[error("this password is among the most commonly breached ones; choose another")]
    Common,
}

/// A password that meets the rules, wiped from memory when dropped.
pub struct Password(Zeroizing<String>);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

impl Password {
    pub fn parse(raw: &str) -> Result<Password, PasswordError> {
        let len = raw.chars().count();
        if !(MIN_CHARS..=MAX_CHARS).contains(&len) {
            return Err(PasswordError::Length);
        }
        let lower = raw.to_lowercase();
        if COMMON.contains(&lower.as_str()) || lower.chars().all(|c| lower.starts_with(c)) {
            return Err(PasswordError::Common);
        }
        Ok(Password(Zeroizing::new(raw.to_owned())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the password hashing pool is gone")]
    Closed,
}

/// Hashes and checks passwords on the blocking pool, a few at a time.
#[derive(Debug, Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// Checked when an e-mail has no account (or no password), to take the same time.
    dummy: Arc<String>,
}

impl Hasher {
    /// `parallel` hashes at once (each takes about 19 MiB); at least one.
    pub fn new(parallel: usize) -> Result<Hasher, HashError> {
        let dummy = hash_now("a password nobody has: timing equaliser")?;
        Ok(Hasher {
            permits: Arc::new(Semaphore::new(parallel.max(1))),
            dummy: Arc::new(dummy),
        })
    }

    /// The PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`) of a new password.
    pub async fn hash(&self, password: Password) -> Result<String, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HashError::Closed)?;
        tokio::task::spawn_blocking(move || hash_now(&password.0))
            .await
            .map_err(|_| HashError::Closed)?
    }

    /// Whether `password` matches `stored`; with no stored hash, a dummy one is checked so
    /// the answer takes as long, and is false.
    pub async fn verify(&self, password: &str, stored: Option<&str>) -> Result<bool, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HashError::Closed)?;
        let known = stored.is_some();
        let hash = stored.unwrap_or(&self.dummy).to_owned();
        let password = Zeroizing::new(password.to_owned());
        let matches = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .map_err(|_| HashError::Closed)?;
        Ok(known && matches)
    }
}

fn hash_now(password: &str) -> Result<String, HashError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| HashError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_need_length_and_must_not_be_common() {
        assert_eq!(Password::parse("short").unwrap_err(), PasswordError::Length);
        assert_eq!(
            Password::parse(&"x".repeat(MAX_CHARS + 1)).unwrap_err(),
            PasswordError::Length
        );
        assert_eq!(
            Password::parse("Password123").unwrap_err(),
            PasswordError::Common
        );
        assert_eq!(
            Password::parse("zzzzzzzzzzzz").unwrap_err(),
            PasswordError::Common
        );
        assert!(Password::parse("correct horse battery").is_ok());
        assert_eq!(
            format!("{:?}", Password::parse("correct horse battery").unwrap()),
            "Password(..)"
        );
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_accounts_never_match() {
        let hasher = Hasher::new(2).unwrap();
        let hash = hasher
            .hash(Password::parse("correct horse battery").unwrap())
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(
            hasher
                .verify("correct horse battery", Some(&hash))
                .await
                .unwrap()
        );
        assert!(
            !hasher
                .verify("wrong horse battery", Some(&hash))
                .await
                .unwrap()
        );
        assert!(!hasher.verify("correct horse battery", None).await.unwrap());
        assert!(
            !hasher
                .verify("a password nobody has: timing equaliser", None)
                .await
                .unwrap(),
            "the dummy hash's own password opens nothing"
        );
    }
}
