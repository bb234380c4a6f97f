//! The failure policy of the Rust side, mirroring `agent/policy.py`: which statuses are retried, the
//! default retry counts and waits, and the delays (full jitter, AWS "Exponential Backoff and
//! Jitter", so that parts failing together do not come back together). `retryable_statuses` and
//! `retry_defaults` hand the values to Python, where a unit test keeps the two sides equal.
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;

/// Retries of a part after its first try (`RetryPolicy.max_retries`).
pub const MAX_RETRIES: u32 = 5;
/// Seconds: the first backoff ceiling, doubled per retry (`RetryPolicy.base`).
pub const BACKOFF_BASE: f64 = 0.2;
/// Seconds: the longest wait, a `Retry-After` included (`RetryPolicy.cap`).
pub const BACKOFF_CAP: f64 = 10.0;

/// Answers that ask to be tried again: request timeout, too many requests, every server error.
const RETRYABLE: [u16; 2] = [408, 429];
const SERVER_ERRORS: RangeInclusive<u16> = 500..=599;

pub fn is_retryable(status: u16) -> bool {
    RETRYABLE.contains(&status) || SERVER_ERRORS.contains(&status)
}

/// Every status `is_retryable` accepts, for the test that compares it with Python's set.
#[pyfunction]
pub fn retryable_statuses() -> Vec<u16> {
    (100..=999).filter(|s| is_retryable(*s)).collect()
}

/// `(max_retries, backoff_base, backoff_max)`: `fetch`'s defaults, for the same test.
#[pyfunction]
pub fn retry_defaults() -> (u32, f64, f64) {
    (MAX_RETRIES, BACKOFF_BASE, BACKOFF_CAP)
}

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
    fn retryable_statuses_are_timeouts_throttling_and_server_errors() {
        let statuses = retryable_statuses();
        assert_eq!(statuses.len(), 2 + 100);
        assert!([408, 429, 500, 503, 599]
            .iter()
            .all(|s| statuses.contains(s)));
        assert!(![400, 403, 404, 416, 600].iter().any(|s| is_retryable(*s)));
    }

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
