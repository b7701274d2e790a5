//! The release of held clients, paced: after a takeover every held client of a service is woken by the
//! same change of the detector's view, and without pacing they all dial the node that just took over in the
//! same instant. With `[service.hold] release_rate` each attempt of a client that was held takes the next
//! free slot of the service, one every `1 / release_rate` seconds, so the new node never sees more new
//! connections per second than the rate. Clients that were never held are not paced. The slots are shared
//! by every generation of the service (a reload keeps them).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The next free slot of one service.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// Takes the next slot for an attempt at `rate` per second: the time to wait until (`now` or later).
    pub(crate) fn slot(&self, now: Instant, rate: u32) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let (at, after) = next_slot(*next, now, spacing(rate));
        *next = Some(after);
        at
    }
}

/// The time between two slots at `rate` per second, rounded up so a second never holds more than `rate`.
fn spacing(rate: u32) -> Duration {
    Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(rate.max(1))))
}

/// The slot an attempt takes and the next free one after it: a slot is never earlier than `now` nor than the
/// one after the last slot taken, so slots are at least `spacing` apart and none is banked while idle.
fn next_slot(next: Option<Instant>, now: Instant, spacing: Duration) -> (Instant, Instant) {
    let at = next.map_or(now, |n| n.max(now));
    (at, at + spacing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_spaced_by_the_rate_and_never_banked() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let sp = spacing(1000);
        assert_eq!(sp, ms(1));
        // A herd at one instant: one slot per millisecond.
        let mut next = None;
        let mut slots = Vec::new();
        for _ in 0..5 {
            let (at, after) = next_slot(next, t0, sp);
            slots.push(at - t0);
            next = Some(after);
        }
        assert_eq!(slots, [ms(0), ms(1), ms(2), ms(3), ms(4)]);
        // Idle for a while: the next attempt goes at once, and idle time is not saved up for a burst.
        let later = t0 + ms(100);
        let (at, after) = next_slot(next, later, sp);
        assert_eq!((at, after), (later, later + sp));
        let (at2, _) = next_slot(Some(after), later, sp);
        assert_eq!(at2, later + sp);
    }

    /// Whatever the arrival pattern, no window of one second holds more than `rate` slots (seeded).
    #[test]
    fn no_second_holds_more_than_the_rate() {
        let mut rng = fastrand::Rng::with_seed(7);
        for rate in [1u32, 3, 100, 1000, 10_000] {
            let t0 = Instant::now();
            let sp = spacing(rate);
            let (mut next, mut now, mut slots) = (None, t0, Vec::new());
            for _ in 0..3000 {
                now += Duration::from_micros(rng.u64(0..2000));
                let (at, after) = next_slot(next, now, sp);
                assert!(at >= now);
                slots.push(at);
                next = Some(after);
            }
            for (i, s) in slots.iter().enumerate() {
                let within = slots[i..].iter().take_while(|t| **t < *s + Duration::from_secs(1)).count();
                assert!(within <= rate as usize, "rate {rate}: {within} slots in one second");
            }
        }
    }

    #[test]
    fn a_pacer_hands_out_slots_in_turn() {
        let p = Pacer::default();
        let t0 = Instant::now();
        assert_eq!(p.slot(t0, 10), t0);
        assert_eq!(p.slot(t0, 10), t0 + Duration::from_millis(100));
        assert_eq!(p.slot(t0, 20), t0 + Duration::from_millis(200), "the rate applies from the next slot on");
        assert_eq!(p.slot(t0, 20), t0 + Duration::from_millis(250));
    }
}
