//! Ed25519 keys for the tokens Mercato signs itself: loaded from PEM (settings or files) or
//! generated and kept under the data dir, named by their RFC 7638 thumbprint (`kid`), published
//! as JWKs, and rotated so a retired key stays valid until the last token it signed expires.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::spki::EncodePublicKey as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not an Ed25519 private key in PKCS#8 PEM form")]
    NotAPrivateKey { what: String },
    #[error("{what} is not an Ed25519 public key in SPKI PEM form")]
    NotAPublicKey { what: String },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the system's random source failed: {0}")]
    Random(String),
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("a signed token is not a valid header value")]
    Unprintable,
}

/// An Ed25519 public key with its `kid`.
#[derive(Clone)]
pub struct PublicKey {
    kid: String,
    /// The raw 32 bytes, base64url: the JWK's `x`.
    x: String,
    decoding: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey").field("kid", &self.kid).finish()
    }
}

impl PublicKey {
    fn from_dalek(key: &ed25519_dalek::VerifyingKey) -> PublicKey {
        let x = URL_SAFE_NO_PAD.encode(key.as_bytes());
        // RFC 7638: the SHA-256 of the required members, in lexicographic order, no spaces.
        let thumbprint = Sha256::digest(format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#));
        PublicKey {
            kid: URL_SAFE_NO_PAD.encode(thumbprint),
            decoding: DecodingKey::from_ed_der(key.as_bytes()),
            x,
        }
    }

    /// An SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as `openssl pkey -pubout` writes it.
    pub fn from_pem(pem: &str, what: &str) -> Result<PublicKey, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_public_key_pem(pem.trim()).map_err(|_| {
            KeyError::NotAPublicKey {
                what: what.to_owned(),
            }
        })?;
        Ok(PublicKey::from_dalek(&key))
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }

    /// The key as a JWK (RFC 8037), for `/.well-known/jwks.json`.
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.x,
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }
}

/// An Ed25519 private key that signs tokens.
#[derive(Clone)]
pub struct SigningKey {
    dalek: ed25519_dalek::SigningKey,
    encoding: EncodingKey,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    fn from_dalek(dalek: ed25519_dalek::SigningKey) -> Result<SigningKey, KeyError> {
        let der = dalek.to_pkcs8_der().map_err(|_| KeyError::NotAPrivateKey {
            what: "a generated key".into(),
        })?;
        Ok(SigningKey {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            public: PublicKey::from_dalek(&dalek.verifying_key()),
            dalek,
        })
    }

    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        SigningKey::from_dalek(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// A PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as `openssl genpkey -algorithm ed25519`
    /// writes it. `what` names the key's origin in errors (never its content).
    pub fn from_pem(pem: &str, what: &str) -> Result<SigningKey, KeyError> {
        let dalek = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.trim()).map_err(|_| {
            KeyError::NotAPrivateKey {
                what: what.to_owned(),
            }
        })?;
        SigningKey::from_dalek(dalek)
    }

    pub fn from_file(path: &Path) -> Result<SigningKey, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        SigningKey::from_pem(&pem, &path.display().to_string())
    }

    fn to_pem(&self) -> Result<zeroize::Zeroizing<String>, KeyError> {
        self.dalek
            .to_pkcs8_pem(Default::default())
            .map_err(|_| KeyError::NotAPrivateKey {
                what: "a generated key".into(),
            })
    }

    /// The public half as an SPKI PEM, for `auth.previous_public_keys` after a rotation.
    pub fn public_pem(&self) -> Result<String, KeyError> {
        self.dalek
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|_| KeyError::NotAPublicKey {
                what: "a generated key".into(),
            })
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn kid(&self) -> &str {
        &self.public.kid
    }

    /// A JWS compact token of `claims`, `alg: EdDSA`, this key's `kid`, and `typ`.
    pub fn sign<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, KeyError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.public.kid.clone());
        header.typ = Some(typ.to_owned());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }
}

/// The keys of one issuer: the current signing key and earlier ones still accepted.
#[derive(Debug, Clone)]
pub struct KeyRing {
    pub current: SigningKey,
    pub previous: Vec<PublicKey>,
}

impl KeyRing {
    /// Every public key a token may be verified with, the current one first.
    pub fn public_keys(&self) -> Vec<PublicKey> {
        std::iter::once(self.current.public.clone())
            .chain(self.previous.iter().cloned())
            .collect()
    }

    /// The JWKS document (RFC 7517) of [`KeyRing::public_keys`].
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": self.public_keys().iter().map(PublicKey::jwk).collect::<Vec<_>>()
        })
    }
}

const SIGNING_PREFIX: &str = "signing-";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, key: &SigningKey) -> Result<(), KeyError> {
    use std::io::Write as _;
    let pem = key.to_pem()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(pem.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// The signing keys kept in `dir` as `signing-<created ms>.pem`: the newest signs; an older
/// one is still published until `access_ttl` after the key that replaced it was created (its
/// last token has expired by then), and deleted after that. An empty `dir` gets a new key.
pub fn ring_in_dir(dir: &Path, access_ttl: Duration) -> Result<KeyRing, KeyError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut files = signing_files(dir)?;
    if files.is_empty() {
        rotate_in_dir(dir)?;
        files = signing_files(dir)?;
    }
    // Newest first.
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut files = files.into_iter();
    let Some((_, current_path)) = files.next() else {
        return Err(KeyError::NotAPrivateKey {
            what: dir.display().to_string(),
        });
    };
    let current = SigningKey::from_file(&current_path)?;
    let now = now_ms();
    let mut previous = Vec::new();
    // Each older key was replaced when the key just newer than it was created.
    let mut newer_created = signing_created(&current_path);
    for (created, path) in files {
        let retired_for = newer_created.map(|t| now.saturating_sub(t));
        if retired_for.is_some_and(|ms| ms > access_ttl.as_millis()) {
            // Every token it signed has expired: it is no longer needed anywhere.
            let _ = std::fs::remove_file(&path);
        } else {
            previous.push(SigningKey::from_file(&path)?.public.clone());
        }
        newer_created = Some(created);
    }
    Ok(KeyRing { current, previous })
}

/// Adds a new signing key to `dir`; the ring then signs with it. Returns its `kid`.
pub fn rotate_in_dir(dir: &Path) -> Result<String, KeyError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = SigningKey::generate()?;
    let path = dir.join(format!("{SIGNING_PREFIX}{}.pem", now_ms()));
    write_private(&path, &key)?;
    Ok(key.kid().to_owned())
}

fn signing_created(path: &Path) -> Option<u128> {
    path.file_name()?
        .to_str()?
        .strip_prefix(SIGNING_PREFIX)?
        .strip_suffix(".pem")?
        .parse()
        .ok()
}

fn signing_files(dir: &Path) -> Result<Vec<(u128, PathBuf)>, KeyError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if let Some(created) = signing_created(&path) {
            files.push((created, path));
        }
    }
    Ok(files)
}

/// The key in `path`, created there first if the file does not exist.
pub fn key_in_file(path: &Path) -> Result<SigningKey, KeyError> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let key = SigningKey::generate()?;
        match write_private(path, &key) {
            Ok(()) => return Ok(key),
            // Another process created it first: use theirs.
            Err(KeyError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    SigningKey::from_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_keep_their_kid() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&key.to_pem().unwrap(), "test").unwrap();
        assert_eq!(again.kid(), key.kid());
        let public = PublicKey::from_pem(&key.public_pem().unwrap(), "test").unwrap();
        assert_eq!(public.kid(), key.kid());
        assert_eq!(key.kid().len(), 43, "a base64url SHA-256");
        assert!(SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n", "x").is_err());
        let jwk = key.public().jwk();
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["kid"], key.kid());
    }

    #[test]
    fn a_rotated_key_is_published_until_its_tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(900);
        let first = ring_in_dir(dir.path(), ttl).unwrap();
        assert!(first.previous.is_empty());
        assert_eq!(
            ring_in_dir(dir.path(), ttl).unwrap().current.kid(),
            first.current.kid(),
            "kept across starts"
        );
        std::thread::sleep(Duration::from_millis(2));
        let second = rotate_in_dir(dir.path()).unwrap();
        let ring = ring_in_dir(dir.path(), ttl).unwrap();
        assert_eq!(ring.current.kid(), second);
        assert_eq!(ring.previous.len(), 1);
        assert_eq!(ring.previous[0].kid(), first.current.kid());
        assert_eq!(ring.jwks()["keys"].as_array().unwrap().len(), 2);
        // With a TTL already past, the retired key goes.
        std::thread::sleep(Duration::from_millis(5));
        let ring = ring_in_dir(dir.path(), Duration::from_millis(1)).unwrap();
        assert!(ring.previous.is_empty());
        assert_eq!(signing_files(dir.path()).unwrap().len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.pem");
        let key = key_in_file(&path).unwrap();
        assert_eq!(key_in_file(&path).unwrap().kid(), key.kid());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
