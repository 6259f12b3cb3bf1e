//! Service-to-service credentials for `/internal/*` routes: short-lived tokens signed with a
//! key only the services hold (not the users' signing key, and never the gateway's), naming
//! the calling service. A caller reuses its token until a minute before it expires; a callee
//! checks it against the one service key, with EdDSA pinned.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};

use super::keys::{KeyError, SigningKey};
use super::verify::TokenError;

/// `iss` and `aud` of service tokens: never those of user tokens, so neither kind passes
/// for the other even if a key were shared by mistake.
const SERVICE_ISSUER: &str = "mercato-services";
const SERVICE_AUDIENCE: &str = "mercato-internal";
const LIFETIME_SECS: u64 = 300;
const RENEW_BEFORE_SECS: u64 = 60;

#[derive(Debug, Serialize, Deserialize)]
struct ServiceClaims {
    iss: String,
    aud: String,
    /// `service:<name>`.
    sub: String,
    iat: u64,
    exp: u64,
}

/// The service key: signs this process's outbound internal calls, verifies inbound ones.
#[derive(Debug)]
pub struct ServiceKey {
    key: SigningKey,
    validation: Validation,
    /// Tokens minted per calling service, as `Authorization` values, with their expiry.
    minted: Mutex<Vec<(&'static str, http::HeaderValue, u64)>>,
    /// Tokens verified, with the caller they name and their expiry: a caller reuses its token
    /// for minutes, so the hot path is a lookup, not a signature check per internal call.
    verified: RwLock<HashMap<String, (String, u64)>>,
}

/// Verified service tokens remembered at most (a handful of callers in practice).
const VERIFIED_CAPACITY: usize = 1024;

impl ServiceKey {
    pub fn new(key: SigningKey) -> ServiceKey {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 30;
        validation.set_issuer(&[SERVICE_ISSUER]);
        validation.set_audience(&[SERVICE_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        ServiceKey {
            key,
            validation,
            minted: Mutex::new(Vec::new()),
            verified: RwLock::new(HashMap::new()),
        }
    }

    /// A token for `caller`'s calls, reused while it has more than a minute left.
    pub fn token_for(&self, caller: &'static str) -> Result<String, KeyError> {
        let value = self.authorization_for(caller)?;
        let header = value.to_str().map_err(|_| KeyError::Unprintable)?;
        Ok(header.strip_prefix("Bearer ").unwrap_or(header).to_owned())
    }

    /// `Bearer <token for caller>`, the `Authorization` value of `caller`'s calls: made once a
    /// token, so a call costs a lookup and a reference count, not a copy and a format.
    pub fn authorization_for(&self, caller: &'static str) -> Result<http::HeaderValue, KeyError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Ok(minted) = self.minted.lock()
            && let Some((_, value, _)) = minted
                .iter()
                .find(|(c, _, exp)| *c == caller && *exp > now + RENEW_BEFORE_SECS)
        {
            return Ok(value.clone());
        }
        let exp = now + LIFETIME_SECS;
        let token = self.key.sign(
            "JWT",
            &ServiceClaims {
                iss: SERVICE_ISSUER.into(),
                aud: SERVICE_AUDIENCE.into(),
                sub: format!("service:{caller}"),
                iat: now,
                exp,
            },
        )?;
        let mut value = http::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| KeyError::Unprintable)?;
        // Kept out of `Debug` output (and of HTTP/2 header compression tables).
        value.set_sensitive(true);
        if let Ok(mut minted) = self.minted.lock() {
            minted.retain(|(c, _, _)| *c != caller);
            minted.push((caller, value.clone(), exp));
        }
        Ok(value)
    }

    /// The calling service's name, if `token` is a valid service token.
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Ok(verified) = self.verified.read()
            && let Some((caller, exp)) = verified.get(token)
            && now < *exp
        {
            return Ok(caller.clone());
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.kid.as_deref() != Some(self.key.kid()) {
            return Err(TokenError::UnknownKey(header.kid.unwrap_or_default()));
        }
        let data = jsonwebtoken::decode::<ServiceClaims>(
            token,
            self.key.public().decoding_key(),
            &self.validation,
        )?;
        let caller = data
            .claims
            .sub
            .strip_prefix("service:")
            .map(str::to_owned)
            .ok_or(TokenError::Claims("not a service subject"))?;
        if let Ok(mut verified) = self.verified.write() {
            if verified.len() >= VERIFIED_CAPACITY {
                verified.retain(|_, (_, exp)| *exp > now);
                if verified.len() >= VERIFIED_CAPACITY {
                    verified.clear();
                }
            }
            verified.insert(token.to_owned(), (caller.clone(), data.claims.exp));
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_tokens_verify_with_their_key_only() {
        let services = ServiceKey::new(SigningKey::generate().unwrap());
        let token = services.token_for("orders").unwrap();
        assert_eq!(services.verify(&token).unwrap(), "orders");
        assert_eq!(services.token_for("orders").unwrap(), token, "reused");
        assert_ne!(services.token_for("payments").unwrap(), token);
        let other = ServiceKey::new(SigningKey::generate().unwrap());
        assert!(other.verify(&token).is_err());
        let mut tampered = token.clone();
        tampered.insert(token.len() - 2, 'A');
        assert!(services.verify(&tampered).is_err());
    }

    #[test]
    fn the_authorization_value_carries_the_token_and_stays_out_of_debug_output() {
        let services = ServiceKey::new(SigningKey::generate().unwrap());
        let value = services.authorization_for("orders").unwrap();
        let token = services.token_for("orders").unwrap();
        assert_eq!(value.to_str().unwrap(), format!("Bearer {token}"));
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains(&token));
    }
}
