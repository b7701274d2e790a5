//! Connect-phase retries: a jittered exponential `Backoff` and a per-service `RetryBudget` in the manner of
//! Finagle's: each first attempt deposits `ratio` tokens, each retry withdraws one, `min_per_sec` retries
//! are always allowed, deposits expire after the window. Retries happen only before any client byte has
//! gone upstream, so a retry never duplicates a request.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RideOutConfig;

/// Jittered exponential backoff between connect attempts: the n-th delay is uniform in
/// `[base/2, base]` with `base = min(initial * 2^n, max)`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max: max.max(initial), attempt: 0 }
    }

    /// The next delay.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Back to the short end (after a different kind of failure, or a success).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Slots the window is divided into.
const SLOTS: usize = 10;

/// Retries allowed per first attempt, over a sliding window. A reload changes its settings, not what it
/// has counted: the deposits and withdrawals of the window stay.
#[derive(Debug)]
pub struct RetryBudget {
    inner: Mutex<Slots>,
}

/// A budget's settings, from `RideOutConfig`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Params {
    /// Thousandths of a retry earned per first attempt (integers: sums must not drift).
    ratio_milli: u64,
    /// Thousandths of retries the window always allows, whatever the deposits.
    reserve_milli: u64,
    slot_len: Duration,
}

impl Params {
    fn of(hold: &RideOutConfig) -> Params {
        Params {
            ratio_milli: (hold.budget_ratio * 1000.0).round() as u64,
            reserve_milli: (f64::from(hold.budget_min_per_sec) * hold.budget_window.as_secs_f64() * 1000.0).round()
                as u64,
            slot_len: hold.budget_window / SLOTS as u32,
        }
    }
}

#[derive(Debug)]
struct Slots {
    params: Params,
    start: Instant,
    /// Index of the slot that began at `start`.
    current: usize,
    deposits: [u64; SLOTS],
    withdrawals: [u64; SLOTS],
}

impl Slots {
    fn rotate(&mut self, now: Instant) {
        let slot_len = self.params.slot_len;
        let elapsed = now.saturating_duration_since(self.start);
        let steps = (elapsed.as_nanos() / slot_len.as_nanos().max(1)) as usize;
        for _ in 0..steps.min(SLOTS) {
            self.current = (self.current + 1) % SLOTS;
            self.deposits[self.current] = 0;
            self.withdrawals[self.current] = 0;
        }
        self.start += slot_len * steps as u32;
    }
}

impl RetryBudget {
    pub fn new(hold: &RideOutConfig, now: Instant) -> RetryBudget {
        RetryBudget {
            inner: Mutex::new(Slots {
                params: Params::of(hold),
                start: now,
                current: 0,
                deposits: [0; SLOTS],
                withdrawals: [0; SLOTS],
            }),
        }
    }

    fn slots(&self, now: Instant) -> std::sync::MutexGuard<'_, Slots> {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.rotate(now);
        s
    }

    /// New settings (a reload); what the window counted so far stays.
    pub(crate) fn reconfigure(&self, hold: &RideOutConfig) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.params = Params::of(hold);
    }

    /// A first attempt: earns `ratio` retries.
    pub(crate) fn deposit(&self, now: Instant) {
        let mut s = self.slots(now);
        let i = s.current;
        s.deposits[i] += s.params.ratio_milli;
    }

    /// A retry: allowed while withdrawals in the window stay within deposits plus the reserve.
    pub(crate) fn try_withdraw(&self, now: Instant) -> bool {
        let mut s = self.slots(now);
        let earned = s.deposits.iter().sum::<u64>() + s.params.reserve_milli;
        if s.withdrawals.iter().sum::<u64>() + 1000 <= earned {
            let i = s.current;
            s.withdrawals[i] += 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(ratio: f64, min: u32) -> RideOutConfig {
        RideOutConfig {
            deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            budget_ratio: ratio,
            budget_min_per_sec: min,
            budget_window: Duration::from_secs(10),
            release_rate: None,
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_max() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut bases = Vec::new();
        for _ in 0..8 {
            let d = b.next_delay();
            bases.push(d);
        }
        assert!(bases[0] >= Duration::from_millis(25) && bases[0] <= Duration::from_millis(50));
        assert!(bases[1] >= Duration::from_millis(50) && bases[1] <= Duration::from_millis(100));
        assert!(bases[7] >= Duration::from_millis(500) && bases[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_is_ratio_of_first_attempts_plus_reserve() {
        let budget = RetryBudget::new(&hold(0.2, 1), Instant::now());
        for _ in 0..50 {
            budget.deposit(Instant::now());
        }
        // 50 * 0.2 = 10 from deposits, plus 1/s * 10 s of reserve.
        let allowed = (0..100).filter(|_| budget.try_withdraw(Instant::now())).count();
        assert_eq!(allowed, 20);
        // Deposits and withdrawals expire with the window.
        tokio::time::advance(Duration::from_secs(11)).await;
        let allowed = (0..100).filter(|_| budget.try_withdraw(Instant::now())).count();
        assert_eq!(allowed, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn no_reserve_no_deposit_no_retry() {
        let budget = RetryBudget::new(&hold(0.5, 0), Instant::now());
        assert!(!budget.try_withdraw(Instant::now()));
        budget.deposit(Instant::now());
        budget.deposit(Instant::now());
        assert!(budget.try_withdraw(Instant::now()));
        assert!(!budget.try_withdraw(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_what_the_window_counted() {
        let budget = RetryBudget::new(&hold(0.5, 0), Instant::now());
        budget.deposit(Instant::now());
        budget.deposit(Instant::now());
        assert!(budget.try_withdraw(Instant::now()));
        budget.reconfigure(&hold(1.0, 0));
        assert!(!budget.try_withdraw(Instant::now()), "the retry already made still counts");
        budget.deposit(Instant::now());
        assert!(budget.try_withdraw(Instant::now()), "a deposit earns the new ratio");
        assert!(!budget.try_withdraw(Instant::now()));
    }
}
