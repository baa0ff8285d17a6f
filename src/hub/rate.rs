//! Per-user send rate: a token bucket shared by all of a user's sessions.

use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: u32) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst as f64);
        self.last = now;
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant, rate: f64, burst: u32) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Give back a token taken for a send that was then refused.
    pub fn refund(&mut self, burst: u32) {
        self.tokens = (self.tokens + 1.0).min(burst as f64);
    }

    /// A bucket that has refilled completely is the same as no bucket.
    pub fn is_full(&mut self, now: Instant, rate: f64, burst: u32) -> bool {
        self.refill(now, rate, burst);
        self.tokens >= burst as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        assert!((0..3).all(|_| b.take(t0, 2.0, 3)));
        assert!(!b.take(t0, 2.0, 3));
        b.refund(3);
        assert!(b.take(t0, 2.0, 3));
        assert!(!b.take(t0 + Duration::from_millis(400), 2.0, 3));
        assert!(b.take(t0 + Duration::from_millis(600), 2.0, 3));
        assert!(b.is_full(t0 + Duration::from_secs(10), 2.0, 3));
    }
}
