//! Timing for the control channel: the reconnect back-off and the jitter on
//! it and on heartbeats, so that a rack of agents that lost their Controller
//! together neither retry nor beat in step.
//!
//! Back-off starts at 0.5 s and doubles to a cap of 4 s, each wait jittered to
//! 75–125 %: after a Controller restart an agent is back within 10 s (the
//! first four waits add up to at most 9.4 s). Each client has its own small
//! generator (splitmix64, seeded from the standard library's per-process
//! random hash keys and the clock), because the swarm command runs many
//! clients in one process and `agent::jitter` is seeded from the clock alone.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

/// First reconnect wait (before jitter).
pub const FIRST: Duration = Duration::from_millis(500);
/// Longest reconnect wait (before jitter).
pub const CAP: Duration = Duration::from_secs(4);

/// A small non-cryptographic generator: jitter and boot ids, nothing secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the OS-random keys of `RandomState` and the clock.
    pub fn from_os() -> Rng {
        let mut h = RandomState::new().build_hasher();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        h.write_u128(now.as_nanos());
        Rng(h.finish())
    }

    #[cfg(test)]
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    /// splitmix64.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `d` scaled to between `lo` and `hi` percent of itself (per-mille steps).
    pub fn jitter(&mut self, d: Duration, lo: u32, hi: u32) -> Duration {
        let span = u64::from(hi.saturating_sub(lo)) * 10 + 1;
        let permille = lo * 10 + (self.next_u64() % span) as u32;
        d * permille / 1000
    }
}

/// Jittered exponential back-off between connection attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: FIRST }
    }
}

impl Backoff {
    /// The next wait (75–125 % of the current base); doubles the base, up to `CAP`.
    pub fn next(&mut self, rng: &mut Rng) -> Duration {
        let wait = rng.jitter(self.base, 75, 125);
        self.base = (self.base * 2).min(CAP);
        wait
    }

    /// Back to the first wait: after the Controller welcomed us.
    pub fn reset(&mut self) {
        self.base = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_the_cap_within_jitter_bounds() {
        for seed in 0..200 {
            let mut rng = Rng::seeded(seed);
            let mut b = Backoff::default();
            let bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0];
            let mut first_four = Duration::ZERO;
            for (i, base) in bases.iter().enumerate() {
                let w = b.next(&mut rng).as_secs_f64();
                assert!(
                    w >= base * 0.75 - 1e-9 && w <= base * 1.25 + 1e-9,
                    "seed {seed} wait {i}: {w}"
                );
                if i < 4 {
                    first_four += Duration::from_secs_f64(w);
                }
            }
            assert!(
                first_four <= Duration::from_millis(9375),
                "back within 10 s: {first_four:?}"
            );
            b.reset();
            let w = b.next(&mut rng);
            assert!(w >= Duration::from_millis(375) && w <= Duration::from_millis(625));
        }
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let mut rng = Rng::seeded(7);
        let d = Duration::from_secs(1);
        let waits: Vec<Duration> = (0..2000).map(|_| rng.jitter(d, 80, 120)).collect();
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(
            *min >= Duration::from_millis(800) && *min < Duration::from_millis(820),
            "{min:?}"
        );
        assert!(
            *max <= Duration::from_millis(1200) && *max > Duration::from_millis(1180),
            "{max:?}"
        );
    }

    #[test]
    fn generators_from_the_os_differ() {
        assert_ne!(Rng::from_os().next_u64(), Rng::from_os().next_u64());
    }
}
