//! Time since the process's epoch, the reproducible random generator, user names.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Set by [`epoch`].
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The instant all `*_ns` times count from; fixed by its first call (early in `main`).
pub(crate) fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since this process's epoch.
pub(crate) fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The tokio instant `ns` nanoseconds after the epoch, for sleeping until then.
pub(crate) fn instant_at(ns: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(epoch() + Duration::from_nanos(ns))
}

/// Seconds (negative counts as zero) to nanoseconds.
pub(crate) fn secs_to_ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

/// xorshift64*: small, fast, reproducible.
pub(crate) struct XorShift(u64);

impl XorShift {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        // splitmix64 of the seed so that neighbouring seeds diverge; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 1 } else { z })
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// User id of receiver user `user`.
pub(crate) fn receiver_name(user: usize) -> String {
    format!("user-{user}")
}

/// User id of sender `i`.
pub(crate) fn sender_name(i: usize) -> String {
    format!("sender-{i}")
}
