//! A HyperLogLog sketch of distinct users: 4 KiB per window, ±1.6 % (one standard error),
//! mergeable by taking the larger register, so partial windows from several instances combine
//! into the sketch one instance would have built.
//!
//! Written here rather than taken from a crate: merging across processes and storing the
//! sketch needs a byte format and a hash that never change between builds, which the crates
//! on offer (std's randomised hashers behind them) do not promise.

use uuid::Uuid;

/// log2 of the register count.
const PRECISION: u32 = 12;
const REGISTERS: usize = 1 << PRECISION;

#[derive(Clone, PartialEq, Eq)]
pub struct UserSketch {
    registers: Vec<u8>,
}

impl std::fmt::Debug for UserSketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserSketch(~{})", self.estimate())
    }
}

impl Default for UserSketch {
    fn default() -> Self {
        UserSketch {
            registers: vec![0; REGISTERS],
        }
    }
}

/// SplitMix64's finaliser over both halves: stable across builds and platforms, and it spreads
/// time-ordered (v7) ids as well as random ones.
fn hash(user: Uuid) -> u64 {
    let (hi, lo) = user.as_u64_pair();
    let mut z = hi ^ lo.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl UserSketch {
    /// `None` unless `bytes` is a sketch this module wrote.
    pub fn from_bytes(bytes: &[u8]) -> Option<UserSketch> {
        (bytes.len() == REGISTERS && bytes.iter().all(|r| u32::from(*r) <= 64 - PRECISION + 1))
            .then(|| UserSketch {
                registers: bytes.to_vec(),
            })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.registers
    }

    pub fn insert(&mut self, user: Uuid) {
        let h = hash(user);
        let index = (h >> (64 - PRECISION)) as usize;
        // Rank of the first 1 bit in the remaining bits, capped when they are all zero.
        let rest = h << PRECISION;
        let rank = (rest.leading_zeros() + 1).min(64 - PRECISION + 1) as u8;
        if let Some(r) = self.registers.get_mut(index) {
            *r = (*r).max(rank);
        }
    }

    pub fn merge(&mut self, other: &UserSketch) {
        for (mine, theirs) in self.registers.iter_mut().zip(&other.registers) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// The estimated number of distinct users, with linear counting for small sets.
    pub fn estimate(&self) -> i64 {
        let m = REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let (sum, zeros) = self.registers.iter().fold((0.0_f64, 0_u32), |(s, z), r| {
            (s + 2f64.powi(-i32::from(*r)), z + u32::from(*r == 0))
        });
        let raw = alpha * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            m * (m / f64::from(zeros)).ln()
        } else {
            raw
        };
        estimate.round() as i64
    }

    /// Lower-case hex, for JSON records.
    pub fn to_hex(&self) -> String {
        kit::digest::to_hex(&self.registers)
    }

    pub fn from_hex(text: &str) -> Option<UserSketch> {
        if text.len() != REGISTERS * 2 {
            return None;
        }
        UserSketch::from_bytes(&kit::digest::from_hex(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(range: std::ops::Range<u128>) -> impl Iterator<Item = Uuid> {
        range.map(|i| Uuid::new_v5(&Uuid::NAMESPACE_OID, &i.to_le_bytes()))
    }

    #[test]
    fn small_sets_are_counted_almost_exactly() {
        let mut s = UserSketch::default();
        assert_eq!(s.estimate(), 0);
        for u in users(0..10) {
            s.insert(u);
            s.insert(u);
        }
        assert_eq!(s.estimate(), 10);
    }

    #[test]
    fn large_sets_are_within_three_standard_errors() {
        for n in [1_000_u128, 50_000, 300_000] {
            let mut s = UserSketch::default();
            users(0..n).for_each(|u| s.insert(u));
            let error = (s.estimate() as f64 - n as f64).abs() / n as f64;
            assert!(error < 0.05, "n={n}: estimate {} ({error})", s.estimate());
        }
    }

    #[test]
    fn merged_partial_sketches_equal_the_whole() {
        let (mut a, mut b, mut whole) = (
            UserSketch::default(),
            UserSketch::default(),
            UserSketch::default(),
        );
        for (i, u) in users(0..5_000).enumerate() {
            let part: &mut UserSketch = if i % 3 == 0 { &mut a } else { &mut b };
            part.insert(u);
            whole.insert(u);
        }
        // Overlap: users seen by both parts count once.
        users(0..1_000).for_each(|u| b.insert(u));
        a.merge(&b);
        assert_eq!(a, whole);
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let mut s = UserSketch::default();
        users(0..100).for_each(|u| s.insert(u));
        assert_eq!(UserSketch::from_hex(&s.to_hex()), Some(s.clone()));
        assert_eq!(UserSketch::from_hex("zz"), None);
        assert_eq!(UserSketch::from_bytes(&[255; REGISTERS]), None);
        assert_eq!(
            UserSketch::from_bytes(s.as_bytes()).map(|x| x.estimate()),
            Some(s.estimate())
        );
    }
}
