//! Which hub to use: the first one listed while it answers; the next one
//! once the current one has been unreachable for `failover_after`; and back
//! to an earlier one when a periodic look finds it answering again. Pure:
//! the time is passed in.

use std::time::{Duration, Instant};

/// The choice of hub among `hubs` (indexes into the relay's list, in order
/// of preference).
#[derive(Debug, Clone)]
pub struct HubChoice {
    hubs: usize,
    current: usize,
    /// Since when the current hub has been unreachable, if it is.
    down_since: Option<Instant>,
    failover_after: Duration,
    failback_every: Duration,
    last_failback_look: Instant,
}

impl HubChoice {
    pub fn new(
        hubs: usize,
        failover_after: Duration,
        failback_every: Duration,
        now: Instant,
    ) -> Self {
        assert!(hubs > 0, "a relay has at least one hub");
        HubChoice {
            hubs,
            current: 0,
            down_since: None,
            failover_after,
            failback_every,
            last_failback_look: now,
        }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// The hub to try now: the current one, or the next if the current one
    /// has been unreachable for too long.
    pub fn next(&mut self, now: Instant) -> usize {
        if self.hubs > 1
            && self
                .down_since
                .is_some_and(|t| now.saturating_duration_since(t) >= self.failover_after)
        {
            self.current = (self.current + 1) % self.hubs;
            self.down_since = None;
            self.last_failback_look = now;
        }
        self.current
    }

    /// A connection to the current hub ended (or never came up). `last_heard`
    /// is when the hub last answered, if it did on that connection; `tried`
    /// when the attempt began.
    pub fn handle_ended(&mut self, last_heard: Option<Instant>, tried: Instant) {
        self.down_since = match last_heard {
            Some(t) => Some(t),
            None => Some(self.down_since.unwrap_or(tried)),
        };
    }

    /// Hubs earlier in the list worth a look now, best first (empty when on
    /// the first hub or when the last look was recent).
    pub fn failback_candidates(&mut self, now: Instant) -> Vec<usize> {
        if self.current == 0
            || now.saturating_duration_since(self.last_failback_look) < self.failback_every
        {
            return Vec::new();
        }
        self.last_failback_look = now;
        (0..self.current).collect()
    }

    /// Goes back to hub `index`, found answering.
    pub fn fail_back(&mut self, index: usize, now: Instant) {
        self.current = index.min(self.hubs - 1);
        self.down_since = None;
        self.last_failback_look = now;
    }
}

/// The bound of the "full jitter" backoff before attempt `attempt` (0 for
/// the first retry): min(max, 250 ms × 2^attempt). The wait is a uniformly
/// random duration between zero and the bound, so that relays cut off
/// together do not all come back in the same instant.
pub fn backoff_bound(attempt: u32, max: Duration) -> Duration {
    Duration::from_millis(250)
        .saturating_mul(1u32 << attempt.min(16))
        .min(max)
}

/// The wait before the next attempt, given `unit`, a uniform random number
/// in [0, 1).
pub fn full_jitter(attempt: u32, max: Duration, unit: f64) -> Duration {
    let bound = backoff_bound(attempt, max).as_millis() as f64;
    Duration::from_millis((bound * unit.clamp(0.0, 1.0)).round() as u64)
}

/// The attempt count after a connection ended: a session that lasted a
/// while (its hub last heard more than 30 s after the attempt began)
/// starts the backoff over; anything shorter backs off further.
pub fn next_attempt(attempt: u32, last_heard: Option<Instant>, tried: Instant) -> u32 {
    if last_heard.is_some_and(|t| t.saturating_duration_since(tried) > Duration::from_secs(30)) {
        0
    } else {
        attempt.saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_hub_that_answers_is_kept() {
        let t = Instant::now();
        let mut c = HubChoice::new(3, 15 * S, 60 * S, t);
        assert_eq!(c.next(t), 0);
        c.handle_ended(Some(t + 100 * S), t);
        assert_eq!(c.next(t + 110 * S), 0, "heard 10 s ago: not yet");
    }

    #[test]
    fn an_unreachable_hub_is_left_after_failover_after_for_the_next() {
        let t = Instant::now();
        let mut c = HubChoice::new(3, 15 * S, 60 * S, t);
        c.handle_ended(None, t);
        assert_eq!(c.next(t + 10 * S), 0);
        c.handle_ended(None, t + 10 * S);
        assert_eq!(c.next(t + 15 * S), 1, "down since the first failed attempt");
        c.handle_ended(None, t + 15 * S);
        c.handle_ended(None, t + 25 * S);
        assert_eq!(c.next(t + 31 * S), 2);
        c.handle_ended(None, t + 31 * S);
        assert_eq!(c.next(t + 50 * S), 0, "round the list");
    }

    #[test]
    fn a_lost_connection_counts_from_when_the_hub_was_last_heard() {
        let t = Instant::now();
        let mut c = HubChoice::new(2, 15 * S, 60 * S, t);
        // Connected for a while; the hub went silent at t+100 and the loss
        // was noticed at t+115.
        c.handle_ended(Some(t + 100 * S), t);
        assert_eq!(c.next(t + 115 * S), 1);
    }

    #[test]
    fn an_earlier_hub_is_looked_at_every_failback_every_and_gone_back_to() {
        let t = Instant::now();
        let mut c = HubChoice::new(3, 15 * S, 60 * S, t);
        c.handle_ended(None, t);
        c.next(t + 15 * S);
        c.handle_ended(None, t + 15 * S);
        assert_eq!(c.next(t + 30 * S), 2);
        assert!(c.failback_candidates(t + 60 * S).is_empty(), "not yet");
        assert_eq!(c.failback_candidates(t + 90 * S), vec![0, 1]);
        assert!(
            c.failback_candidates(t + 91 * S).is_empty(),
            "looked just now"
        );
        c.fail_back(0, t + 91 * S);
        assert_eq!(c.next(t + 92 * S), 0);
        assert!(
            c.failback_candidates(t + 500 * S).is_empty(),
            "on the first hub"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_restarts_after_a_long_session() {
        let max = 30 * S;
        assert_eq!(backoff_bound(0, max), Duration::from_millis(250));
        assert_eq!(backoff_bound(3, max), 2 * S);
        assert_eq!(backoff_bound(40, max), max);
        assert_eq!(full_jitter(3, max, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(3, max, 0.5), S);
        let t = Instant::now();
        assert_eq!(next_attempt(4, Some(t + 31 * S), t), 0);
        assert_eq!(next_attempt(4, Some(t + 5 * S), t), 5);
        assert_eq!(next_attempt(4, None, t), 5);
    }

    #[test]
    fn a_single_hub_is_never_left() {
        let t = Instant::now();
        let mut c = HubChoice::new(1, 15 * S, 60 * S, t);
        c.handle_ended(None, t);
        assert_eq!(c.next(t + 1000 * S), 0);
    }
}
