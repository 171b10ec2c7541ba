//! Retry policy: exponential backoff, with jitter for events and without for the relay's own
//! waits. The one type for every backoff in the relay.

use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// The wait before attempt `attempts + 1`: `initial * 2^(attempts-1)`, capped at `max`,
    /// then "equal jitter" (a uniform draw from the upper half), so retries of many events that
    /// failed together spread out instead of returning as one wave.
    pub fn delay(&self, attempts: u32) -> Duration {
        let base = self.step(attempts.saturating_sub(1));
        let half = base / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// `initial * 2^n`, capped at `max`, without jitter: for one process's own waits (a claim
    /// that failed, a lost LISTEN session, a start-up waiting for what it needs), where there
    /// is no crowd of retries to spread out.
    pub fn step(&self, n: u32) -> Duration {
        self.initial
            .checked_mul(1u32 << n.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_and_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..100 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d20 = b.delay(20);
            assert!(d20 >= Duration::from_millis(500) && d20 <= Duration::from_secs(1));
            assert!(b.delay(u32::MAX) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn steps_double_without_jitter_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ms: Vec<u128> = (0..8).map(|n| b.step(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.step(u32::MAX), Duration::from_secs(5));
        let huge = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::from_secs(30));
        assert_eq!(
            huge.step(3),
            Duration::from_secs(30),
            "an overflow is the cap"
        );
    }
}
