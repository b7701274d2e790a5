//! Tells a split brain from a move by the link-layer addresses the upstream address took: a move goes
//! from one node to another and stays; two nodes that both claim the address make it go back and forth.
//! An address that returns, within the window, to a link-layer address it had before (A→B→A) is a split
//! brain. Pure: the detector feeds it the neighbour changes it sees (link-layer addresses as
//! `neighbor::fingerprint`s) and acts on the answer.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Most changes remembered: an alternation needs three, a window of flapping makes many more.
const KEPT: usize = 32;

/// The recent link-layer addresses of one upstream address.
#[derive(Debug, Default)]
pub(crate) struct Flaps {
    /// (when seen, link-layer address taken), oldest first.
    seen: VecDeque<(Instant, u64)>,
}

impl Flaps {
    /// Records that the address took `lladdr` at `at`; returns whether that is a return to an address it
    /// had within `window` before, after another one (a flap).
    pub(crate) fn record(&mut self, at: Instant, lladdr: u64, window: Duration) -> bool {
        while self.seen.front().is_some_and(|(t, _)| at.saturating_duration_since(*t) > window) {
            self.seen.pop_front();
        }
        let same_as_last = self.seen.back().is_some_and(|(_, last)| *last == lladdr);
        let flap = !same_as_last && self.seen.iter().any(|(_, l)| *l == lladdr);
        if !same_as_last {
            if self.seen.len() == KEPT {
                self.seen.pop_front();
            }
            self.seen.push_back((at, lladdr));
        }
        flap
    }

    /// Records where the address pointed before the first change seen, when that is known.
    pub(crate) fn start_from(&mut self, at: Instant, lladdr: u64) {
        if self.seen.is_empty() {
            self.seen.push_back((at, lladdr));
        }
    }

    /// Forgets everything (a new upstream address).
    pub(crate) fn clear(&mut self) {
        *self = Flaps::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);
    const A: u64 = 1;
    const B: u64 = 2;
    const C: u64 = 3;

    #[tokio::test(start_paused = true)]
    async fn a_move_and_a_move_back_later_are_no_split_brain() {
        let mut f = Flaps::default();
        let t = Instant::now();
        f.start_from(t, A);
        assert!(!f.record(t, B, W));
        assert!(!f.record(t + W + Duration::from_millis(1), A, W), "back after the window");
        assert!(!f.record(t + W * 3, C, W));
    }

    #[tokio::test(start_paused = true)]
    async fn going_back_and_forth_is_a_flap_every_time() {
        let mut f = Flaps::default();
        let t = Instant::now();
        let step = Duration::from_millis(500);
        f.start_from(t, A);
        assert!(!f.record(t + step, B, W), "A->B is a move");
        assert!(f.record(t + step * 2, A, W), "A->B->A is a flap");
        for i in 3..23u32 {
            let l = if i % 2 == 0 { A } else { B };
            assert!(f.record(t + step * i, l, W), "flap {i}");
        }
        let later = t + step * 22 + W + Duration::from_millis(1);
        assert!(!f.record(later, B, W), "B last seen over a window ago: a move, not a flap");
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_address_again_is_no_flap_and_memory_is_bounded() {
        let mut f = Flaps::default();
        let t = Instant::now();
        assert!(!f.record(t, A, W));
        assert!(!f.record(t, A, W), "a repeated announcement");
        assert!(!f.record(t, B, W));
        assert!(!f.record(t, B, W));
        assert!(f.record(t, A, W));
        for i in 0..1000u32 {
            f.record(t, u64::from(i) + 10, W);
        }
        assert!(f.seen.len() <= KEPT);
    }
}
