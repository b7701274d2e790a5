//! The host state machine of one service: evidence in, decisions out. It owns the state (up, suspect,
//! failing-over, down), the epoch, the node identity and the fall/rise counts, and decides when an epoch
//! ends and which epoch a session made now joins (`Join`). It does no I/O and reads no clock: the driver
//! passes `now`, so tests run it on a paused clock.

use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::Signal;
use crate::oserror::ConnectClass;

/// What the data path may do with the logical host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// Serving on the current epoch.
    Up,
    /// A sign arrived; being confirmed. New connects still go ahead.
    Suspect,
    /// The epoch ended and the address answers, but the service does not yet (refused).
    FailingOver,
    /// The address does not answer.
    Down,
    /// The node accepts connections but its reply lacks `expect`: not ready yet (loading, recovering) or
    /// another service on the port. Clients are held; this alone ends no epoch.
    NotReady,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Suspect => "suspect",
            HostState::FailingOver => "failing-over",
            HostState::Down => "down",
            HostState::NotReady => "not-ready",
        }
    }

    /// Whether new upstream connects should be made now.
    pub(crate) fn connectable(self) -> bool {
        matches!(self, HostState::Up | HostState::Suspect)
    }
}

/// How a confirming probe reached the host: a connect, and with `send-expect` one exchange on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// Connected; with `send-expect`, the reply had `expect`.
    Ready,
    /// Connected, but the reply lacked `expect` (or none came, or the node closed): there, not ready.
    NotReady,
    /// Connected and answered the preset's exchange, in another role than required (a replica, a standby).
    NotPrimary,
    /// The address answered with RST: up on some node, the service not.
    Refused,
    /// Nothing answered.
    Silent,
    /// This host could not make the attempt: it has no local address or port for it (EADDRNOTAVAIL: every
    /// ephemeral port toward the upstream is in use, or the `source` address is not on this host), or no
    /// descriptor or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS). Says nothing of the logical host, so it is
    /// no evidence either way.
    Unknown,
}

impl From<ConnectClass> for Reach {
    fn from(class: ConnectClass) -> Reach {
        match class {
            ConnectClass::Ok => Reach::Ready,
            ConnectClass::Refused | ConnectClass::Reset => Reach::Refused,
            // why: a local shortage taken for silence would end the epoch and reset every session of a
            // host that is still there (a client busy opening short connections can use up the ports).
            c if c.local() => Reach::Unknown,
            _ => Reach::Silent,
        }
    }
}

/// One piece of evidence about the logical host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Evidence {
    /// A probe worked: a connect, a matching reply, or an ACK on the probe connection at `at`.
    Ok { at: Instant, identity: Option<String> },
    /// Nothing answered (a timeout, no route, keep-alive expiry on the probe connection).
    Silent { signal: Signal },
    /// The address answered with RST to a connect: up on some node, service not (yet).
    Refused,
    /// The probe connection was reset (or a neighbour change was seen), then a confirming probe reached the
    /// host as `confirm`. A session the serving node no longer knows means every session of the epoch is dead.
    Moved { signal: Signal, confirm: Reach, identity: Option<String> },
    /// The probe connection was reset: the node serving it no longer knows it, so every session of the epoch
    /// is dead and the epoch ends now. New clients are held while a confirming probe settles the state
    /// (its reach follows as evidence of its own).
    Reset { signal: Signal },
    /// The probe connection was closed by the server (FIN), then a confirming probe reached the host as `confirm`.
    Closed { confirm: Reach, identity: Option<String> },
    /// A status exchange got a reply without `expect`: the node is there and not ready. Never a failover by
    /// itself: the readiness of a node is not a move.
    NotReady,
    /// The preset's exchange says the node is in another role than required: not ready, and when the
    /// sessions of the epoch are on it (it was the primary they were made to), the epoch ends (signal
    /// `role`): every write on them would fail.
    NotPrimary,
    /// A sign from outside the probe (a reset session, a failed client connect): suspect, do not decide.
    Sign { signal: Signal },
    /// The cluster manager declared a failover.
    Admin,
    /// A reload gave the service another upstream address: the sessions of the old one are not of this host.
    Reload,
}

/// An epoch that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The epoch that begins.
    pub epoch: u64,
    pub signal: Signal,
    /// From the last good sign of the old epoch to the decision.
    pub detection: Duration,
    pub at: Instant,
    /// Whether the sessions that joined the next epoch during the suspicion (`Join::Next`) are of the epoch
    /// that begins: this failover confirms the move they were made under. Otherwise they reached the old
    /// node and end with the old epoch.
    pub takes_provisional: bool,
}

/// Which epoch a session made now belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Join {
    /// The current one: the session ends with it.
    Current,
    /// The one that begins if the sign being confirmed is a move: the session most likely reached the new
    /// node, so the move must not end it; if the suspicion clears, it ends with the current epoch.
    Next,
}

/// What a suspicion would turn out to be if it is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspicion {
    /// A sign that could be a move (a reset session, a failed client connect): sessions made meanwhile
    /// most likely reached the new node.
    Move,
    /// Failed probes short of `fall` (silence, refusals): a host going away, not a move; sessions made
    /// meanwhile reach the failing node.
    GoingAway,
}

/// A sign being confirmed.
#[derive(Debug, Clone, Copy)]
struct Suspect {
    /// When it came: an ACK from before it says nothing of it.
    since: Instant,
    /// The first sign's signal: it names the failover if the suspicion is confirmed.
    signal: Signal,
    kind: Suspicion,
}

/// The state of one logical host.
#[derive(Debug)]
pub(crate) struct Machine {
    fall: u32,
    rise: u32,
    state: HostState,
    epoch: u64,
    fails: u32,
    oks: u32,
    last_good: Instant,
    identity: Option<String>,
    /// The current suspicion: its first sign, and what it would be if confirmed.
    suspect: Option<Suspect>,
    /// Whether the host has answered once since start. Until it has, nothing of it can have moved: a
    /// failure is a wrong address or port, or a service not started yet, and ends no epoch.
    reached: bool,
    /// Whether the host has been up since the current epoch began: then sessions of this epoch may be
    /// live, and a node that stops being ready and then goes away ends them.
    serving: bool,
    /// A split brain was seen (`split_brain`): until then, an epoch ends by detection only if none ended
    /// within `damp_window` before.
    damp_until: Option<Instant>,
    damp_window: Duration,
    /// When the last epoch ended.
    last_end: Option<Instant>,
    /// Epoch ends the damping held back, since start.
    damped: u64,
}

impl Machine {
    pub(crate) fn new(fall: u32, rise: u32, now: Instant) -> Machine {
        Machine {
            fall: fall.max(1),
            rise: rise.max(1),
            state: HostState::Up,
            epoch: 1,
            fails: 0,
            oks: 0,
            last_good: now,
            identity: None,
            suspect: None,
            reached: false,
            serving: false,
            damp_until: None,
            damp_window: Duration::ZERO,
            last_end: None,
            damped: 0,
        }
    }

    /// Two nodes answer for the address in turn (a split brain): for `window` from `now`, at most one epoch
    /// ends by detection per `window`, since every flap of the address would otherwise end one. A failover
    /// declared by the cluster manager or a reload still ends the epoch.
    pub(crate) fn split_brain(&mut self, now: Instant, window: Duration) {
        self.damp_until = Some(now + window);
        self.damp_window = window;
    }

    /// Whether a split brain damps the epoch ends now.
    pub(crate) fn damping(&self, now: Instant) -> bool {
        self.damp_until.is_some_and(|until| now < until)
    }

    /// How many epoch ends the damping has held back since start.
    pub(crate) fn damped(&self) -> u64 {
        self.damped
    }

    /// Whether a detected failover may end the epoch now; counts the ones held back.
    fn may_end(&mut self, now: Instant) -> bool {
        let held_back =
            self.damping(now) && self.last_end.is_some_and(|t| now.saturating_duration_since(t) < self.damp_window);
        if held_back {
            self.damped += 1;
            // why: the sign was seen and acted on as far as it goes; sessions made while it was suspected
            // stay with the current epoch.
            self.suspect = None;
        }
        !held_back
    }

    pub(crate) fn state(&self) -> HostState {
        self.state
    }
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
    pub(crate) fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }
    /// Whether the host has answered once since start.
    pub(crate) fn reached(&self) -> bool {
        self.reached
    }
    /// Whether a sign that could be a move is being confirmed, and nothing since said the host is going
    /// away instead.
    pub(crate) fn suspecting_a_move(&self) -> bool {
        self.state == HostState::Suspect && self.suspect.is_some_and(|s| s.kind == Suspicion::Move)
    }

    /// Which epoch a session made now joins: the next only while a move is suspected. A host failing
    /// probes short of `fall` is not moving; a failover it comes to ends the sessions made meanwhile.
    pub(crate) fn join(&self) -> Join {
        if self.suspecting_a_move() { Join::Next } else { Join::Current }
    }

    /// New fall and rise counts (a reload); the state, epoch and counts so far stay.
    pub(crate) fn set_thresholds(&mut self, fall: u32, rise: u32) {
        self.fall = fall.max(1);
        self.rise = rise.max(1);
    }

    /// Forgets the node's name without ending the epoch: a new identity pattern names nodes differently, so
    /// the next name it reads is not a move.
    pub(crate) fn forget_identity(&mut self) {
        self.identity = None;
    }

    /// Nothing watches the host any more (the probe was turned off): up, as at the start, with no failover.
    pub(crate) fn assume_up(&mut self, now: Instant) {
        if !self.state.connectable() {
            self.last_good = now;
        }
        self.state = HostState::Up;
        self.suspect = None;
        self.fails = 0;
    }

    /// A good sign of the current epoch seen at `at` (an ACK on the probe connection); changes no state.
    pub(crate) fn good_sign(&mut self, at: Instant) {
        if self.state.connectable() && at > self.last_good {
            self.last_good = at;
        }
    }

    /// Takes one piece of evidence; returns the failover when it ends the epoch.
    pub(crate) fn observe(&mut self, now: Instant, ev: Evidence) -> Option<Failover> {
        match ev {
            Evidence::Ok { at, identity } => self.ok(now, at, identity),
            Evidence::Silent { signal } => self.fail(now, signal, HostState::Down),
            Evidence::Refused => self.fail(now, Signal::Probe, HostState::FailingOver),
            Evidence::Moved { signal, confirm, identity } => {
                let signal = self.suspect.map_or(signal, |s| s.signal);
                let ended = if self.live() && self.may_end(now) { Some(self.end_epoch(now, signal)) } else { None };
                self.after_confirm(now, confirm, identity);
                ended
            }
            Evidence::Closed { confirm, identity } => match confirm {
                // why: a server that closes idle connections is not a failover; the identity still decides.
                Reach::Ready => self.ok(now, now, identity),
                Reach::NotReady => self.not_ready(),
                Reach::NotPrimary => self.not_primary(now),
                Reach::Refused => self.fail(now, Signal::Probe, HostState::FailingOver),
                Reach::Silent => self.fail(now, Signal::Probe, HostState::Down),
                // why: the server closed the probe session, which is no sign; what follows is not known.
                Reach::Unknown => None,
            },
            Evidence::NotReady => self.not_ready(),
            Evidence::NotPrimary => self.not_primary(now),
            Evidence::Reset { signal } => {
                let signal = self.suspect.map_or(signal, |s| s.signal);
                let ended = if self.live() && self.may_end(now) { Some(self.end_epoch(now, signal)) } else { None };
                self.suspect = None;
                self.fails = 0;
                self.oks = 0;
                // why: the address answered (with RST); until the confirming probe says more, nothing
                // new is sent to whatever node now holds it.
                self.state = HostState::FailingOver;
                ended
            }
            Evidence::Sign { signal } => {
                if self.state == HostState::Up {
                    self.state = HostState::Suspect;
                    self.suspect = Some(Suspect { since: now, signal, kind: Suspicion::Move });
                }
                None
            }
            Evidence::Admin => Some(self.declared(now, Signal::Admin)),
            Evidence::Reload => Some(self.declared(now, Signal::Reload)),
        }
    }

    /// A failover said by someone else (the cluster manager, a reload): the epoch ends at once; a suspicion
    /// is settled by it.
    fn declared(&mut self, now: Instant, signal: Signal) -> Failover {
        let mut f = self.end_epoch(now, signal);
        if signal == Signal::Reload {
            // why: a reload's failover is decided, not detected: no time passed between a sign and it.
            f.detection = Duration::ZERO;
        }
        if self.state == HostState::Suspect {
            self.state = HostState::Up;
        }
        f
    }

    fn ok(&mut self, now: Instant, at: Instant, identity: Option<String>) -> Option<Failover> {
        if let Some(Suspect { since, .. }) = self.suspect
            && at < since
        {
            // why: an ACK older than the sign says nothing about whether the sign was a move.
            return None;
        }
        self.fails = 0;
        self.oks = self.oks.saturating_add(1);
        self.reached = true;
        let mut ended = None;
        if let Some(new) = identity {
            if let Some(old) = &self.identity
                && *old != new
                && self.state.connectable()
                && self.may_end(now)
            {
                ended = Some(self.end_epoch(now, Signal::Identity));
            }
            self.identity = Some(new);
        }
        match self.state {
            HostState::Up | HostState::Suspect => {
                self.state = HostState::Up;
                self.suspect = None;
                self.last_good = self.last_good.max(at);
                self.serving = true;
            }
            HostState::FailingOver | HostState::Down | HostState::NotReady => {
                if self.oks >= self.rise {
                    self.state = HostState::Up;
                    self.last_good = at;
                    self.serving = true;
                }
            }
        }
        ended
    }

    fn fail(&mut self, now: Instant, signal: Signal, bad: HostState) -> Option<Failover> {
        self.oks = 0;
        self.fails = self.fails.saturating_add(1);
        // why: a move shows as a reset, not as silence or refusals: whatever was suspected, what is
        // confirmed now is the host going away, and sessions made from now on reach the failing node.
        if let Some(s) = &mut self.suspect {
            s.kind = Suspicion::GoingAway;
        }
        if !self.reached {
            // why: a host never reached since start has no sessions to lose and did not move: saying
            // "failover" would send the operator looking for a takeover instead of at the address.
            self.state = bad;
            self.suspect = None;
            return None;
        }
        let live = self.live();
        match self.state {
            _ if live && self.fails >= self.fall => {
                let signal = self.suspect.map_or(signal, |s| s.signal);
                let f = if self.may_end(now) { Some(self.end_epoch(now, signal)) } else { None };
                self.suspect = None;
                self.state = bad;
                f
            }
            HostState::Up | HostState::Suspect if live => {
                if self.suspect.is_none() {
                    self.suspect = Some(Suspect { since: now, signal, kind: Suspicion::GoingAway });
                }
                self.state = HostState::Suspect;
                None
            }
            // why: a node of this epoch that stopped being ready and now fails too: count toward `fall`, but
            // keep clients held (a suspicion would let them connect).
            _ if live => {
                if self.suspect.is_none() {
                    self.suspect = Some(Suspect { since: now, signal, kind: Suspicion::GoingAway });
                }
                None
            }
            _ => {
                self.state = bad;
                None
            }
        }
    }

    /// The node answers, but not ready: clients are held until `rise` good exchanges; no epoch ends.
    fn not_ready(&mut self) -> Option<Failover> {
        self.oks = 0;
        self.suspect = None;
        self.state = HostState::NotReady;
        None
    }

    /// The node answers in another role than required: if the sessions of this epoch are on it, they end
    /// (signal `role`); either way clients are held until `rise` exchanges find it in the role again.
    fn not_primary(&mut self, now: Instant) -> Option<Failover> {
        // why: in a split brain the two nodes may answer in turn in two roles: damped like any detection.
        let ended = if self.live() && self.may_end(now) {
            // why: sessions made while a move was suspected reached this node too: a node in the wrong role
            // is no new node to hand them to, so they end with the epoch.
            self.suspect = None;
            Some(self.end_epoch(now, Signal::Role))
        } else {
            None
        };
        self.not_ready();
        ended
    }

    /// Whether sessions of the current epoch may be live on the host: it is up, or it was up in this epoch
    /// and has since stopped being ready.
    fn live(&self) -> bool {
        self.reached && (self.state.connectable() || (self.state == HostState::NotReady && self.serving))
    }

    fn after_confirm(&mut self, now: Instant, confirm: Reach, identity: Option<String>) {
        self.fails = 0;
        self.oks = 0;
        match confirm {
            Reach::Ready => {
                self.oks = 1;
                self.reached = true;
                if identity.is_some() {
                    self.identity = identity;
                }
                self.state = if self.rise <= 1 { HostState::Up } else { HostState::FailingOver };
                if self.state == HostState::Up {
                    self.last_good = now;
                    self.serving = true;
                }
            }
            Reach::NotReady | Reach::NotPrimary => self.state = HostState::NotReady,
            Reach::Refused => self.state = HostState::FailingOver,
            Reach::Silent => self.state = HostState::Down,
            // why: the epoch ended on a reset or a move, and this host could not reach whoever holds the
            // address now: new clients wait until a probe says more, as after a reset.
            Reach::Unknown => self.state = HostState::FailingOver,
        }
    }

    fn end_epoch(&mut self, now: Instant, signal: Signal) -> Failover {
        // why: after a reload, sessions made while a sign was being confirmed reached the old address.
        let takes_provisional = self.suspecting_a_move() && signal != Signal::Reload;
        self.epoch += 1;
        self.last_end = Some(now);
        self.serving = false;
        self.suspect = None;
        self.fails = 0;
        // why: the old node's name belongs to the old epoch; the next name seen is the new node's, not a
        // second failover.
        self.identity = None;
        let f = Failover {
            epoch: self.epoch,
            signal,
            detection: now.saturating_duration_since(self.last_good),
            at: now,
            takes_provisional,
        };
        self.last_good = now;
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(at: Instant) -> Evidence {
        Evidence::Ok { at, identity: None }
    }
    fn silent() -> Evidence {
        Evidence::Silent { signal: Signal::Probe }
    }
    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn fall_then_rise() {
        let mut m = Machine::new(3, 2, Instant::now());
        tokio::time::advance(S).await;
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        let good = Instant::now();
        for _ in 0..2 {
            tokio::time::advance(S).await;
            assert_eq!(m.observe(Instant::now(), silent()), None);
            assert_eq!(m.state(), HostState::Suspect);
        }
        tokio::time::advance(S).await;
        let f = m.observe(Instant::now(), silent()).expect("third failure ends the epoch");
        assert_eq!((f.epoch, f.signal, f.detection), (2, Signal::Probe, Duration::from_secs(3)));
        assert_eq!(Instant::now() - good, f.detection);
        assert_eq!(m.state(), HostState::Down);
        // rise = 2: one success is not enough, and coming back does not start another epoch.
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!(m.state(), HostState::Down);
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_never_reached_since_start_fails_no_epoch_until_it_answers() {
        let mut m = Machine::new(1, 1, Instant::now());
        assert!(!m.reached());
        assert_eq!(m.observe(Instant::now(), Evidence::Refused), None);
        assert_eq!((m.state(), m.epoch()), (HostState::FailingOver, 1));
        assert_eq!(m.observe(Instant::now(), silent()), None);
        assert_eq!(m.observe(Instant::now(), Evidence::Sign { signal: Signal::SessionReset }), None);
        assert_eq!(
            m.observe(
                Instant::now(),
                Evidence::Moved { signal: Signal::Neighbor, confirm: Reach::Refused, identity: None }
            ),
            None
        );
        assert_eq!((m.state(), m.epoch()), (HostState::FailingOver, 1));
        tokio::time::advance(S).await;
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None, "coming up at last is no failover");
        assert_eq!((m.state(), m.epoch(), m.reached()), (HostState::Up, 1, true));
        // Once reached, going away is a failover.
        let f = m.observe(Instant::now(), Evidence::Refused).expect("a host that answered and went away");
        assert_eq!((f.epoch, m.state()), (2, HostState::FailingOver));
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_to_a_node_that_is_not_ready_is_one_failover_and_holds_until_rise() {
        let mut m = Machine::new(1, 2, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        let moved = Evidence::Moved { signal: Signal::Probe, confirm: Reach::NotReady, identity: None };
        assert_eq!(m.observe(Instant::now(), moved).map(|f| f.epoch), Some(2));
        assert!(!m.state().connectable(), "clients are held");
        for _ in 0..20 {
            assert_eq!(m.observe(Instant::now(), Evidence::NotReady), None);
            assert_eq!(m.state(), HostState::NotReady);
        }
        // rise = 2: two good exchanges make it up, in the same epoch.
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!(m.state(), HostState::NotReady);
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_stops_being_ready_ends_nothing_until_it_goes_away() {
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        assert_eq!(m.observe(Instant::now(), Evidence::NotReady), None);
        assert_eq!((m.state(), m.epoch()), (HostState::NotReady, 1));
        // Back to ready: same epoch.
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 1));
        // Not ready, then gone: the sessions of this epoch were on it, so that ends the epoch.
        m.observe(Instant::now(), Evidence::NotReady);
        let f = m.observe(Instant::now(), silent()).expect("a serving node that went away");
        assert_eq!((f.epoch, m.state()), (2, HostState::Down));
        // After a move, a not-ready node that goes away again is no second failover.
        m.observe(Instant::now(), Evidence::NotReady);
        assert_eq!(m.observe(Instant::now(), Evidence::Refused), None);
        assert_eq!(m.epoch(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_split_brain_ends_at_most_one_epoch_per_window() {
        let w = Duration::from_secs(10);
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        let moved = || Evidence::Moved { signal: Signal::Neighbor, confirm: Reach::Ready, identity: None };
        let reset = || Evidence::Reset { signal: Signal::Neighbor };
        assert_eq!(m.observe(Instant::now(), moved()).map(|f| f.epoch), Some(2));
        m.split_brain(Instant::now(), w);
        // Every flap within the window: the probe connection reset, the address answering again.
        for i in 0..19 {
            tokio::time::advance(Duration::from_millis(500)).await;
            let ev = if i % 2 == 0 { reset() } else { moved() };
            assert_eq!(m.observe(Instant::now(), ev), None, "flap {i} held back");
            m.observe(Instant::now(), ok(Instant::now()));
            assert!(m.state().connectable());
        }
        assert_eq!((m.epoch(), m.damped()), (2, 19));
        // A window after the last epoch end, one more may end (the flag is renewed by the flapping).
        m.split_brain(Instant::now(), w);
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(m.observe(Instant::now(), reset()).map(|f| f.epoch), Some(3));
        m.observe(Instant::now(), ok(Instant::now()));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(m.observe(Instant::now(), silent()), None, "silence too is held back");
        // Declared failovers are not damped.
        assert_eq!(m.observe(Instant::now(), Evidence::Admin).map(|f| f.epoch), Some(4));
        // Once the split brain is over, every move ends its epoch again.
        tokio::time::advance(w).await;
        m.observe(Instant::now(), ok(Instant::now()));
        assert!(!m.damping(Instant::now()));
        assert_eq!(m.observe(Instant::now(), reset()).map(|f| f.epoch), Some(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_primary_that_becomes_a_replica_ends_its_epoch_once_and_holds_until_it_is_primary_again() {
        let mut m = Machine::new(1, 2, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        tokio::time::advance(S).await;
        let f = m.observe(Instant::now(), Evidence::NotPrimary).expect("the sessions were made to the primary");
        assert_eq!((f.epoch, f.signal, f.detection), (2, Signal::Role, S));
        assert_eq!(m.state(), HostState::NotReady);
        assert!(!m.state().connectable(), "new clients are held");
        for _ in 0..10 {
            assert_eq!(m.observe(Instant::now(), Evidence::NotPrimary), None, "still a replica: no second failover");
            assert_eq!(m.state(), HostState::NotReady);
        }
        // rise = 2: primary again after two exchanges, in the epoch the demotion began.
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!(m.state(), HostState::NotReady);
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 2));
        // Demoted again: the sessions of epoch 2 end.
        assert_eq!(
            m.observe(Instant::now(), Evidence::NotPrimary).map(|f| (f.epoch, f.signal)),
            Some((3, Signal::Role))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_since_start_or_after_a_move_is_no_role_failover() {
        let mut m = Machine::new(1, 1, Instant::now());
        assert_eq!(m.observe(Instant::now(), Evidence::NotPrimary), None, "nothing was made to it");
        assert_eq!((m.state(), m.epoch()), (HostState::NotReady, 1));
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None, "promoted: served, no failover");
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 1));
        // A silent move to a standby: the move ends the epoch; the standby found by the confirmation holds
        // clients and ends nothing more; its promotion serves them in the new epoch.
        let moved = Evidence::Moved { signal: Signal::Probe, confirm: Reach::NotPrimary, identity: None };
        assert_eq!(m.observe(Instant::now(), moved).map(|f| (f.epoch, f.signal)), Some((2, Signal::Probe)));
        assert_eq!(m.state(), HostState::NotReady);
        assert_eq!(m.observe(Instant::now(), Evidence::NotPrimary), None);
        let f = m.observe(Instant::now(), Evidence::Reset { signal: Signal::Probe });
        assert_eq!(f, None, "a reset of a session to a node that served nothing ends nothing");
        assert_eq!(m.observe(Instant::now(), Evidence::Closed { confirm: Reach::NotPrimary, identity: None }), None);
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_role_failover_ends_the_sessions_made_while_a_move_was_suspected() {
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        m.observe(Instant::now(), Evidence::Sign { signal: Signal::SessionReset });
        assert_eq!(m.join(), Join::Next);
        let f = m.observe(Instant::now(), Evidence::NotPrimary).expect("demoted");
        assert_eq!(f.signal, Signal::Role);
        assert!(!f.takes_provisional, "they reached the demoted node too");
        // The server closing the probe connection of a node that then answers as a replica is the same.
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        let f = m.observe(Instant::now(), Evidence::Closed { confirm: Reach::NotPrimary, identity: None });
        assert_eq!(f.map(|f| (f.epoch, f.signal)), Some((2, Signal::Role)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_never_ready_since_start_is_no_failover() {
        let mut m = Machine::new(1, 1, Instant::now());
        assert_eq!(m.observe(Instant::now(), Evidence::NotReady), None);
        assert_eq!(m.observe(Instant::now(), Evidence::Refused), None);
        assert_eq!(m.observe(Instant::now(), Evidence::NotReady), None);
        assert_eq!((m.state(), m.epoch(), m.reached()), (HostState::NotReady, 1, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_ends_the_epoch_at_once_and_holds_clients_until_the_confirmation() {
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        let f = m.observe(Instant::now(), Evidence::Reset { signal: Signal::Probe }).unwrap();
        assert_eq!((f.epoch, m.state()), (2, HostState::FailingOver));
        assert!(!m.state().connectable());
        // The confirmation: the new node is not ready, then ready; no second failover.
        assert_eq!(m.observe(Instant::now(), Evidence::NotReady), None);
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspicion_of_a_host_going_away_hands_out_no_next_epoch() {
        // Regression: with fall = 2, one silence made sessions join the next epoch, and the failover that
        // the second silence decided (the old node gone, not a move) handed it to them: sessions opened to
        // the degraded node outlived it.
        let mut m = Machine::new(2, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        assert_eq!(m.observe(Instant::now(), silent()), None);
        assert_eq!(m.state(), HostState::Suspect);
        assert!(!m.suspecting_a_move());
        assert_eq!(m.join(), Join::Current, "a session made now reaches the degraded node");
        let f = m.observe(Instant::now(), silent()).expect("the second silence ends the epoch");
        assert!(!f.takes_provisional, "the host went away: nothing made during the suspicion reached a new node");
        // The same with refusals.
        let mut m = Machine::new(2, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        m.observe(Instant::now(), Evidence::Refused);
        assert_eq!((m.state(), m.join()), (HostState::Suspect, Join::Current));
        assert!(!m.observe(Instant::now(), Evidence::Refused).expect("fall reached").takes_provisional);
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspected_move_that_the_host_then_fails_is_a_host_going_away() {
        let mut m = Machine::new(2, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        m.observe(Instant::now(), Evidence::Sign { signal: Signal::SessionReset });
        assert!(m.suspecting_a_move());
        assert_eq!(m.join(), Join::Next);
        // A silence is no sign of a move: what is confirmed now is the host going away.
        assert_eq!(m.observe(Instant::now(), silent()), None);
        assert_eq!((m.state(), m.join()), (HostState::Suspect, Join::Current));
        let f = m.observe(Instant::now(), silent()).expect("fall reached");
        assert!(!f.takes_provisional);
        assert_eq!(f.signal, Signal::SessionReset, "the first sign still names the failover");
        // A confirmed move takes the sessions made while it was suspected.
        let mut m = Machine::new(2, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        m.observe(Instant::now(), Evidence::Sign { signal: Signal::SessionReset });
        assert!(m.observe(Instant::now(), Evidence::Reset { signal: Signal::Probe }).unwrap().takes_provisional);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blip_shorter_than_fall_ends_nothing() {
        let mut m = Machine::new(2, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        assert_eq!(m.observe(Instant::now(), silent()), None);
        tokio::time::advance(S).await;
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!(m.observe(Instant::now(), silent()), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Suspect, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_held_session_that_reconnects_is_a_move() {
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        m.good_sign(Instant::now());
        tokio::time::advance(Duration::from_millis(900)).await;
        let f = m
            .observe(Instant::now(), Evidence::Moved { signal: Signal::Probe, confirm: Reach::Ready, identity: None })
            .unwrap();
        assert_eq!((f.epoch, f.signal, f.detection), (2, Signal::Probe, Duration::from_millis(900)));
        assert_eq!(m.state(), HostState::Up);
        // Refused on confirmation: the epoch ends all the same, the service is starting.
        let f = m
            .observe(Instant::now(), Evidence::Moved { signal: Signal::Probe, confirm: Reach::Refused, identity: None })
            .unwrap();
        assert_eq!((f.epoch, m.state()), (3, HostState::FailingOver));
    }

    #[tokio::test(start_paused = true)]
    async fn one_reset_session_does_not_flip_a_healthy_host() {
        let mut m = Machine::new(1, 1, Instant::now());
        tokio::time::advance(S).await;
        assert_eq!(m.observe(Instant::now(), Evidence::Sign { signal: Signal::SessionReset }), None);
        assert_eq!(m.state(), HostState::Suspect);
        // An ACK from before the sign proves nothing...
        let before = Instant::now() - Duration::from_millis(10);
        assert_eq!(m.observe(Instant::now(), ok(before)), None);
        assert_eq!(m.state(), HostState::Suspect);
        // ...one after it clears the suspicion without a failover.
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(m.observe(Instant::now(), ok(Instant::now())), None);
        assert_eq!((m.state(), m.epoch()), (HostState::Up, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirmed_sign_names_the_first_signal() {
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), ok(Instant::now()));
        m.observe(Instant::now(), Evidence::Sign { signal: Signal::SessionReset });
        tokio::time::advance(Duration::from_millis(200)).await;
        let f = m
            .observe(Instant::now(), Evidence::Moved { signal: Signal::Probe, confirm: Reach::Ready, identity: None })
            .unwrap();
        assert_eq!(f.signal, Signal::SessionReset);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_identity_is_a_failover_even_when_nothing_broke() {
        let mut m = Machine::new(1, 1, Instant::now());
        let id = |s: &str| Evidence::Ok { at: Instant::now(), identity: Some(s.into()) };
        assert_eq!(m.observe(Instant::now(), id("node1")), None);
        assert_eq!(m.observe(Instant::now(), id("node1")), None);
        tokio::time::advance(S).await;
        let f = m.observe(Instant::now(), id("node2")).unwrap();
        assert_eq!((f.epoch, f.signal), (2, Signal::Identity));
        assert_eq!((m.identity(), m.state()), (Some("node2"), HostState::Up));
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_is_one_failover_even_when_the_new_node_names_itself_later() {
        let mut m = Machine::new(1, 1, Instant::now());
        let id = |s: &str| Evidence::Ok { at: Instant::now(), identity: Some(s.into()) };
        m.observe(Instant::now(), id("node1"));
        let moved = Evidence::Moved { signal: Signal::Probe, confirm: Reach::Ready, identity: None };
        assert_eq!(m.observe(Instant::now(), moved).map(|f| f.epoch), Some(2));
        assert_eq!(m.observe(Instant::now(), id("node2")), None, "the new node's name is adopted, not a second move");
        assert_eq!((m.epoch(), m.identity()), (2, Some("node2")));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_by_the_server_then_back_is_not_a_failover() {
        let mut m = Machine::new(1, 1, Instant::now());
        assert_eq!(m.observe(Instant::now(), Evidence::Closed { confirm: Reach::Ready, identity: None }), None);
        assert_eq!(m.epoch(), 1);
        let f = m.observe(Instant::now(), Evidence::Closed { confirm: Reach::Refused, identity: None });
        assert_eq!(f.map(|f| f.epoch), Some(2));
        assert_eq!(m.state(), HostState::FailingOver);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_this_host_could_not_make_says_nothing_of_the_host() {
        assert_eq!(Reach::from(ConnectClass::AddrUnavailable), Reach::Unknown);
        assert_eq!(Reach::from(ConnectClass::Exhausted), Reach::Unknown);
        let mut m = Machine::new(1, 1, Instant::now());
        m.observe(Instant::now(), Evidence::Ok { at: Instant::now(), identity: None });
        let unknown = || Evidence::Closed { confirm: Reach::Unknown, identity: None };
        for state in [HostState::Up, HostState::Suspect] {
            if state == HostState::Suspect {
                m.observe(Instant::now(), Evidence::Sign { signal: Signal::SessionReset });
            }
            for _ in 0..3 {
                assert_eq!(m.observe(Instant::now(), unknown()), None);
            }
            assert_eq!((m.state(), m.epoch()), (state, 1));
        }
        // A move is decided by its own signal; where the address went is then not known: clients wait.
        let moved = Evidence::Moved { signal: Signal::Neighbor, confirm: Reach::Unknown, identity: None };
        assert_eq!(m.observe(Instant::now(), moved).map(|f| f.epoch), Some(2));
        assert_eq!(m.state(), HostState::FailingOver);
    }

    #[tokio::test(start_paused = true)]
    async fn admin_ends_the_epoch_at_once_and_epochs_count_up() {
        let mut m = Machine::new(1, 1, Instant::now());
        for want in 2..5 {
            let f = m.observe(Instant::now(), Evidence::Admin).unwrap();
            assert_eq!((f.epoch, f.signal), (want, Signal::Admin));
        }
        assert_eq!(m.state(), HostState::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_to_another_address_ends_the_epoch_and_keeps_the_rest() {
        let mut m = Machine::new(1, 1, Instant::now());
        let id = |s: &str| Evidence::Ok { at: Instant::now(), identity: Some(s.into()) };
        m.observe(Instant::now(), id("node1"));
        m.set_thresholds(3, 2);
        let f = m.observe(Instant::now(), Evidence::Reload).unwrap();
        assert_eq!((f.epoch, f.signal, m.state()), (2, Signal::Reload, HostState::Up));
        // The new fall count applies: two silences only suspect.
        for _ in 0..2 {
            assert_eq!(m.observe(Instant::now(), silent()), None);
        }
        assert_eq!((m.state(), m.epoch()), (HostState::Suspect, 2));
        assert!(m.observe(Instant::now(), silent()).is_some());
        assert_eq!(m.state(), HostState::Down);
        // The probe turned off: up again, no failover.
        m.assume_up(Instant::now());
        assert_eq!((m.state(), m.epoch(), m.suspect.is_some()), (HostState::Up, 3, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_identity_is_adopted_not_a_move() {
        let mut m = Machine::new(1, 1, Instant::now());
        let id = |s: &str| Evidence::Ok { at: Instant::now(), identity: Some(s.into()) };
        m.observe(Instant::now(), id("node1"));
        m.forget_identity();
        assert_eq!(m.observe(Instant::now(), id("db-node1.example")), None);
        assert_eq!((m.epoch(), m.identity()), (1, Some("db-node1.example")));
    }
}
