//! SHA-256 as lowercase hex: what the platform stores in place of a secret or a request it must
//! recognise again but never keep (refresh tokens, idempotency fingerprints); and hex itself,
//! written by table rather than through `fmt` (analytics' sketches are 4 KiB each).

use sha2::{Digest as _, Sha256};

/// The SHA-256 of the concatenated `parts`, as 64 lowercase hex digits after `prefix`.
pub fn sha256_hex_of(prefix: &str, parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = String::with_capacity(prefix.len() + 64);
    out.push_str(prefix);
    push_hex(&mut out, &hasher.finalize());
    out
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` to `out` as lowercase hex.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// `bytes` as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The bytes of hex text (either case); `None` for an odd length or a non-hex character.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// Exactly `N` bytes of hex text (either case), without an allocation (a trace id, a span id).
pub fn from_hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The SHA-256 of `data` as 64 lowercase hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256_hex_of("", &[data])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_size_hex_takes_exactly_its_length() {
        assert_eq!(from_hex_array::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(from_hex_array::<2>("0aff00"), None);
        assert_eq!(from_hex_array::<2>("0af"), None);
        assert_eq!(from_hex_array::<1>("0g"), None);
    }

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

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let all: Vec<u8> = (0..=255).collect();
        let text = to_hex(&all);
        assert!(text.starts_with("000102") && text.ends_with("fdfeff"));
        assert_eq!(from_hex(&text), Some(all));
        assert_eq!(from_hex("0A0b"), Some(vec![10, 11]));
        for bad in ["abc", "0g", "+f", " 1", "é0"] {
            assert_eq!(from_hex(bad), None, "{bad:?}");
        }
    }
}
