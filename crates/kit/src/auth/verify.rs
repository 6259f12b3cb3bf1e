//! Verifying access tokens: Mercato's own (EdDSA, keys in process or from a JWKS URL) and
//! those of configured OpenID Connect providers (RS256/ES256/EdDSA, keys from their JWKS).
//!
//! The issuer is chosen by the token's `iss`, the key by its `kid` within that issuer's keys,
//! and the algorithm by the key, never by the token: `alg: none`, an HMAC token "signed" with
//! a public key, or an RSA token for an Ed25519 key are all refused. A token that verified
//! once is remembered until it expires, so the hot path (one client, many requests) costs a
//! hash lookup instead of a signature check.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::caller::{Caller, Role};
use super::keys::PublicKey;
use crate::config::ExternalIssuer;

/// Why a token was refused. Only logged (at debug): the client is told 401 and nothing more.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed or has no kid: {0}")]
    Malformed(String),
    #[error("the token's issuer is not trusted")]
    UnknownIssuer,
    #[error("no key {0} for this issuer")]
    UnknownKey(String),
    #[error("the token did not verify: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("the token's subject or roles are unusable: {0}")]
    Claims(&'static str),
    #[error("the issuer's keys could not be fetched: {0}")]
    KeysUnavailable(String),
}

/// Namespace of user ids for external subjects that are not UUIDs (UUIDv5 of `iss|sub`).
const EXTERNAL_SUBJECTS: Uuid = Uuid::from_u128(0x6d65_7263_6174_6f00_0000_0000_0000_0003);
/// Clock skew tolerated on `exp`/`nbf`.
const LEEWAY_SECS: u64 = 30;
/// A JWKS is fetched again for an unknown `kid` at most this often (a flood of tokens with
/// made-up kids must not become a flood of requests to the provider).
const REFETCH_AFTER: Duration = Duration::from_secs(10);
/// Verified tokens remembered; past this the memory starts over.
const CACHE_CAPACITY: usize = 20_000;

/// Where an issuer's keys come from.
enum KeySource {
    /// In this process (the issuer's own key ring).
    Local(HashMap<String, (DecodingKey, Algorithm)>),
    /// A JWKS document, fetched when a token names a key not seen yet.
    Remote(RemoteKeys),
}

struct RemoteKeys {
    url: String,
    http: reqwest::Client,
    keys: RwLock<Arc<HashMap<String, (DecodingKey, Algorithm)>>>,
    /// When the JWKS was last asked for; held across the fetch, so requests that arrive
    /// while it runs wait for its keys instead of finding none (a cold replica's first burst).
    fetched: tokio::sync::Mutex<Option<Instant>>,
}

impl RemoteKeys {
    fn find(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        let keys = self.keys.read().ok()?.clone();
        keys.get(kid).cloned()
    }

    /// Fetches the JWKS again unless that was done less than [`REFETCH_AFTER`] ago; a caller
    /// that finds a fetch under way waits for it, then looks for its key again.
    async fn refresh(&self) -> Result<(), TokenError> {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < REFETCH_AFTER) {
            return Ok(());
        }
        *fetched = Some(Instant::now());
        let set: JwkSet = self
            .http
            .get(&self.url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| TokenError::KeysUnavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| TokenError::KeysUnavailable(e.to_string()))?;
        let keys: HashMap<_, _> = set.keys.iter().filter_map(usable_key).collect();
        tracing::info!(url = %self.url, keys = keys.len(), "fetched signing keys");
        if let Ok(mut current) = self.keys.write() {
            *current = Arc::new(keys);
        }
        Ok(())
    }
}

/// A JWK with its id and the one algorithm it verifies. Symmetric (`oct`) keys and keys
/// whose declared algorithm does not fit their type are skipped.
fn usable_key(jwk: &Jwk) -> Option<(String, (DecodingKey, Algorithm))> {
    let kid = jwk.common.key_id.clone()?;
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let algorithm = match jwk.common.key_algorithm {
        None => implied,
        Some(declared) => {
            let declared: Algorithm = declared.to_string().parse().ok()?;
            (declared.family() == implied.family()).then_some(declared)?
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, (key, algorithm)))
}

/// One trusted issuer and how its claims map to a [`Caller`].
struct Issuer {
    iss: String,
    audience: String,
    audience_claim: String,
    roles_claim: String,
    admin_roles: Vec<String>,
    /// Mercato's own: `sub` must be a user id and roles are Mercato's.
    own: bool,
    keys: KeySource,
}

impl Issuer {
    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), TokenError> {
        match &self.keys {
            KeySource::Local(keys) => keys.get(kid).cloned(),
            KeySource::Remote(remote) => match remote.find(kid) {
                Some(key) => Some(key),
                None => {
                    remote.refresh().await?;
                    remote.find(kid)
                }
            },
        }
        .ok_or_else(|| TokenError::UnknownKey(kid.to_owned()))
    }

    fn caller(&self, claims: &Map<String, Value>) -> Result<Caller, TokenError> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or(TokenError::Claims("no sub"))?;
        let roles: Vec<&str> = match claims.get(&self.roles_claim) {
            Some(Value::Array(values)) => values.iter().filter_map(Value::as_str).collect(),
            // Some providers put groups in one space- or comma-separated string.
            Some(Value::String(text)) => text.split([' ', ',']).filter(|s| !s.is_empty()).collect(),
            _ => Vec::new(),
        };
        let admin = roles
            .iter()
            .any(|r| self.admin_roles.iter().any(|a| a == r));
        let role = if admin { Role::Admin } else { Role::Customer };
        let id = match Uuid::parse_str(sub) {
            Ok(id) => id,
            Err(_) if !self.own => {
                Uuid::new_v5(&EXTERNAL_SUBJECTS, format!("{}|{sub}", self.iss).as_bytes())
            }
            Err(_) => return Err(TokenError::Claims("sub is not a user id")),
        };
        Ok(Caller::user(id, role))
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.leeway = LEEWAY_SECS;
        v.set_issuer(&[&self.iss]);
        if self.audience_claim == "aud" {
            v.set_audience(&[&self.audience]);
            v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        } else {
            // Checked by hand below (Cognito access tokens carry `client_id`, not `aud`).
            v.validate_aud = false;
            v.set_required_spec_claims(&["exp", "iss", "sub"]);
        }
        v
    }
}

/// Verified tokens and when each expires (seconds since the epoch).
#[derive(Default)]
struct Verified(RwLock<HashMap<String, (Caller, u64)>>);

impl Verified {
    fn get(&self, token: &str, now: u64) -> Option<Caller> {
        let map = self.0.read().ok()?;
        let (caller, exp) = map.get(token)?;
        (now < *exp).then(|| caller.clone())
    }

    fn put(&self, token: &str, caller: &Caller, exp: u64) {
        if let Ok(mut map) = self.0.write() {
            if map.len() >= CACHE_CAPACITY {
                map.clear();
            }
            map.insert(token.to_owned(), (caller.clone(), exp));
        }
    }
}

/// Checks access tokens against every trusted issuer.
pub struct Verifier {
    issuers: Vec<Issuer>,
    verified: Verified,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &i.iss).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Where Mercato's own public keys are.
pub enum OwnKeys {
    Local(Vec<PublicKey>),
    /// A JWKS URL (the users service's `/.well-known/jwks.json`).
    Remote(String),
}

impl Verifier {
    pub fn new(
        own_issuer: &str,
        own_audience: &str,
        own_keys: OwnKeys,
        external: &[ExternalIssuer],
        http: reqwest::Client,
    ) -> Verifier {
        let remote = |url: &str| {
            KeySource::Remote(RemoteKeys {
                url: url.to_owned(),
                http: http.clone(),
                keys: RwLock::new(Arc::new(HashMap::new())),
                fetched: tokio::sync::Mutex::new(None),
            })
        };
        let own_keys = match own_keys {
            OwnKeys::Local(keys) => KeySource::Local(
                keys.into_iter()
                    .map(|k| {
                        (
                            k.kid().to_owned(),
                            (k.decoding_key().clone(), Algorithm::EdDSA),
                        )
                    })
                    .collect(),
            ),
            OwnKeys::Remote(url) => remote(&url),
        };
        let mut issuers = vec![Issuer {
            iss: own_issuer.to_owned(),
            audience: own_audience.to_owned(),
            audience_claim: "aud".into(),
            roles_claim: "roles".into(),
            admin_roles: vec![Role::Admin.as_str().to_owned()],
            own: true,
            keys: own_keys,
        }];
        issuers.extend(external.iter().map(|e| Issuer {
            iss: e.issuer.clone(),
            audience: e.audience.clone(),
            audience_claim: e.audience_claim.clone(),
            roles_claim: e.roles_claim.clone(),
            admin_roles: e.admin_roles.clone(),
            own: false,
            keys: remote(&e.jwks_url),
        }));
        Verifier {
            issuers,
            verified: Verified::default(),
        }
    }

    /// The caller a bearer token names, if it verifies.
    pub async fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(caller) = self.verified.get(token, now) {
            return Ok(caller);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Malformed("no kid".into()))?;
        // Only to choose the issuer: nothing is trusted before the signature is checked.
        let unverified: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let iss = unverified.get("iss").and_then(Value::as_str);
        let issuer = self
            .issuers
            .iter()
            .find(|i| Some(i.iss.as_str()) == iss)
            .ok_or(TokenError::UnknownIssuer)?;
        let (key, algorithm) = issuer.key(&kid).await?;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &issuer.validation(algorithm))?;
        let claims = data.claims;
        if issuer.audience_claim != "aud"
            && claims.get(&issuer.audience_claim).and_then(Value::as_str)
                != Some(issuer.audience.as_str())
        {
            return Err(TokenError::Claims("wrong audience"));
        }
        let caller = issuer.caller(&claims)?;
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(now);
        self.verified.put(token, &caller, exp);
        Ok(caller)
    }
}
