//! The detector without its I/O, for tests, and a deterministic simulation of it. A `Shell` feeds evidence
//! to a `Machine` and moves a `HostView`'s tokens on with `settle_tokens`, as `Detector::publish` does, so
//! the tokens sessions take (`HostView::epoch_for_new_session`) can be followed through any schedule.
//!
//! The simulation runs seeded random schedules (evidence of every kind, clock steps, sessions connecting
//! and leaving, reloads) and checks after every step: the epoch only grows, by one, exactly when a failover
//! is returned; a good probe ends an epoch only on a new identity, a sign or a not-ready node never, and a
//! host never reached only when declared; a new session never takes an ended epoch's token; every session
//! of an ended epoch is ended and no other is, where a session made while a move was suspected belongs to
//! the new epoch only if a move (by the evidence, the model's own word) ended the old one; `connectable()`
//! only in `up` and `suspect`; while a split brain is damped, no two epochs end by detection within its
//! window. A failure names its seed, step and the steps before it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Evidence, Failover, HostState, HostView, Join, Machine, Reach, settle_tokens};
use crate::metrics::Signal;

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
            split_brain: false,
            role: None,
        };
        Shell { machine: Machine::new(fall, rise, now), view, linked: Vec::new() }
    }

    /// One piece of evidence, published.
    pub(crate) fn observe(&mut self, now: Instant, ev: Evidence) -> Option<Failover> {
        let f = self.machine.observe(now, ev);
        self.publish(f.as_ref());
        f
    }

    /// The probe turned off, published.
    pub(crate) fn assume_up(&mut self, now: Instant) {
        self.machine.assume_up(now);
        self.publish(None);
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

/// One step of a schedule besides the clock.
#[derive(Debug, Clone)]
enum Action {
    Evidence(Evidence),
    /// A client session is connected (only while the view says the host is connectable).
    Connect,
    /// A session ends by itself (its client left): the one at this index, modulo their number.
    Leave(usize),
    /// An ACK on the probe connection this long ago.
    GoodSign(Duration),
    /// A reload with new fall and rise counts.
    Thresholds(u32, u32),
    /// A reload with a new identity pattern.
    ForgetIdentity,
    /// The probe turned off.
    AssumeUp,
    /// A split brain seen: epoch ends damped for this long.
    SplitBrain(Duration),
}

/// How many kinds of action a schedule draws from (see `draw`).
const KINDS: usize = 18;

/// A session of the model: the token it took and the epoch it belongs to.
struct Session {
    token: CancellationToken,
    /// The epoch current when it connected.
    joined: u64,
    /// The epoch it belongs to; `None` while it waits on a suspected move (`Join::Next`): the move
    /// confirmed puts it in `joined + 1`, anything else in `joined`.
    home: Option<u64>,
}

/// Whether a failover decided on `ev` is a move to another node (so sessions made while it was suspected
/// reached the new node), by the evidence alone: the model's own word, not the machine's.
fn is_move(ev: &Evidence) -> bool {
    match ev {
        Evidence::Moved { .. } | Evidence::Reset { .. } | Evidence::Admin => true,
        // An identity change: a new node answers.
        Evidence::Ok { .. } => true,
        Evidence::Closed { confirm, .. } => *confirm == Reach::Ready,
        Evidence::Silent { .. } | Evidence::Refused | Evidence::NotReady | Evidence::Sign { .. } => false,
        // A node in the wrong role is the same node, not a new one.
        Evidence::NotPrimary => false,
        Evidence::Reload => false,
    }
}

/// Runs one seeded schedule of `steps` steps and checks the invariants after each.
struct Run {
    seed: u64,
    rng: fastrand::Rng,
    weights: [u32; KINDS],
    shell: Shell,
    now: Instant,
    sessions: Vec<Session>,
    trace: std::collections::VecDeque<(u64, Duration, Action)>,
    step: u64,
    seen: Seen,
    /// The model's own record of a split brain: until when, and its window.
    damp: Option<(Instant, Duration)>,
    /// When the last epoch ended.
    last_end: Option<Instant>,
}

/// What a run went through, to show the schedules reach the cases the invariants are about.
#[derive(Debug, Default)]
struct Seen {
    failovers: u64,
    /// Failovers that handed the provisional token to the new epoch.
    took_provisional: u64,
    /// Sessions that joined a suspected move's next epoch.
    provisional: u64,
    /// Sessions ended by a failover.
    ended: u64,
    /// Epoch ends a split brain held back.
    damped: u64,
}

impl Seen {
    fn add(&mut self, o: &Seen) {
        self.failovers += o.failovers;
        self.took_provisional += o.took_provisional;
        self.provisional += o.provisional;
        self.ended += o.ended;
        self.damped += o.damped;
    }
}

impl Run {
    fn new(seed: u64, start: Instant) -> Run {
        let mut rng = fastrand::Rng::with_seed(seed);
        // why: a schedule of its own mix per seed reaches regimes a uniform one rarely does (long runs of
        // silence, a flapping node, many suspicions in one epoch).
        let mut weights = [0; KINDS];
        for w in &mut weights {
            *w = rng.u32(0..=4);
        }
        weights[0] += 1;
        let (fall, rise) = (rng.u32(1..=4), rng.u32(1..=3));
        Run {
            seed,
            rng,
            weights,
            shell: Shell::new(fall, rise, start),
            now: start,
            sessions: Vec::new(),
            trace: std::collections::VecDeque::new(),
            step: 0,
            seen: Seen::default(),
            damp: None,
            last_end: None,
        }
    }

    fn identity(&mut self) -> Option<String> {
        match self.rng.u8(0..4) {
            0 => None,
            n => Some(format!("node{n}")),
        }
    }

    fn reach(&mut self) -> Reach {
        [Reach::Ready, Reach::NotReady, Reach::NotPrimary, Reach::Refused, Reach::Silent, Reach::Unknown]
            [self.rng.usize(0..6)]
    }

    fn signal(&mut self) -> Signal {
        [Signal::Probe, Signal::Keepalive, Signal::SessionReset, Signal::Neighbor][self.rng.usize(0..4)]
    }

    fn draw(&mut self) -> Action {
        let total: u32 = self.weights.iter().sum();
        let mut pick = self.rng.u32(0..total);
        let mut kind = 0;
        while pick >= self.weights[kind] {
            pick -= self.weights[kind];
            kind += 1;
        }
        let ago = Duration::from_millis(self.rng.u64(0..1500));
        match kind {
            0 => Action::Evidence(Evidence::Ok { at: self.now.checked_sub(ago).unwrap_or(self.now), identity: None }),
            1 => {
                let identity = self.identity();
                Action::Evidence(Evidence::Ok { at: self.now, identity })
            }
            2 => Action::Evidence(Evidence::Silent { signal: self.signal() }),
            3 => Action::Evidence(Evidence::Refused),
            4 if self.rng.bool() => Action::Evidence(Evidence::NotReady),
            4 => Action::Evidence(Evidence::NotPrimary),
            5 => Action::Evidence(Evidence::Reset { signal: self.signal() }),
            6 => {
                let (signal, confirm, identity) = (self.signal(), self.reach(), self.identity());
                Action::Evidence(Evidence::Moved { signal, confirm, identity })
            }
            7 => {
                let (confirm, identity) = (self.reach(), self.identity());
                Action::Evidence(Evidence::Closed { confirm, identity })
            }
            8 => Action::Evidence(Evidence::Sign { signal: self.signal() }),
            9 => Action::Evidence(Evidence::Admin),
            10 => Action::Evidence(Evidence::Reload),
            11 | 12 => Action::Connect,
            13 => Action::Leave(self.rng.usize(..)),
            14 => Action::GoodSign(ago),
            15 => match self.rng.u8(0..3) {
                0 => Action::Thresholds(self.rng.u32(1..=4), self.rng.u32(1..=3)),
                1 => Action::ForgetIdentity,
                _ => Action::AssumeUp,
            },
            16 => Action::SplitBrain(Duration::from_millis(self.rng.u64(500..20_000))),
            _ => Action::Evidence(Evidence::Silent { signal: Signal::Probe }),
        }
    }

    /// Fails the run, with what led to it.
    fn broken(&self, what: &str) -> ! {
        let trace: Vec<String> =
            self.trace.iter().map(|(step, dt, a)| format!("  step {step} (+{}ms): {a:?}", dt.as_millis())).collect();
        panic!(
            "seed {} step {}: {what}\nmachine: {:?}\nview: state {:?} epoch {} next token {}\nlast steps:\n{}\nrerun: \
             STAYBOUND_SIM_SEED={} STAYBOUND_SIM_STEPS={} cargo test --lib sim -- --nocapture",
            self.seed,
            self.step,
            self.shell.machine,
            self.shell.view.state,
            self.shell.view.epoch,
            self.shell.view.next_epoch_end.is_some(),
            trace.join("\n"),
            self.seed,
            self.step + 1,
        )
    }

    fn one_step(&mut self) {
        let dt = match self.rng.u8(0..4) {
            0 => Duration::ZERO,
            1 => Duration::from_millis(self.rng.u64(0..100)),
            2 => Duration::from_millis(self.rng.u64(100..1500)),
            _ => Duration::from_millis(self.rng.u64(0..10_000)),
        };
        self.now += dt;
        let action = self.draw();
        if self.trace.len() == 24 {
            self.trace.pop_front();
        }
        self.trace.push_back((self.step, dt, action.clone()));

        let m = &self.shell.machine;
        let (epoch, join, reached, identity) = (m.epoch(), m.join(), m.reached(), m.identity().map(String::from));
        let state = m.state();
        let mut failover = None;
        match action {
            Action::Evidence(ev) => {
                let decisive = is_move(&ev);
                let f = self.shell.observe(self.now, ev.clone());
                if matches!(ev, Evidence::Closed { confirm: Reach::Unknown, .. })
                    && (f.is_some() || self.shell.machine.state() != state)
                {
                    self.broken("an attempt this host could not make changed what the machine says of the host");
                }
                if let Some(f) = &f {
                    match &ev {
                        Evidence::Ok { identity: Some(new), .. }
                        | Evidence::Closed { confirm: Reach::Ready, identity: Some(new) }
                            if identity.as_ref().is_some_and(|old| old != new) => {}
                        Evidence::Ok { .. } | Evidence::Closed { confirm: Reach::Ready, .. } => {
                            self.broken("a good probe ended an epoch though the identity did not change")
                        }
                        Evidence::NotReady | Evidence::Sign { .. } => self.broken("a sign alone ended an epoch"),
                        Evidence::Admin | Evidence::Reload => {}
                        _ if !reached => self.broken("a host never reached since start failed over"),
                        _ => {}
                    }
                    if f.takes_provisional && join != Join::Next {
                        self.broken("a failover took provisional sessions where no move was suspected");
                    }
                    if f.takes_provisional && !decisive {
                        self.broken("a failover that is no move took the sessions made while it was suspected");
                    }
                    if join == Join::Next && decisive && !f.takes_provisional && !matches!(ev, Evidence::Reload) {
                        self.broken("a confirmed move ended the sessions made while it was suspected");
                    }
                }
                if matches!(ev, Evidence::Admin | Evidence::Reload) && f.is_none() {
                    self.broken("a declared failover was not one");
                }
                if let Some(f) = &f
                    && !matches!(ev, Evidence::Admin | Evidence::Reload)
                    && let Some((until, window)) = self.damp
                    && self.now < until
                    && self.last_end.is_some_and(|t| self.now.saturating_duration_since(t) < window)
                {
                    let _ = f;
                    self.broken("a split brain was damped, yet two epochs ended by detection within its window");
                }
                if f.is_some() {
                    self.last_end = Some(self.now);
                }
                if let Some(f) = &f {
                    self.seen.failovers += 1;
                    self.seen.took_provisional += u64::from(f.takes_provisional);
                }
                failover = f.map(|f| (f, decisive));
            }
            Action::Connect => {
                if self.shell.view.state.connectable() {
                    let token = self.shell.session();
                    if token.is_cancelled() {
                        self.broken("a new session joined an epoch that has ended");
                    }
                    let provisional = join == Join::Next && self.shell.view.next_epoch_end.is_some();
                    if join == Join::Next && !provisional && self.shell.linked.len() < super::MAX_LINKED {
                        self.broken("a move is suspected but the view has no provisional token");
                    }
                    let home = if provisional { None } else { Some(epoch) };
                    self.seen.provisional += u64::from(provisional);
                    if self.sessions.len() < 48 {
                        self.sessions.push(Session { token, joined: epoch, home });
                    }
                }
            }
            Action::Leave(i) => {
                if !self.sessions.is_empty() {
                    let n = self.sessions.len();
                    self.sessions.swap_remove(i % n);
                }
            }
            Action::GoodSign(ago) => self.shell.machine.good_sign(self.now.checked_sub(ago).unwrap_or(self.now)),
            Action::Thresholds(fall, rise) => self.shell.machine.set_thresholds(fall, rise),
            Action::ForgetIdentity => self.shell.machine.forget_identity(),
            Action::AssumeUp => self.shell.assume_up(self.now),
            Action::SplitBrain(window) => {
                self.shell.machine.split_brain(self.now, window);
                self.damp = Some((self.now + window, window));
            }
        }
        self.check(epoch, failover);
        self.step += 1;
    }

    /// The invariants after a step that began in `before` and decided `failover` (with whether the
    /// evidence was a move).
    fn check(&mut self, before: u64, failover: Option<(Failover, bool)>) {
        let m = &self.shell.machine;
        let (epoch, state, join) = (m.epoch(), m.state(), m.join());
        if epoch < before {
            self.broken("the epoch went back");
        }
        if epoch > before + 1 {
            self.broken("the epoch grew by more than one in a step");
        }
        match &failover {
            Some((f, _)) if f.epoch != epoch || epoch != before + 1 => {
                self.broken("a failover was returned without the epoch growing to it")
            }
            None if epoch != before => self.broken("the epoch grew without a failover"),
            _ => {}
        }
        if state.connectable() != matches!(state, HostState::Up | HostState::Suspect) {
            self.broken("connectable() disagrees with the state");
        }
        if join == Join::Next && state != HostState::Suspect {
            self.broken("sessions join the next epoch while no move is suspected");
        }
        if (self.shell.view.state, self.shell.view.epoch) != (state, epoch) {
            self.broken("the view is not the machine's");
        }
        if self.shell.view.epoch_end.is_cancelled() {
            self.broken("the current epoch's token is cancelled");
        }
        // Where each session belongs now.
        for s in &mut self.sessions {
            if s.home.is_none() {
                s.home = match &failover {
                    Some((_, true)) => Some(s.joined + 1),
                    Some((_, false)) => Some(s.joined),
                    // The suspicion cleared, or turned into one of the host going away: it is of this epoch.
                    None if join == Join::Current => Some(s.joined),
                    None => None,
                };
            }
        }
        for s in &self.sessions {
            let ended = s.home.is_some_and(|home| home < epoch);
            if ended && !s.token.is_cancelled() {
                self.broken(&format!(
                    "a session of epoch {} (joined in {}) is live in epoch {epoch}",
                    s.home.unwrap_or_default(),
                    s.joined
                ));
            }
            if !ended && s.token.is_cancelled() {
                self.broken(&format!("a session of the current epoch {epoch} (joined in {}) was ended", s.joined));
            }
        }
        let live = self.sessions.len();
        self.sessions.retain(|s| !s.token.is_cancelled());
        self.seen.ended += (live - self.sessions.len()) as u64;
    }
}

/// Steps run by default: enough for CI to catch a broken invariant quickly.
const DEFAULT_STEPS: u64 = 20_000;
/// Steps per seed: each seed draws its own fall, rise and mix of actions.
const STEPS_PER_SEED: u64 = 1_000;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().replace('_', "").parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// Seeded random schedules of evidence, clock steps, sessions and reloads; the invariants hold after
/// every step. `STAYBOUND_SIM_STEPS` sets the total steps (default 20 000; 1 000 000 for a long run),
/// `STAYBOUND_SIM_SEED` the first seed.
#[test]
fn seeded_schedules_keep_the_invariants() {
    let total = env_u64("STAYBOUND_SIM_STEPS").unwrap_or(DEFAULT_STEPS);
    let first = env_u64("STAYBOUND_SIM_SEED").unwrap_or(0);
    let start = Instant::now();
    let began = std::time::Instant::now();
    let (mut done, mut seed, mut seen) = (0, first, Seen::default());
    while done < total {
        let mut run = Run::new(seed, start);
        let steps = STEPS_PER_SEED.min(total - done);
        for _ in 0..steps {
            run.one_step();
        }
        run.seen.damped = run.shell.machine.damped();
        seen.add(&run.seen);
        done += steps;
        seed += 1;
    }
    println!(
        "simulated {done} steps over seeds {first}..{seed} ({} seeds) in {:.2?}: {} failovers ({} taking the \
         sessions of a suspected move), {} sessions on a provisional token, {} sessions ended by a failover, {} epoch ends held back by a split brain",
        seed - first,
        began.elapsed(),
        seen.failovers,
        seen.took_provisional,
        seen.provisional,
        seen.ended,
        seen.damped,
    );
}
