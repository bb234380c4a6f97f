//! The deadlines of one ranged GET beyond hyper's own: the longest silence, the minimum rate over a
//! window (a server sending a byte every few seconds never trips a read timeout), and how many times a
//! part that ran into one of them is retried. The stream loop consults `Pace` once per chunk.
use std::time::{Duration, Instant};

use crate::error::Cause;
use crate::spec::Options;

/// The pace of one response body. Windows are counted from the first call (the response head).
pub struct Pace {
    min_rate: f64,
    window: Duration,
    silence: Duration,
    window_start: Instant,
    window_bytes: u64,
    last_byte: Instant,
}

impl Pace {
    pub fn new(options: &Options) -> Self {
        let now = Instant::now();
        Pace {
            min_rate: options.min_rate,
            window: options.rate_window,
            silence: options.read_timeout,
            window_start: now,
            window_bytes: 0,
            last_byte: now,
        }
    }

    /// How long to wait for the next chunk: until the silence limit, or the end of the window.
    pub fn wait(&self) -> Duration {
        let now = Instant::now();
        let silent = self.silence.saturating_sub(now - self.last_byte);
        if self.min_rate <= 0.0 {
            return silent;
        }
        silent.min(self.window.saturating_sub(now - self.window_start))
    }

    /// `n` more bytes arrived: an error when the window just ended below the minimum rate.
    pub fn record(&mut self, n: u64) -> Result<(), Cause> {
        let now = Instant::now();
        self.last_byte = now;
        self.window_bytes += n;
        self.judge(now)
    }

    /// The wait from `wait()` ran out with no chunk: an error for a silence over the limit or a
    /// window below the rate; otherwise a new window began and the caller waits again.
    pub fn idle(&mut self) -> Result<(), Cause> {
        let now = Instant::now();
        let silent = now - self.last_byte;
        if silent >= self.silence {
            return Err(Cause::Unanswered(format!(
                "no data for {:.3} s",
                silent.as_secs_f64()
            )));
        }
        self.judge(now)
    }

    fn judge(&mut self, now: Instant) -> Result<(), Cause> {
        let elapsed = now - self.window_start;
        if self.min_rate <= 0.0 || elapsed < self.window {
            return Ok(());
        }
        let seconds = elapsed.as_secs_f64();
        if (self.window_bytes as f64) < self.min_rate * seconds {
            return Err(Cause::Unanswered(format!(
                "{} bytes in {seconds:.1} s, below the minimum of {} KiB/s over {} s",
                self.window_bytes,
                self.min_rate / 1024.0,
                self.window.as_secs_f64()
            )));
        }
        self.window_start = now;
        self.window_bytes = 0;
        Ok(())
    }
}

/// Counts the attempts of one part that got no usable answer (`Cause::Unanswered`, or bytes that fail
/// their digest): those get
/// `stall_retries` retries, fewer than an answer that asks to retry (503), so a server that is down,
/// never answers or trickles fails the pull in about (stall_retries + 1) deadlines.
pub struct Stalls {
    count: u32,
    allowed: u32,
}

impl Stalls {
    pub fn new(options: &Options) -> Self {
        Stalls {
            count: 0,
            allowed: options.stall_retries,
        }
    }

    /// True when `cause` got no answer and the part has used up its retries for those.
    pub fn exhausted(&mut self, cause: &Cause) -> bool {
        if matches!(cause, Cause::Unanswered(_) | Cause::Digest { .. }) {
            self.count += 1;
        }
        self.count > self.allowed
    }
}

/// True when a request failed without reaching the server: the connect failed (refused, no route,
/// DNS) or timed out. A server that is not there is retried like one that does not answer.
pub fn is_unreachable(err: &hyper_util::client::legacy::Error) -> bool {
    err.is_connect() || is_timeout(err)
}

/// True when an error (or one of its causes) is an I/O timeout.
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(min_rate: f64, window_ms: u64, silence_ms: u64, stall_retries: u32) -> Options {
        let mut o = Options::new(1, 1.0, 1.0, 3, 0.0, 0.0, 0.1).unwrap();
        o.min_rate = min_rate;
        o.rate_window = Duration::from_millis(window_ms);
        o.read_timeout = Duration::from_millis(silence_ms);
        o.stall_retries = stall_retries;
        o
    }

    #[test]
    fn a_trickle_fails_at_the_end_of_its_window() {
        let mut pace = Pace::new(&options(1000.0, 30, 1000, 1));
        assert!(pace.record(1).is_ok());
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(pace.record(1), Err(Cause::Unanswered(_))));
    }

    #[test]
    fn a_fast_stream_starts_new_windows() {
        let mut pace = Pace::new(&options(10.0, 20, 1000, 1));
        std::thread::sleep(Duration::from_millis(25));
        assert!(pace.record(1 << 20).is_ok());
        assert!(pace.wait() <= Duration::from_millis(20));
    }

    #[test]
    fn silence_over_the_limit_is_a_timeout_and_zero_rate_is_off() {
        let mut pace = Pace::new(&options(0.0, 10, 20, 1));
        std::thread::sleep(Duration::from_millis(15));
        assert!(pace.idle().is_ok());
        std::thread::sleep(Duration::from_millis(10));
        assert!(matches!(pace.idle(), Err(Cause::Unanswered(_))));
    }

    #[test]
    fn only_timeouts_use_the_stall_retries() {
        let mut stalls = Stalls::new(&options(0.0, 10, 10, 1));
        assert!(!stalls.exhausted(&Cause::Status(503)));
        assert!(!stalls.exhausted(&Cause::Unanswered("t".into())));
        assert!(!stalls.exhausted(&Cause::Status(503)));
        assert!(stalls.exhausted(&Cause::Unanswered("t".into())));
        let mut stalls = Stalls::new(&options(0.0, 10, 10, 0));
        let digest = Cause::Digest {
            algorithm: "sha256",
            expected: "a".into(),
            actual: "b".into(),
        };
        assert!(stalls.exhausted(&digest));
    }
}
