//! How many unauthenticated refusals are recorded: a flood of them (bad
//! tokens at the gateway, garbage at the database proxy) must not fill the
//! WAL and trip fail-closed for every legitimate caller.

use std::time::Instant;

/// A token bucket of refusal records: 20 per second, bursts of 100.
pub struct RefusalBudget {
    tokens: f64,
    last: Instant,
}

impl Default for RefusalBudget {
    fn default() -> Self {
        RefusalBudget { tokens: Self::BURST, last: Instant::now() }
    }
}

impl RefusalBudget {
    const RATE: f64 = 20.0;
    const BURST: f64 = 100.0;

    /// Whether one more refusal may be recorded now.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * Self::RATE).min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
