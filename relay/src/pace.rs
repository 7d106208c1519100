//! Pacing of the backlog replay: a token bucket, with the time passed in.

use std::time::{Duration, Instant};

/// Sends at most `rate` bytes per second after a burst of a quarter of a
/// second's worth.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(bytes_per_s: u64, now: Instant) -> Self {
        let rate = bytes_per_s as f64;
        // A quarter of a second of sending; a frame larger than that
        // simply waits for its tokens.
        let burst = (rate / 4.0).max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes `n` bytes' worth of tokens at `now`; returns how long to wait
    /// before sending them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.tokens = (self.tokens
            + now.saturating_duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.burst);
        self.at = self.at.max(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_bucket_holds_the_rate_after_its_burst() {
        let t = Instant::now();
        let mut b = TokenBucket::new(100_000, t);
        // The burst (a quarter of a second: 25,000 bytes) goes at once…
        assert_eq!(b.take(25_000, t), Duration::ZERO);
        // …then 50,000 more bytes must wait half a second.
        assert_eq!(b.take(50_000, t), Duration::from_millis(500));
        // A second later the debt is paid and half the burst is back.
        assert_eq!(b.take(12_500, t + Duration::from_secs(1)), Duration::ZERO);
    }
}
