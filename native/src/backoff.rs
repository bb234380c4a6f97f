//! Retry delays: full jitter (AWS "Exponential Backoff and Jitter"), so that parts failing together
//! do not come back together.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long to wait before retry number `attempt + 1`: uniform in `[0, min(max, base * 2^attempt)]`.
pub fn delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base.as_secs_f64() * 2f64.powi(attempt.min(62) as i32);
    let ceiling = ceiling.min(max.as_secs_f64());
    Duration::from_secs_f64(ceiling * unit_random())
}

/// A `Retry-After` the server asked for, spread over as much again (uniform in `[ra, 2 ra)`), never
/// longer than the configured maximum. Waiting exactly `ra` would bring every pod that got the same
/// 503 back in the same instant; the spread keeps "at least what the server asked".
pub fn honour(retry_after: Duration, max: Duration) -> Duration {
    retry_after.mul_f64(1.0 + unit_random()).min(max)
}

/// A number in `[0, 1)`. Jitter needs no cryptographic quality: splitmix64 over a global counter
/// seeded from the clock keeps the dependency tree free of `rand`.
fn unit_random() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    if seed == 0 {
        seed = clock_seed();
        STATE.store(seed, Ordering::Relaxed);
    }
    (splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64
}

fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32) | 1
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_stays_under_the_exponential_ceiling_and_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(500);
        for attempt in 0..40 {
            let ceiling = (0.1 * 2f64.powi(attempt as i32)).min(0.5);
            let d = delay(attempt, base, max).as_secs_f64();
            assert!((0.0..=ceiling).contains(&d), "attempt {attempt}: {d}");
        }
    }

    #[test]
    fn retry_after_is_capped() {
        let max = Duration::from_secs(2);
        let waits: Vec<Duration> = (0..50)
            .map(|_| honour(Duration::from_secs(1), max))
            .collect();
        assert!(waits
            .iter()
            .all(|w| *w >= Duration::from_secs(1) && *w < Duration::from_secs(2)));
        assert!(waits.iter().any(|w| *w != waits[0])); // spread, not lock-step
        assert_eq!(honour(Duration::from_secs(60), max), max);
    }
}
