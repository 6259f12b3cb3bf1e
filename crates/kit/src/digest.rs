//! SHA-256 as lowercase hex: what the platform stores in place of a secret or a request it must
//! recognise again but never keep (refresh tokens, idempotency fingerprints).

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

/// The SHA-256 of the concatenated `parts`, as 64 lowercase hex digits after `prefix`.
pub fn sha256_hex_of(prefix: &str, parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = String::with_capacity(prefix.len() + 64);
    out.push_str(prefix);
    for b in hasher.finalize() {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The SHA-256 of `data` as 64 lowercase hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256_hex_of("", &[data])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex_of("sha256:", &[b"a", b"bc"]),
            format!("sha256:{}", sha256_hex(b"abc")),
            "parts hash as their concatenation"
        );
    }
}
