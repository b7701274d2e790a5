//! Test support: the detector's publishing of epoch tokens without its I/O. A `Shell` feeds evidence to a
//! `Machine` and moves a `HostView`'s tokens on with `settle_tokens`, as `Detector::publish` does, so the
//! tokens sessions take (`HostView::epoch_for_new_session`) can be followed through any schedule.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Evidence, Failover, HostState, HostView, Machine, settle_tokens};

/// A machine and the view its detector would publish.
pub(crate) struct Shell {
    pub(crate) machine: Machine,
    pub(crate) view: HostView,
    pub(crate) linked: Vec<CancellationToken>,
}

impl Shell {
    pub(crate) fn new(fall: u32, rise: u32, now: Instant) -> Shell {
        let view = HostView {
            state: HostState::Up,
            epoch: 1,
            epoch_end: CancellationToken::new(),
            next_epoch_end: None,
            identity: None,
            since: now,
            last_failover: None,
            neighbor: Arc::from("off"),
            note: None,
        };
        Shell { machine: Machine::new(fall, rise, now), view, linked: Vec::new() }
    }

    /// One piece of evidence, published.
    pub(crate) fn observe(&mut self, now: Instant, ev: Evidence) -> Option<Failover> {
        let f = self.machine.observe(now, ev);
        self.publish(f.as_ref());
        f
    }

    /// The token of a session connected now.
    pub(crate) fn session(&self) -> CancellationToken {
        self.view.epoch_for_new_session()
    }

    fn publish(&mut self, failover: Option<&Failover>) {
        settle_tokens(&mut self.view, &mut self.linked, failover, self.machine.join());
        self.view.state = self.machine.state();
    }
}
