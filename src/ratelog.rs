//! A log line that cannot flood: the first event of a kind is logged at once, later ones at most once per
//! period with the count since the last line. Every refusal and drop has a counter too; this keeps its log
//! line readable under a flood.

use std::time::Duration;

use tokio::time::Instant;

/// Logs the first event, then at most once per period with the count since the last line.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    period: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl RateLimitedLog {
    pub(crate) fn new(period: Duration) -> RateLimitedLog {
        RateLimitedLog { period, last: None, pending: 0 }
    }

    /// Counts one event; returns the count to log when a line is due.
    pub(crate) fn hit(&mut self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        if self.last.is_none_or(|t| now.duration_since(t) >= self.period) {
            self.last = Some(now);
            return Some(std::mem::take(&mut self.pending));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_at_once_then_one_line_per_period_with_the_count() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut log = RateLimitedLog::new(Duration::from_secs(1));
        assert_eq!(log.hit_at(at(0)), Some(1));
        assert_eq!(log.hit_at(at(10)), None);
        assert_eq!(log.hit_at(at(999)), None);
        assert_eq!(log.hit_at(at(1000)), Some(3), "the two held back and this one, in one line");
        assert_eq!(log.hit_at(at(5000)), Some(1));
    }
}
