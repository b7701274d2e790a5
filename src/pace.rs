//! The release of held clients, paced: after a takeover every held client of a service is woken by the
//! same change of the detector's view, and without pacing they all dial the node that just took over in the
//! same instant. With `[service.hold] release_rate` each connect attempt of a client that was held takes a
//! turn at the service's pacer, so the new node never sees more new connections per second than the rate.
//! Clients that were never held are not paced. The pacer is shared by every generation of the service (a
//! reload keeps it).
//!
//! Turns are slots one spacing (`1 / rate`) apart, reserved in the order attempts ask, never earlier than
//! the asking and never banked while idle; that spreads a herd without a lock held across a wait. What
//! bounds the rate is a gate at the moment an attempt really goes (GCRA on the attempts that went: a
//! virtual schedule one spacing per attempt, which an attempt may run ahead of by at most `LATE`): a busy
//! runtime that wakes a bunch of attempts late lets through only what the rate allows, and the rest take
//! new slots. Any window `w` then holds at most `1 + rate × (w + LATE)` attempts.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

/// How far attempts may run ahead of the gate's schedule (a burst of `rate × LATE`).
const LATE: Duration = Duration::from_millis(5);

/// The slots and the gate of one service's paced attempts.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    /// The next free slot.
    next: Mutex<Option<Instant>>,
    /// The gate's schedule: the theoretical time of the next attempt to go.
    tat: Mutex<Option<Instant>>,
}

impl Pacer {
    /// Waits for this attempt's turn at `rate` per second.
    pub(crate) async fn turn(&self, rate: u32) {
        let spacing = spacing(rate);
        loop {
            let at = self.reserve(Instant::now(), spacing);
            sleep_until(at).await;
            let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(after) = gate(*tat, Instant::now(), spacing) {
                *tat = Some(after);
                return;
            }
        }
    }

    fn reserve(&self, now: Instant, spacing: Duration) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let (at, after) = next_slot(*next, now, spacing);
        *next = Some(after);
        at
    }
}

/// The time between two slots at `rate` per second, rounded up so a second never holds more than `rate`.
fn spacing(rate: u32) -> Duration {
    Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(rate.max(1))))
}

/// The slot an attempt asking at `now` takes, and the next free one after it.
fn next_slot(next: Option<Instant>, now: Instant, spacing: Duration) -> (Instant, Instant) {
    let at = next.map_or(now, |n| n.max(now));
    (at, at + spacing)
}

/// Whether an attempt goes at `now` given the gate's schedule `tat`: the schedule after it if it does.
fn gate(tat: Option<Instant>, now: Instant, spacing: Duration) -> Option<Instant> {
    match tat {
        Some(t) if t > now + LATE => None,
        _ => Some(tat.map_or(now, |t| t.max(now)) + spacing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When an attempt next wakes, which it is, its round, and the slot it woke for (`None`: it asks).
    type Event = (Instant, usize, usize, Option<Instant>);

    /// Attempts that ask at the given times and wake `late(i, round)` after their slot: when each went.
    fn simulate(rate: u32, asks: &[Instant], late: impl Fn(usize, usize) -> Duration) -> Vec<Instant> {
        let (sp, mut next, mut tat, mut went) = (spacing(rate), None, None, Vec::new());
        // Attempts are processed in the order their next event comes; a heap of (time, attempt, round, slot).
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<Event>> =
            asks.iter().enumerate().map(|(i, a)| std::cmp::Reverse((*a, i, 0, None))).collect();
        while let Some(std::cmp::Reverse((now, i, round, slot))) = heap.pop() {
            let passed = slot.and_then(|_| gate(tat, now, sp));
            match passed {
                Some(after) => {
                    tat = Some(after);
                    went.push(now);
                }
                None => {
                    let (at, after) = next_slot(next, now, sp);
                    next = Some(after);
                    heap.push(std::cmp::Reverse((at + late(i, round), i, round + 1, Some(at))));
                }
            }
        }
        went.sort();
        went
    }

    fn most_in(went: &[Instant], window: Duration) -> usize {
        (0..went.len()).map(|i| went[i..].iter().take_while(|t| **t < went[i] + window).count()).max().unwrap_or(0)
    }

    #[test]
    fn a_herd_goes_one_spacing_apart_and_idle_time_is_not_banked() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let went = simulate(100, &[t0; 4], |_, _| Duration::ZERO);
        assert_eq!(went.iter().map(|t| *t - t0).collect::<Vec<_>>(), [ms(0), ms(10), ms(20), ms(30)]);
        let after = t0 + ms(500);
        let went = simulate(100, &[t0, after, after], |_, _| Duration::ZERO);
        assert_eq!((went[1] - t0, went[2] - t0), (ms(500), ms(510)), "no burst after a pause");
        // Woken 20 ms late, the second attempt takes a new slot (after the third's) instead of bunching.
        let went = simulate(100, &[t0; 3], |i, round| if (i, round) == (1, 0) { ms(20) } else { ms(0) });
        assert_eq!(went.iter().map(|t| *t - t0).collect::<Vec<_>>(), [ms(0), ms(20), ms(30)]);
    }

    /// Whatever the arrivals and however late the runtime wakes each attempt (seeded), no window of one
    /// second holds more than `1 + rate × 1.005` attempts, none of 100 ms more than `1 + rate × 0.105`, and
    /// every attempt goes.
    #[test]
    fn no_window_holds_more_than_the_rate_allows() {
        let mut rng = fastrand::Rng::with_seed(7);
        for rate in [1u32, 3, 100, 2000, 10_000, 100_000] {
            for herd in [true, false] {
                let t0 = Instant::now();
                let mut at = t0;
                let asks: Vec<Instant> = (0..3000)
                    .map(|_| {
                        if !herd {
                            at += Duration::from_micros(rng.u64(0..2000));
                        }
                        at
                    })
                    .collect();
                let lateness: Vec<[u64; 4]> = (0..3000)
                    .map(|_| [(); 4].map(|_| if rng.u8(..) < 30 { rng.u64(0..50_000) } else { rng.u64(0..1500) }))
                    .collect();
                // A runtime late on an attempt's first four wake-ups, then on time (a wake-up is late by chance;
                // in the ride-out a client late forever meets its deadline).
                let went = simulate(rate, &asks, |i, round| {
                    Duration::from_micros(lateness[i].get(round).copied().unwrap_or(0))
                });
                assert_eq!(went.len(), asks.len());
                for (window, share) in [(Duration::from_secs(1), 1.005), (Duration::from_millis(100), 0.105)] {
                    let most = most_in(&went, window);
                    let bound = 1 + (f64::from(rate) * share) as usize;
                    assert!(most <= bound, "rate {rate}, herd {herd}: {most} attempts in {window:?} (bound {bound})");
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn turns_are_taken_at_the_rate() {
        let p = std::sync::Arc::new(Pacer::default());
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                p.turn(10).await;
                Instant::now() - t0
            }));
            tokio::task::yield_now().await;
        }
        let mut went = Vec::new();
        for t in tasks {
            went.push(t.await.unwrap());
        }
        went.sort();
        let ms = Duration::from_millis;
        assert_eq!(went, [ms(0), ms(100), ms(200), ms(300)]);
    }
}
