//! Failover detection. One `Detector` task per service owns the host state (`state::Machine`), drives the
//! probe session (`probe`), takes signs from the data path and the admin hook, and publishes a `HostView`
//! on a watch channel. The data path only reads the view: nothing on it decides a failover.
//!
//! With a probe preset (`preset`) the exchange on the probe connection speaks the service's protocol
//! (logging in once per session, over TLS when asked) and says whether the node is ready in the role
//! required; a node serving the epoch that answers in another role ends it (signal `role`).
//!
//! When the upstream goes silent and the neighbour watch is on, the detector also forces the upstream's
//! neighbour entry to be resolved anew (`neighbor::resolve_again`), at most once per probe interval: a
//! takeover whose gratuitous ARP was lost is then found at once instead of after the kernel's own timers.
//!
//! Each epoch carries a cancellation token; ending an epoch cancels it, and every session of that epoch
//! ends at once.
//!
//! A detector lives as long as its service's name: a reload sends it the new settings (`Reconfigure`) and it
//! changes in place (`reconfig` says what a change touches), keeping its epoch, tokens, host state, identity
//! and last failover, so the sessions made before the reload stay under its watch. A new upstream address
//! is a failover (signal `reload`).

pub mod bounds;
mod flaps;
mod knock;
pub mod neighbor;
pub mod preset;
pub mod probe;
mod probe_udp;
mod reconfig;
#[cfg(test)]
mod sim;
mod state;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{KeepaliveConfig, ProbeMode, Protocol, ServiceConfig};
use crate::metrics::{ServiceMetrics, Signal};
use crate::oserror::ConnectClass;
use crate::ratelog::RateLimitedLog;
use crate::sockopt;
use crate::upstream::Connector;
use crate::upstream::retry::Backoff;
use preset::Answer;
use probe::{ExchangeError, ProbeConnEvent, ProbeStream};
pub use state::Failover;
pub(crate) use state::{Evidence, HostState, Join, Machine, Reach};

/// How late a keep-alive's ACK may be and still count as on time.
const ACK_SLACK: Duration = Duration::from_millis(250);

/// How often the probe connection's keep-alive is read while the host is up: often enough that a
/// keep-alive gone unanswered leaves time to ask the address anew before the black-hole bound.
const HOLD_PACE: Duration = Duration::from_millis(250);

/// How long fresh connects may stay unanswered while the probe connection is silent before the upstream's
/// neighbour entry is forced to be resolved anew: on a LAN a connect answers in well under a millisecond, so
/// silence this long means the address does not answer where the entry points.
const FRESH_SILENCE: Duration = Duration::from_millis(200);

/// Most provisional tokens kept for one epoch (see `HostView::next_epoch_end`).
const MAX_LINKED: usize = 256;

/// How often the detector looks for the host while it is away, at first.
const RECOVERY_PACE: Duration = Duration::from_millis(100);
/// How long an outage is looked at that often.
const RECOVERY_FAST: Duration = Duration::from_secs(10);

/// A failover as shown in `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverRecord {
    pub at: SystemTime,
    pub signal: Signal,
    pub detection: Duration,
    pub epoch: u64,
}

/// What the data path and the admin server see of a logical host.
#[derive(Debug, Clone)]
pub struct HostView {
    pub state: HostState,
    pub epoch: u64,
    /// Cancelled when this epoch ends.
    pub epoch_end: CancellationToken,
    /// While a sign of a move is being confirmed (`Join::Next`): the token of the epoch that begins if it is
    /// a move. Sessions connected meanwhile take it: they most likely reached the new node, so a confirmed
    /// move must not end them; if the suspicion clears, they join the current epoch, and a failover that is
    /// no move (the host went away, a reload) ends them with it.
    pub next_epoch_end: Option<CancellationToken>,
    pub identity: Option<Arc<str>>,
    /// When `state` last changed.
    pub since: Instant,
    pub last_failover: Option<FailoverRecord>,
    /// The neighbour-table watch: `watching`, or why it is not.
    pub neighbor: Arc<str>,
    /// Why the host is not up when that is not a failover: it has not answered once since start.
    pub note: Option<Arc<str>>,
    /// The upstream address flaps between two link-layer addresses (two nodes claim it): epochs are damped.
    pub split_brain: bool,
    /// The role the node said it has when a preset asked (`primary`, `replica`, `standby`).
    pub role: Option<Arc<str>>,
}

impl HostView {
    /// The token a session connected now ends with: the provisional one of the next epoch while a move is
    /// being confirmed (`Join::Next`), else the current epoch's.
    pub(crate) fn epoch_for_new_session(&self) -> CancellationToken {
        match (&self.next_epoch_end, self.state) {
            (Some(next), HostState::Suspect) => next.clone(),
            _ => self.epoch_end.clone(),
        }
    }
}

/// Moves a view's epoch tokens on after one step of the machine: `failover` ends the current epoch's
/// sessions (and those of suspicions that cleared, kept in `linked`), and hands the provisional token to the
/// new epoch when it confirms the move its sessions were made under, or ends them with the old one; `join`
/// says whether sessions made from now on take a provisional token. Returns whether the view changed.
pub(crate) fn settle_tokens(
    view: &mut HostView,
    linked: &mut Vec<CancellationToken>,
    failover: Option<&Failover>,
    join: Join,
) -> bool {
    let mut changed = false;
    if let Some(f) = failover {
        view.epoch_end.cancel();
        for t in linked.drain(..) {
            t.cancel();
        }
        if !f.takes_provisional
            && let Some(next) = view.next_epoch_end.take()
        {
            // why: sessions made while the sign was being confirmed reached the old node (or the old address):
            // they end with the old epoch.
            next.cancel();
        }
        view.epoch_end = view.next_epoch_end.take().unwrap_or_default();
        view.epoch = f.epoch;
        changed = true;
    }
    match (join, view.next_epoch_end.is_some()) {
        // why: each cleared suspicion leaves a token until the epoch ends; past the cap new sessions
        // simply join the current epoch, as they would without provisional tokens.
        (Join::Next, false) if linked.len() < MAX_LINKED => {
            view.next_epoch_end = Some(CancellationToken::new());
            changed = true;
        }
        (Join::Current, true) => {
            // The suspicion cleared without a move: its sessions belong to this epoch.
            linked.extend(view.next_epoch_end.take());
            changed = true;
        }
        _ => {}
    }
    changed
}

/// A sign from outside the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// An established session's upstream side was reset.
    SessionReset,
    /// An established session's upstream side timed out (keep-alive or TCP_USER_TIMEOUT).
    SessionTimeout,
    /// A client's connect attempt failed.
    ConnectFailed(ConnectClass),
    /// The neighbour entry of the upstream address changed its link-layer address, seen at this time;
    /// `old` and `new` are fingerprints of the link-layer addresses (`neighbor::fingerprint`); `resolved`:
    /// the change answers a resolution of the entry, not an announcement (`NeighborChange::resolved`).
    Neighbor { seen: Instant, old: u64, new: u64, resolved: bool },
    /// The cluster manager says the host moved.
    Admin,
}

/// The data path's side of a detector: read the view, send signs.
#[derive(Debug, Clone)]
pub struct DetectorHandle {
    pub view: watch::Receiver<HostView>,
    signs: mpsc::Sender<Sign>,
}

impl DetectorHandle {
    /// Reports a sign; never waits. A full queue means the detector is already busy with the same news.
    pub fn sign(&self, sign: Sign) {
        if self.signs.try_send(sign).is_err() {
            debug!(?sign, "sign not queued: the detector is busy");
        }
    }
}

/// The server's side of a detector: new settings on reload.
#[derive(Debug)]
pub(crate) struct Reconfigure(watch::Sender<Arc<ServiceConfig>>);

impl Reconfigure {
    /// Gives the detector new settings; it applies them in place. A stopped detector ignores them.
    pub(crate) fn send(&self, cfg: Arc<ServiceConfig>) {
        self.0.send_replace(cfg);
    }
}

/// The detector of one service.
pub(crate) struct Detector {
    svc: Arc<ServiceConfig>,
    /// The service's connector, shared with the data path (one name cache, one address that last took a
    /// connection); a reload replaces it before the detector hears of the new settings.
    connector: Arc<ArcSwap<Connector>>,
    metrics: Arc<ServiceMetrics>,
    machine: Machine,
    view: watch::Sender<HostView>,
    signs: mpsc::Receiver<Sign>,
    probe_conn: Option<ProbeStream>,
    probe_keepalive: KeepaliveConfig,
    next_check: Instant,
    backoff: Backoff,
    /// A sender into this detector's own sign queue, for the neighbour watch.
    self_signs: mpsc::Sender<Sign>,
    /// Tokens of sessions that connected during a suspicion that cleared: they end with this epoch.
    linked: Vec<CancellationToken>,
    /// When the current sessions began to be made: the last epoch start or return to a connectable state.
    sessions_since: Instant,
    /// Why the node is not ready, when the machine says it is not.
    not_ready: Option<String>,
    /// When a fresh connect last reached the address while the probe connection was silent.
    answered: Option<Instant>,
    /// New settings from a reload.
    settings: watch::Receiver<Arc<ServiceConfig>>,
    /// Stops the neighbour watch of the current upstream (a child of the detector's own stop).
    neighbor_stop: CancellationToken,
    /// The neighbour watch runs for the upstream address (`watching`), so its entry may be resolved anew.
    neighbor_on: bool,
    /// When the upstream's neighbour entry was last forced to be resolved anew.
    resolved_at: Option<Instant>,
    /// When an entry was last deleted for that, until the neighbour change that answers it is seen.
    deleted_at: Option<Instant>,
    /// When the current epoch began.
    epoch_began: Instant,
    /// Forcing a re-resolution was refused (no `CAP_NET_ADMIN`): said once, not tried again.
    resolve_refused: bool,
    /// The link-layer addresses the upstream took lately, to tell a split brain from a move.
    flaps: flaps::Flaps,
    /// A neighbour change being confirmed by the probe connection (`mode = "hold"`).
    confirming: Option<Confirming>,
    /// Knocking was refused (no `CAP_NET_RAW`): said once; the keep-alive confirms instead.
    knock_refused: bool,
    /// Probe connects this host could not make (no local port, address, descriptor or memory), said at most
    /// once a minute.
    local_failures: RateLimitedLog,
}

/// A neighbour change being confirmed by the probe connection: a fresh ACK on it says the address still
/// reaches the node that holds it (nothing moved); its reset says another node has the address.
#[derive(Debug, Clone, Copy)]
struct Confirming {
    /// When the change was seen.
    seen: Instant,
    /// When the probe connection's last ACK came, as read when the change was seen.
    acked: Instant,
    /// Whether the entry was already forced to be resolved anew for this change.
    resolved: bool,
}

impl Detector {
    pub(crate) fn new(
        svc: Arc<ServiceConfig>,
        metrics: Arc<ServiceMetrics>,
        connector: Arc<ArcSwap<Connector>>,
    ) -> (Detector, DetectorHandle, Reconfigure) {
        let now = Instant::now();
        let view = HostView {
            state: HostState::Up,
            epoch: 1,
            epoch_end: CancellationToken::new(),
            next_epoch_end: None,
            identity: None,
            since: now,
            last_failover: None,
            neighbor: Arc::from("starting"),
            note: None,
            split_brain: false,
            role: None,
        };
        let (view_tx, view_rx) = watch::channel(view);
        let (sign_tx, sign_rx) = mpsc::channel(256);
        let (settings_tx, settings) = watch::channel(svc.clone());
        metrics.upstream_up.set(1.0);
        metrics.epoch.set(1.0);
        let detector = Detector {
            connector,
            machine: Machine::new(svc.probe.fall, svc.probe.rise, now),
            probe_keepalive: probe::probe_keepalive(&svc.probe, &svc.keepalive),
            backoff: Backoff::new(svc.ride_out.backoff_initial, svc.probe.interval.min(svc.ride_out.backoff_max)),
            svc,
            metrics,
            view: view_tx,
            signs: sign_rx,
            probe_conn: None,
            next_check: now,
            self_signs: sign_tx.clone(),
            linked: Vec::new(),
            sessions_since: now,
            settings,
            neighbor_stop: CancellationToken::new(),
            not_ready: None,
            answered: None,
            neighbor_on: false,
            resolved_at: None,
            deleted_at: None,
            epoch_began: now,
            resolve_refused: false,
            flaps: flaps::Flaps::default(),
            confirming: None,
            knock_refused: false,
            local_failures: RateLimitedLog::new(Duration::from_secs(60)),
        };
        (detector, DetectorHandle { view: view_rx, signs: sign_tx }, Reconfigure(settings_tx))
    }

    /// Runs until `cancel`.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        self.restart_neighbor_watch(&cancel).await;
        enum Event {
            Stop,
            Settings,
            Sign(Sign),
            ProbeConn(ProbeConnEvent),
            Check,
        }
        loop {
            let check_at = if self.svc.probe.mode == ProbeMode::Off { None } else { Some(self.next_check) };
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => Event::Stop,
                // A closed channel (the server let go of the sender) disables the branch; it never spins.
                Ok(()) = self.settings.changed() => Event::Settings,
                Some(sign) = self.signs.recv() => Event::Sign(sign),
                ev = probe::watch_probe_conn(self.probe_conn.as_mut(), self.svc.probe.preset.is_some()) => Event::ProbeConn(ev),
                _ = async { match check_at { Some(t) => sleep_until(t).await, None => std::future::pending().await } } => Event::Check,
            };
            let silent_before = self.machine.state() == HostState::Down;
            match event {
                Event::Stop => break,
                Event::Settings => {
                    let new = self.settings.borrow_and_update().clone();
                    self.reconfigure(new, &cancel).await;
                }
                Event::Sign(sign) => self.on_sign(sign).await,
                Event::ProbeConn(ev) => self.on_probe_conn(ev).await,
                Event::Check => {
                    self.check().await;
                    self.next_check = Instant::now() + self.pace();
                }
            }
            // why: Down is a black hole (fresh connects silent too); if the address moved and its
            // announcement was lost, the entry still points at the old node and nothing reaches the new
            // one until the kernel's timers give up on the entry. Resolving it anew costs one ARP request.
            if self.machine.state() == HostState::Down {
                let why = if silent_before { "the upstream stays silent" } else { "the upstream went silent" };
                self.resolve_neighbor(why).await;
            }
        }
        self.neighbor_stop.cancel();
        debug!(service = %self.svc.name, "detector stopped");
    }

    /// Applies a reload's settings in place: the epoch, its tokens, the host state, the identity and the
    /// last failover stay; what depends on a changed part is made anew.
    async fn reconfigure(&mut self, new: Arc<ServiceConfig>, cancel: &CancellationToken) {
        let change = reconfig::Change::between(&self.svc, &new);
        let old_upstream = self.svc.upstream.clone();
        self.svc = new.clone();
        self.machine.set_thresholds(new.probe.fall, new.probe.rise);
        self.probe_keepalive = probe::probe_keepalive(&new.probe, &new.keepalive);
        self.backoff = Backoff::new(new.ride_out.backoff_initial, new.probe.interval.min(new.ride_out.backoff_max));
        if !change.any() {
            return;
        }
        info!(service = %new.name, moved = change.moved, reprobe = change.reprobe, identity = change.identity, "reload: detector reconfigured in place");
        if change.identity {
            self.machine.forget_identity();
        }
        if change.reprobe {
            self.probe_conn = None;
            self.next_check = Instant::now();
            self.restart_neighbor_watch(cancel).await;
        }
        if change.retune
            && let Some(conn) = &self.probe_conn
            && let Some(tcp) = conn.tcp()
            && let Err(e) = sockopt::retune(tcp, &self.probe_keepalive)
        {
            warn!(service = %new.name, error = %e, "reload: could not retune the probe connection; making it anew");
            self.probe_conn = None;
            self.next_check = Instant::now();
        }
        if change.neighbor {
            self.restart_neighbor_watch(cancel).await;
        }
        if change.moved {
            warn!(service = %new.name, old = %old_upstream, new = %new.upstream, "reload: the upstream address changed; the sessions to the old one end");
            self.observe(Evidence::Reload);
        }
        if new.probe.mode == ProbeMode::Off && self.machine.state() != HostState::Up {
            // why: with the probe off nothing would ever bring the host back up; as at the start, the data
            // path connects and finds out for itself.
            let before = self.machine.state();
            self.machine.assume_up(Instant::now());
            self.publish(before, None);
        }
    }

    /// (Re)starts the neighbour watch for the current upstream and shows its state in the view.
    async fn restart_neighbor_watch(&mut self, cancel: &CancellationToken) {
        self.neighbor_stop.cancel();
        self.neighbor_stop = cancel.child_token();
        let watch = self.start_neighbor_watch(self.neighbor_stop.clone()).await;
        self.neighbor_on = watch == "watching";
        self.flaps.clear();
        self.resolved_at = None;
        self.resolve_refused = false;
        self.view.send_modify(|v| v.neighbor = Arc::from(watch.as_str()));
    }

    /// Starts the neighbour-table watch of the upstream address when it is on a directly connected
    /// network; returns what `/status` shows of it.
    async fn start_neighbor_watch(&self, cancel: CancellationToken) -> String {
        if !self.svc.probe.neighbor {
            return "off: probe.neighbor = false".into();
        }
        let ip = match (&self.svc.upstream, self.svc.probe.mode) {
            (_, ProbeMode::Off) => return "off: probe mode is off".into(),
            (crate::config::UpstreamAddr::Ip(addr), _) => addr.ip(),
            (crate::config::UpstreamAddr::Name { .. }, _) => return "off: the upstream is a name".into(),
        };
        if let Some(why) = neighbor::unavailable(ip).await {
            info!(service = %self.svc.name, reason = %why, "neighbour watch not available; the other signs still work");
            return format!("not available: {why}");
        }
        let watch = match neighbor::NeighborWatch::start(vec![ip]).await {
            Ok(w) => w,
            Err(e) => {
                info!(service = %self.svc.name, reason = %e, "neighbour watch unavailable; the other signs still work");
                return format!("unavailable: {e}");
            }
        };
        let (tx, mut rx) = mpsc::channel(16);
        let name = self.svc.name.clone();
        tokio::spawn(async move {
            if let Err(e) = watch.run(tx, cancel.cancelled_owned()).await {
                warn!(service = %name, error = %e, "neighbour watch ended");
            }
        });
        let signs = self.self_signs.clone();
        let name = self.svc.name.clone();
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                let seen = Instant::now();
                info!(service = %name, %change, "neighbour entry of the upstream changed its link-layer address");
                let (old, new) = (neighbor::fingerprint(&change.old), neighbor::fingerprint(&change.new));
                if signs.send(Sign::Neighbor { seen, old, new, resolved: change.resolved }).await.is_err() {
                    break;
                }
            }
        });
        info!(service = %self.svc.name, upstream = %ip, "watching the neighbour table for a takeover's gratuitous ARP");
        "watching".into()
    }

    /// Forces the upstream's neighbour entry to be resolved anew, when the watch is on and it was not done
    /// within the last probe interval; counted and logged. A refusal (no `CAP_NET_ADMIN`) is logged once,
    /// shown in `/status`, and not tried again until the watch restarts.
    async fn resolve_neighbor(&mut self, why: &str) {
        let crate::config::UpstreamAddr::Ip(addr) = &self.svc.upstream else { return };
        let ip = addr.ip();
        let now = Instant::now();
        if !self.neighbor_on
            || self.resolve_refused
            || self.resolved_at.is_some_and(|t| now < t + self.svc.probe.interval)
        {
            return;
        }
        self.resolved_at = Some(now);
        match neighbor::resolve_again(ip).await {
            Ok(neighbor::Resolve::Deleted { ifindex, .. }) => {
                self.deleted_at = Some(now);
                self.metrics.neighbor_resolves.increment(1);
                info!(service = %self.svc.name, upstream = %ip, ifindex, reason = why, "neighbour entry of the upstream forced to be resolved anew");
            }
            Ok(other) => {
                debug!(service = %self.svc.name, upstream = %ip, ?other, "neighbour entry of the upstream left as it is")
            }
            Err(e @ neighbor::WatchError::Unavailable(_)) => {
                self.resolve_refused = true;
                warn!(service = %self.svc.name, upstream = %ip, error = %e, "cannot force the upstream's neighbour entry to be resolved anew (needs CAP_NET_ADMIN); the watch and the other signs still work");
                let shown = format!("watching; cannot force re-resolution: {e}");
                self.view.send_modify(|v| v.neighbor = Arc::from(shown.as_str()));
            }
            Err(e) => {
                debug!(service = %self.svc.name, upstream = %ip, error = %e, "forcing the neighbour entry to be resolved anew failed")
            }
        }
    }

    /// Time to the next check in the current state.
    fn pace(&mut self) -> Duration {
        let interval = self.svc.probe.interval;
        match self.machine.state() {
            HostState::Up => {
                self.backoff.reset();
                if self.svc.probe.mode == ProbeMode::KeepOpen { interval.min(HOLD_PACE) } else { interval }
            }
            // why: with a kept-open probe connection a suspicion is settled by the probe connection's next ACK (or its end); read
            // TCP_INFO often so it is settled as soon as that happens.
            HostState::Suspect if self.svc.probe.mode == ProbeMode::KeepOpen => Duration::from_millis(100),
            HostState::Suspect => interval.min(Duration::from_millis(250)),
            // why: held clients wait for this detector, so how soon it sees the host back bounds their
            // stall: look every RECOVERY_PACE during the first RECOVERY_FAST of an outage, then back off
            // to the probe interval so a long outage costs little.
            HostState::Down | HostState::FailingOver | HostState::NotReady => {
                let away = Instant::now().saturating_duration_since(self.view.borrow().since);
                if away < RECOVERY_FAST { RECOVERY_PACE.min(interval) } else { self.backoff.next_delay().max(interval) }
            }
        }
    }

    async fn on_sign(&mut self, sign: Sign) {
        let now = Instant::now();
        match sign {
            Sign::Admin => {
                self.probe_conn = None;
                self.observe(Evidence::Admin);
                self.next_check = now;
            }
            Sign::Neighbor { seen, old, new, resolved } => {
                if self.svc.probe.mode == ProbeMode::Off {
                    return;
                }
                // why: sessions made after the change already went to the new node; a change the detector
                // has since caught up with (the host came back, or an epoch began) ends nothing.
                if seen <= self.sessions_since {
                    debug!(service = %self.svc.name, "neighbour change predates the current sessions: ignored");
                    return;
                }
                // why: a change that answers staybound's own re-resolution: once the move it was deleted for
                // has been decided (an epoch began since), the change is that move seen again, and the
                // sessions of the new epoch were made to the node it names.
                let deleted = if resolved { self.deleted_at.take() } else { None };
                if deleted.is_some_and(|deleted| self.epoch_began >= deleted) {
                    debug!(service = %self.svc.name, "neighbour change answers a re-resolution made for a move already decided: ignored");
                    return;
                }
                // why: and once the probe connection has answered through the re-resolved entry, it is
                // confirmed already.
                if let Some(deleted) = deleted
                    && self.machine.state() == HostState::Up
                    && self
                        .probe_conn
                        .as_ref()
                        .and_then(ProbeStream::tcp)
                        .and_then(sockopt::last_ack_age)
                        .is_some_and(|age| now.checked_sub(age).is_some_and(|acked| acked > deleted))
                {
                    debug!(service = %self.svc.name, "neighbour change answers a re-resolution the probe connection already answered through: ignored");
                    return;
                }
                // why: a resolution's answer is the kernel's, not a node's announcement: the address going
                // back to where it was is healing, not flapping.
                let window = self.svc.probe.split_brain_window;
                if !resolved && !window.is_zero() {
                    self.flaps.start_from(seen, old);
                    if self.flaps.record(seen, new, window) {
                        self.split_brain(now);
                    }
                }
                self.on_neighbor_change(now).await;
            }
            Sign::SessionReset | Sign::SessionTimeout | Sign::ConnectFailed(_) => {
                // why: a client's connect this host could not make (no local port, descriptor or memory)
                // says nothing of the upstream (it is counted by its class); suspecting on it would ask the
                // probe, which is short of the same.
                if self.svc.probe.mode == ProbeMode::Off || matches!(sign, Sign::ConnectFailed(c) if c.local()) {
                    return;
                }
                let signal = match sign {
                    Sign::SessionTimeout => Signal::Keepalive,
                    _ => Signal::SessionReset,
                };
                let before = self.machine.state();
                self.observe(Evidence::Sign { signal });
                if before == HostState::Up && self.machine.state() == HostState::Suspect {
                    debug!(service = %self.svc.name, ?sign, "suspect: confirming");
                    self.next_check = now;
                }
            }
        }
    }

    /// A neighbour change of the upstream address is a sign of a move, confirmed before it ends anything.
    /// With a probe connection, that session confirms: it belongs to the node the address reached, so
    /// a fresh ACK on it after the change says nothing moved (a duplicated or forged announcement, a bond
    /// changing its MAC), and a reset says another node has the address. A knock makes it answer within a
    /// round trip; without one its next keep-alive does. With no probe connection (connect mode, UDP), a
    /// fresh probe confirms, as it must: the address answering at all is then the evidence.
    async fn on_neighbor_change(&mut self, now: Instant) {
        let held_confirms = self.svc.protocol == Protocol::Tcp
            && matches!(self.svc.probe.mode, ProbeMode::KeepOpen | ProbeMode::SendExpect)
            && self.machine.state() == HostState::Up;
        let acked = self
            .probe_conn
            .as_ref()
            .and_then(ProbeStream::tcp)
            .and_then(sockopt::last_ack_age)
            .map(|age| now.checked_sub(age).unwrap_or(now));
        match (held_confirms, acked) {
            (true, Some(acked)) => {
                self.observe(Evidence::Sign { signal: Signal::Neighbor });
                self.confirming = Some(Confirming { seen: now, acked, resolved: false });
                if self.svc.probe.mode == ProbeMode::KeepOpen {
                    self.knock();
                }
                // why: with send-expect the next exchange on the probe connection is the confirmation.
                self.next_check = now;
            }
            _ => {
                // why: the address now answers from another link-layer address; confirm at once, without
                // waiting for a probe interval, by reaching it anew (a UDP service holds no session: one
                // probe exchange instead).
                self.probe_conn = None;
                let (confirm, identity) = self.confirm().await;
                self.observe(Evidence::Moved { signal: Signal::Neighbor, confirm, identity });
            }
        }
    }

    /// Sends a knock on the probe connection (`knock`); a refusal is said once.
    fn knock(&mut self) {
        let Some(tcp) = self.probe_conn.as_ref().and_then(ProbeStream::tcp) else { return };
        if self.knock_refused {
            return;
        }
        let (Ok(local), Ok(peer)) = (tcp.local_addr(), tcp.peer_addr()) else { return };
        match knock::knock(local, peer) {
            Ok(()) => self.metrics.knocks.increment(1),
            Err(knock::KnockError::NotPermitted(e)) => {
                self.knock_refused = true;
                warn!(service = %self.svc.name, error = %e, "cannot knock on the probe connection (needs CAP_NET_RAW): a neighbour change is confirmed by its next keep-alive instead");
            }
            // why: a firewall that drops the knock on its way out fails the send with EPERM; the next
            // knock may pass, so this one is only counted.
            Err(knock::KnockError::Failed(e)) => {
                self.metrics.knocks_failed.increment(1);
                debug!(service = %self.svc.name, error = %e, "knock on the probe connection not sent")
            }
        }
    }

    /// Two nodes claim the upstream address in turn: flag it and damp the epochs for a window.
    fn split_brain(&mut self, now: Instant) {
        let first = !self.machine.damping(now);
        let window = self.svc.probe.split_brain_window;
        self.machine.split_brain(now, window);
        self.metrics.split_brain.set(1.0);
        if first {
            warn!(
                service = %self.svc.name, upstream = %self.svc.upstream, window = %humantime::format_duration(window),
                "split brain: the upstream address goes back and forth between two link-layer addresses; at most one epoch ends per window until it stops"
            );
        }
        self.view.send_if_modified(|v| !std::mem::replace(&mut v.split_brain, true));
    }

    /// Settles a neighbour change the probe connection is confirming (`mode = "hold"`): an ACK since the change
    /// clears it; silence past `FRESH_SILENCE` has the entry resolved anew (a link-layer address with no
    /// node behind it is healed that way) and knocks again.
    async fn settle_confirming(&mut self, now: Instant) -> bool {
        let Some(c) = self.confirming else { return false };
        if self.machine.state() != HostState::Suspect || self.probe_conn.is_none() {
            self.confirming = None;
            return false;
        }
        let Some(age) = self.probe_conn.as_ref().and_then(ProbeStream::tcp).and_then(sockopt::last_ack_age) else {
            return false;
        };
        let acked = now.checked_sub(age).unwrap_or(now);
        if answered_since(c, acked) {
            self.confirming = None;
            debug!(service = %self.svc.name, "the probe connection answers after the neighbour change: nothing moved");
            self.observe(Evidence::Ok { at: now, identity: None });
            return true;
        }
        if !c.resolved && now >= c.seen + FRESH_SILENCE {
            self.confirming = Some(Confirming { resolved: true, ..c });
            self.resolve_neighbor("a neighbour change the probe connection does not answer through").await;
            self.knock();
        }
        false
    }

    async fn on_probe_conn(&mut self, ev: ProbeConnEvent) {
        match ev {
            ProbeConnEvent::Data(bytes) => {
                let identity = probe::identity_of(&self.svc.probe, &bytes);
                if identity.is_some() {
                    self.observe(Evidence::Ok { at: Instant::now(), identity });
                }
            }
            ProbeConnEvent::Eof => {
                debug!(service = %self.svc.name, "probe session closed by the server; reconnecting");
                self.probe_conn = None;
                let (confirm, identity) = self.confirm().await;
                self.observe(Evidence::Closed { confirm, identity });
            }
            ProbeConnEvent::Failed(ConnectClass::Reset, e) => {
                self.date_last_ack();
                debug!(service = %self.svc.name, error = %e, "probe session reset; confirming");
                self.probe_conn = None;
                self.reset_then_confirm().await;
            }
            ProbeConnEvent::Failed(class, e) => {
                self.date_last_ack();
                debug!(service = %self.svc.name, error = %e, "probe session failed");
                self.probe_conn = None;
                let signal = if class == ConnectClass::Timeout { Signal::Keepalive } else { Signal::Probe };
                self.observe(Evidence::Silent { signal });
                self.next_check = Instant::now();
            }
        }
    }

    /// Dates the last good sign of the epoch by the probe connection's last ACK.
    fn date_last_ack(&mut self) {
        if let Some(age) = self.probe_conn.as_ref().and_then(ProbeStream::tcp).and_then(sockopt::last_ack_age) {
            let now = Instant::now();
            self.machine.good_sign(now.checked_sub(age).unwrap_or(now));
        }
    }

    /// One scheduled check, by probe mode.
    async fn check(&mut self) {
        let now = Instant::now();
        if self.svc.probe.mode == ProbeMode::KeepOpen && self.settle_confirming(now).await {
            return;
        }
        match self.svc.probe.mode {
            ProbeMode::Off => {}
            ProbeMode::KeepOpen => match &self.probe_conn {
                Some(conn) => {
                    if let Some(age) = conn.tcp().and_then(sockopt::last_ack_age) {
                        self.check_held_silence(now, age).await;
                    }
                }
                None => self.reconnect_check().await,
            },
            ProbeMode::SendExpect if self.svc.protocol == Protocol::Udp => self.check_udp().await,
            ProbeMode::SendExpect => {
                if self.probe_conn.is_none() {
                    // why: a connect alone is not readiness: the exchange on the new session decides.
                    let (reach, identity) = self.confirm().await;
                    self.observe_reach(reach, identity);
                    return;
                }
                match self.ask(false).await {
                    Ok(answer) => {
                        let (reach, identity) = self.reach_of(answer);
                        self.observe_reach(reach, identity);
                    }
                    Err(ExchangeError::Timeout) => {
                        self.probe_conn = None;
                        self.observe(Evidence::Silent { signal: Signal::Probe });
                    }
                    Err(ExchangeError::Mismatch(reply)) => {
                        self.probe_conn = None;
                        self.not_ready_because(lacks_expect(&reply));
                        self.observe(Evidence::NotReady);
                    }
                    Err(ExchangeError::Eof) => {
                        self.probe_conn = None;
                        let (confirm, identity) = self.confirm().await;
                        self.observe(Evidence::Closed { confirm, identity });
                    }
                    Err(ExchangeError::Failed(class, e)) => {
                        debug!(service = %self.svc.name, error = %e, "probe exchange failed");
                        self.probe_conn = None;
                        if class == ConnectClass::Reset {
                            self.reset_then_confirm().await;
                        } else {
                            self.observe(Evidence::Silent { signal: Signal::Probe });
                        }
                    }
                }
            }
            ProbeMode::Connect => {
                self.reconnect_check().await;
                self.probe_conn = None;
            }
        }
    }

    /// The probe connection's keep-alive, read from TCP_INFO: its last ACK `age` ago. An unanswered keep-alive
    /// is a lost packet or a host gone, and silence alone does not say which, so it is asked anew: fresh
    /// connects, staggered, until the session has been silent for a keep-alive idle time and interval
    /// (the black-hole bound). None answered by then: the host is gone (`Silent`). The address refused:
    /// another node holds it without the service. One connected: the address is there, so the probe
    /// connection is knocked on (`knock`) at every check, and the first RST (a node that does not know it: a
    /// move) or ACK (a lost packet) decides; without `CAP_NET_RAW` its next keep-alive does; the kernel
    /// ends it after three unanswered ones.
    async fn check_held_silence(&mut self, now: Instant, age: Duration) {
        let last_ack = now.checked_sub(age).unwrap_or(now);
        self.machine.good_sign(last_ack);
        let ka = &self.probe_keepalive;
        if age <= ka.idle + ACK_SLACK {
            self.answered = None;
            self.observe(Evidence::Ok { at: last_ack, identity: None });
            return;
        }
        if self.answered.is_some_and(|t| t >= last_ack) {
            // why: the address answers fresh connects while the probe connection is silent: the session's node
            // lost a packet, or another node has the address. A knock asks which now instead of at the next
            // keep-alive, and again at every check while the silence lasts, so a lost answer costs a check.
            self.knock();
            return;
        }
        let silent_at = last_ack + ka.idle + ka.interval;
        if now < silent_at {
            let connector = self.connector.load_full();
            let reach = match connector.resolve(silent_at - now).await {
                Ok(peers) => {
                    // why: the probe connection's address is the one that last took a connection, first here.
                    let peer = peers[0];
                    let (ka, connector) = (self.probe_keepalive.clone(), (*connector).clone());
                    // why: the race's last attempt would run its own timeout past the bound; the bound decides.
                    let race = race_connect(&connector, peer, silent_at - now, &ka);
                    tokio::pin!(race);
                    let first = (now + FRESH_SILENCE).min(silent_at);
                    let mut result = tokio::time::timeout_at(first, race.as_mut()).await;
                    if result.is_err() && Instant::now() < silent_at {
                        // why: a lost packet leaves fresh connects answered at once, so the entry is only
                        // touched when they are silent too; a move whose gratuitous ARP was lost then shows
                        // within a round trip (the watch sees the new address) instead of after the kernel's
                        // neighbour timers. The race goes on meanwhile.
                        self.resolve_neighbor("the probe connection and fresh connects are silent").await;
                        result = tokio::time::timeout_at(silent_at, race.as_mut()).await;
                    }
                    match result {
                        Ok(r) => r.map(|_| ()).map_err(|e| e.class),
                        Err(_) => Err(ConnectClass::Timeout),
                    }
                }
                Err(e) => Err(e.class),
            };
            match reach {
                Ok(()) => {
                    debug!(service = %self.svc.name, silent_ms = age.as_millis() as u64, "probe connection silent, the address answers: knocking on it");
                    self.answered = Some(Instant::now());
                    self.knock();
                    return;
                }
                Err(class) if class.address_answered() => {
                    self.probe_conn = None;
                    self.observe(Evidence::Refused);
                    return;
                }
                Err(_) => {}
            }
        }
        if Instant::now() + ACK_SLACK / 10 >= silent_at {
            debug!(service = %self.svc.name, silent_ms = age.as_millis() as u64, "probe connection and fresh connects silent");
            self.probe_conn = None;
            self.observe(Evidence::Silent { signal: Signal::Keepalive });
        }
    }

    /// One send-expect exchange over UDP (a UDP service's probe), reported as evidence.
    async fn check_udp(&mut self) {
        match probe_udp::exchange(&self.svc, &self.connector.load_full()).await {
            Ok(reply) => {
                let identity = probe::identity_of(&self.svc.probe, &reply);
                self.observe(Evidence::Ok { at: Instant::now(), identity });
            }
            Err(ExchangeError::Mismatch(reply)) => {
                self.not_ready_because(lacks_expect(&reply));
                self.observe(Evidence::NotReady);
            }
            // ICMP port unreachable: the address is up on some node, the service is not.
            Err(ExchangeError::Failed(ConnectClass::Refused, _)) => self.observe(Evidence::Refused),
            // why: no socket, source address or buffer on this host says nothing of the upstream.
            Err(ExchangeError::Failed(class, e)) if class.local() => {
                debug!(service = %self.svc.name, error = %e, "UDP probe not sent");
                self.local_failure(&e);
            }
            Err(e) => {
                debug!(service = %self.svc.name, error = ?e, "UDP probe got no reply");
                self.observe(Evidence::Silent { signal: Signal::Probe });
            }
        }
    }

    /// A UDP service's confirmation of a sign: one probe exchange.
    async fn udp_confirm(&mut self) -> (Reach, Option<String>) {
        match probe_udp::exchange(&self.svc, &self.connector.load_full()).await {
            Ok(reply) => (Reach::Ready, probe::identity_of(&self.svc.probe, &reply)),
            Err(ExchangeError::Mismatch(reply)) => {
                self.not_ready_because(lacks_expect(&reply));
                (Reach::NotReady, None)
            }
            // Refused (ICMP port unreachable), a local shortage (unknown), or silence.
            Err(ExchangeError::Failed(class, _)) => (Reach::from(class), None),
            Err(_) => (Reach::Silent, None),
        }
    }

    /// Reaches the host anew to settle a sign: a new probe session and, with `send-expect`, one exchange
    /// on it, since a connect alone says nothing of whether the node is ready.
    async fn confirm(&mut self) -> (Reach, Option<String>) {
        if self.svc.protocol == Protocol::Udp {
            return self.udp_confirm().await;
        }
        let (class, identity) = self.open_probe_conn().await;
        if class != ConnectClass::Ok || self.svc.probe.mode != ProbeMode::SendExpect {
            return (Reach::from(class), identity);
        }
        let reach = match self.ask(true).await {
            Ok(answer) => return self.reach_of(answer),
            Err(ExchangeError::Mismatch(reply)) => {
                self.not_ready_because(lacks_expect(&reply));
                Reach::NotReady
            }
            Err(ExchangeError::Timeout) => {
                self.not_ready_because(format!(
                    "it accepts connections but sent no reply to the probe within {}",
                    humantime::format_duration(self.svc.probe.timeout)
                ));
                Reach::NotReady
            }
            Err(ExchangeError::Eof) => {
                self.not_ready_because("it accepts connections and closes them at the probe's request".into());
                Reach::NotReady
            }
            Err(ExchangeError::Failed(class, _)) => Reach::from(class),
        };
        self.probe_conn = None;
        (reach, None)
    }

    /// One exchange on the probe connection: the preset's (logging in first on a `fresh` session), else `send`
    /// and `expect`.
    async fn ask(&mut self, fresh: bool) -> Result<Answer, ExchangeError> {
        let Some(conn) = self.probe_conn.as_mut() else { return Err(ExchangeError::Eof) };
        match &self.svc.probe.preset {
            Some(preset) => preset::exchange(conn, preset, self.svc.probe.timeout, fresh).await,
            None => {
                let reply = probe::exchange(conn, &self.svc.probe).await?;
                Ok(Answer::Ready { identity: probe::identity_of(&self.svc.probe, &reply), role: None })
            }
        }
    }

    /// What an answer means for the host: how it was reached, and the identity it gave. A node that is not
    /// ready loses the probe connection (the next check logs in anew); one in another role keeps it, and is
    /// asked again on it.
    fn reach_of(&mut self, answer: Answer) -> (Reach, Option<String>) {
        match answer {
            Answer::Ready { identity, role } => {
                self.saw_role(role);
                (Reach::Ready, identity)
            }
            Answer::WrongRole { role } => {
                self.not_ready_because(format!("it answers as a {role}, and probe.role = \"primary\""));
                self.saw_role(Some(role));
                (Reach::NotPrimary, None)
            }
            Answer::NotReady(why) => {
                self.not_ready_because(why);
                self.probe_conn = None;
                (Reach::NotReady, None)
            }
        }
    }

    /// The role the node last said it has, for `/status`.
    fn saw_role(&mut self, role: Option<String>) {
        let role = role.map(Arc::<str>::from);
        self.view.send_if_modified(|v| {
            let changed = v.role != role;
            v.role = role;
            changed
        });
    }

    /// The probe connection was reset: the epoch ends and new clients are held at once, before the confirming
    /// probe (which with `send-expect` waits for a reply) settles where the host stands.
    async fn reset_then_confirm(&mut self) {
        self.observe(Evidence::Reset { signal: Signal::Probe });
        let (reach, identity) = self.confirm().await;
        self.observe_reach(reach, identity);
    }

    /// Why the node is not ready, for `/status` and the log.
    fn not_ready_because(&mut self, why: String) {
        self.not_ready = Some(why);
    }

    /// Connects a new probe session and reports the result as evidence.
    async fn reconnect_check(&mut self) {
        let (class, identity) = self.open_probe_conn().await;
        self.observe_reach(Reach::from(class), identity);
    }

    /// Opens the probe connection; returns how the attempt ended and the identity a banner gave.
    async fn open_probe_conn(&mut self) -> (ConnectClass, Option<String>) {
        let timeout = self.svc.probe.timeout;
        // why: a stalled resolver must not stall the detector; the lookup has the probe's timeout.
        let connector = self.connector.load_full();
        let result = match connector.resolve(timeout).await {
            // why: while the address does not answer, a SYN already sent waits for its retransmission
            // (a second or more) even after the address is back; staggered attempts put a fresh SYN on
            // the wire every RECOVERY_PACE, so the first one after the takeover is answered at once. A
            // name's next address is raced next time when this one does not answer.
            Ok(peers) if self.machine.state() == HostState::Down => {
                let r = race_connect(&connector, peers[0], timeout, &self.probe_keepalive).await;
                if r.is_err() {
                    connector.passed_over(peers[0], &peers);
                }
                r
            }
            Ok(peers) => connector.connect_any(&peers, timeout, &self.probe_keepalive).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(stream) => {
                let identity = match (&self.svc.probe.identity, self.svc.probe.mode) {
                    (Some(_), ProbeMode::KeepOpen | ProbeMode::Connect) => {
                        probe::read_banner(&stream, timeout).await.and_then(|b| probe::identity_of(&self.svc.probe, &b))
                    }
                    _ => None,
                };
                self.probe_conn = Some(ProbeStream::new(stream));
                (ConnectClass::Ok, identity)
            }
            Err(e) => {
                debug!(service = %self.svc.name, error = %e, "probe connect failed");
                if e.class.local() {
                    self.local_failure(&e);
                }
                (e.class, None)
            }
        }
    }

    /// A probe this host could not make or send (no local port, address, descriptor, memory or buffer):
    /// warned of at most once a minute, with the count since.
    fn local_failure(&mut self, error: &dyn std::fmt::Display) {
        if let Some(n) = self.local_failures.hit() {
            warn!(service = %self.svc.name, error = %error, count = n, "the probe could not be made from this host (no local port, address, descriptor, memory or buffer); that says nothing of the upstream, and its state stays");
        }
    }

    /// Feeds a probe's reach to the machine as evidence. An attempt this host could not make (no local port,
    /// address, descriptor or memory: `Reach::Unknown`) is none: the state stays, and the connect attempt
    /// was counted (`result="addr_unavailable"` or `"exhausted"`) and logged where it failed.
    fn observe_reach(&mut self, reach: Reach, identity: Option<String>) {
        if let Some(ev) = evidence_of(reach, identity) {
            self.observe(ev);
        }
    }

    /// Feeds evidence to the machine and publishes what changed.
    fn observe(&mut self, ev: Evidence) {
        let before = self.machine.state();
        let damped = self.machine.damped();
        let failover = self.machine.observe(Instant::now(), ev);
        if self.machine.damped() > damped {
            self.metrics.split_brain_damped.increment(self.machine.damped() - damped);
            warn!(service = %self.svc.name, epoch = self.machine.epoch(), "split brain: an epoch end held back; the sessions of this epoch stay");
        }
        self.publish(before, failover);
    }

    /// Publishes the machine's state after a change from `before`, with the failover it decided, if any.
    fn publish(&mut self, before: HostState, failover: Option<Failover>) {
        let now = Instant::now();
        let after = self.machine.state();
        let name = &self.svc.name;
        if let Some(f) = &failover {
            self.metrics.failover(f.signal).increment(1);
            // why: a reload's failover is decided, not detected: it has no detection time to record.
            if f.signal != Signal::Reload {
                self.metrics.detection_seconds.record(f.detection.as_secs_f64());
            }
            self.metrics.epoch.set(f.epoch as f64);
            warn!(
                service = %name, epoch = f.epoch, signal = f.signal.as_str(),
                detection_ms = f.detection.as_millis() as u64, state = after.as_str(),
                "failover: the logical host moved or went away; ending the sessions of epoch {}", f.epoch - 1
            );
        }
        if before != after {
            info!(service = %name, from = before.as_str(), to = after.as_str(), epoch = self.machine.epoch(), "upstream state changed");
        }
        if failover.is_some() || (!before.connectable() && after.connectable()) {
            self.sessions_since = now;
        }
        if failover.is_some() {
            self.epoch_began = now;
        }
        self.metrics.upstream_up.set(if after.connectable() { 1.0 } else { 0.0 });
        if after != HostState::NotReady {
            self.not_ready = None;
        }
        self.metrics.upstream_not_ready.set(if after == HostState::NotReady { 1.0 } else { 0.0 });
        let note = note(self.machine.reached(), after, &self.svc.upstream, self.not_ready.as_deref());
        let had_note = self.view.borrow().note.is_some();
        match (&note, had_note) {
            (Some(why), false) => warn!(service = %name, upstream = %self.svc.upstream, "{why}"),
            // why: a note that clears was either the not-ready one or the never-reached one; say which ended.
            (None, true) if before == HostState::NotReady => {
                info!(service = %name, upstream = %self.svc.upstream, state = after.as_str(), "the upstream is ready again")
            }
            (None, true) => {
                info!(service = %name, upstream = %self.svc.upstream, "the upstream answered for the first time since start")
            }
            _ => {}
        }
        let identity = self.machine.identity().map(Arc::<str>::from);
        let join = self.machine.join();
        let split_brain = self.machine.damping(now);
        if !split_brain && self.view.borrow().split_brain {
            self.metrics.split_brain.set(0.0);
            info!(service = %name, "split brain over: the upstream address stayed on one link-layer address for a window");
        }
        let linked = &mut self.linked;
        self.view.send_if_modified(|view| {
            let mut changed = settle_tokens(view, linked, failover.as_ref(), join);
            if let Some(f) = &failover {
                view.last_failover = Some(FailoverRecord {
                    at: SystemTime::now(),
                    signal: f.signal,
                    detection: f.detection,
                    epoch: f.epoch,
                });
                changed = true;
            }
            if view.state != after {
                view.state = after;
                view.since = now;
                changed = true;
            }
            if view.identity != identity {
                view.identity = identity;
                changed = true;
            }
            if view.note != note {
                view.note = note;
                changed = true;
            }
            if view.split_brain != split_brain {
                view.split_brain = split_brain;
                changed = true;
            }
            changed
        });
    }
}

/// What `/status` and the log say when the host is not up and that is not a failover: a node that
/// answers but is not ready (with why), or a host that has not answered once since start.
fn note(
    reached: bool,
    state: HostState,
    upstream: &crate::config::UpstreamAddr,
    not_ready: Option<&str>,
) -> Option<Arc<str>> {
    match (reached, state) {
        (_, HostState::NotReady) => Some(Arc::from(format!(
            "upstream {upstream} answers but is not ready: {}; clients are held until it is (or their deadline)",
            not_ready.unwrap_or("the probe reply lacks `expect`")
        ))),
        (false, HostState::FailingOver) => Some(Arc::from(format!(
            "upstream {upstream} refused every connect since start: is the port right, and is the service started? \
             (not a failover: clients are held until it answers or their deadline)"
        ))),
        (false, HostState::Down) => Some(Arc::from(format!(
            "upstream {upstream} has not answered since start: is the address right and reachable? (not a \
             failover: clients are held until it answers or their deadline)"
        ))),
        _ => None,
    }
}

/// Whether the probe connection's last ACK, dated `acked` now, came after the neighbour change `c` was seen.
/// why: TCP_INFO dates the last ACK in jiffies, so a later reading of the same ACK can look a few
/// milliseconds younger; a new one is later than the one read at the change by more than that, and no
/// older than the change itself (give or take the same rounding).
fn answered_since(c: Confirming, acked: Instant) -> bool {
    const JIFFY_SLACK: Duration = Duration::from_millis(10);
    acked > c.acked + JIFFY_SLACK && acked + JIFFY_SLACK >= c.seen
}

/// A probe's reach as evidence: a reach alone (no sign before it) ends no epoch unless the machine says so.
/// An attempt this host could not make is none.
fn evidence_of(reach: Reach, identity: Option<String>) -> Option<Evidence> {
    Some(match reach {
        Reach::Ready => Evidence::Ok { at: Instant::now(), identity },
        Reach::NotReady => Evidence::NotReady,
        Reach::NotPrimary => Evidence::NotPrimary,
        Reach::Refused => Evidence::Refused,
        Reach::Silent => Evidence::Silent { signal: Signal::Probe },
        Reach::Unknown => return None,
    })
}

/// Why a reply is not a ready node's, with the reply shown (truncated, lossy UTF-8).
fn lacks_expect(reply: &[u8]) -> String {
    let shown: String = String::from_utf8_lossy(&reply[..reply.len().min(120)]).escape_debug().collect();
    format!("the probe reply lacks `expect`: \"{shown}\"")
}

/// Connect attempts started every `RECOVERY_PACE` for up to `timeout`, each bounded by `timeout`; the first
/// to connect wins and the rest are dropped. An answer such as `refused` ends the race at once. The
/// connector counts each attempt that ends.
async fn race_connect(
    connector: &Connector,
    peer: std::net::SocketAddr,
    timeout: Duration,
    keepalive: &KeepaliveConfig,
) -> Result<TcpStream, crate::upstream::ConnectError> {
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut started = 0u32;
    let mut best: Option<crate::upstream::ConnectError> = None;
    let spawn = |set: &mut tokio::task::JoinSet<_>| {
        let (c, ka) = (connector.clone(), keepalive.clone());
        set.spawn(async move { c.connect_with(peer, timeout, &ka).await });
    };
    spawn(&mut set);
    started += 1;
    loop {
        let may_start = start.elapsed() + RECOVERY_PACE < timeout && started < 16;
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok(Ok(stream))) => return Ok(stream),
                Some(Ok(Err(e))) => {
                    let answered = e.class.address_answered();
                    best = Some(e);
                    if answered {
                        break;
                    }
                }
                Some(Err(_)) => {}
                None if may_start => {
                    spawn(&mut set);
                    started += 1;
                }
                None => break,
            },
            _ = tokio::time::sleep(RECOVERY_PACE), if may_start => {
                spawn(&mut set);
                started += 1;
            }
        }
    }
    Err(best.unwrap_or_else(|| crate::upstream::ConnectError {
        class: ConnectClass::Other,
        target: peer.to_string(),
        source: std::io::Error::other("no connect attempt finished"),
    }))
}

#[cfg(test)]
mod tests {
    use super::sim::Shell;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_an_ack_newer_than_the_change_confirms_nothing_moved() {
        let t = Instant::now() + Duration::from_secs(10);
        let ms = Duration::from_millis;
        // The last ACK read at the change came 400 ms before it.
        let c = Confirming { seen: t, acked: t - ms(400), resolved: false };
        assert!(!answered_since(c, t - ms(400)), "the same ACK");
        assert!(!answered_since(c, t - ms(392)), "the same ACK, read a jiffy or two younger");
        assert!(!answered_since(c, t - ms(200)), "an ACK between the last one and the change");
        assert!(answered_since(c, t + ms(1)), "the knock's answer");
        assert!(answered_since(c, t - ms(5)), "an answer dated a jiffy early");
        // The last ACK read at the change was a moment before it: a new one must still be newer than that.
        let c = Confirming { seen: t, acked: t - ms(2), resolved: false };
        assert!(!answered_since(c, t + ms(5)));
        assert!(answered_since(c, t + ms(20)));
    }

    fn ok(at: Instant) -> Evidence {
        Evidence::Ok { at, identity: None }
    }

    #[test]
    fn a_session_made_while_a_move_is_confirmed_survives_the_move() {
        let now = Instant::now();
        let mut s = Shell::new(1, 1, now);
        s.observe(now, ok(now));
        let before = s.session();
        s.observe(now, Evidence::Sign { signal: Signal::SessionReset });
        let during = s.session();
        assert!(s.observe(now, Evidence::Reset { signal: Signal::Probe }).is_some());
        assert!(before.is_cancelled(), "the old epoch's session ends");
        assert!(!during.is_cancelled(), "the session made during the suspicion reached the new node");
        s.observe(now, ok(now));
        let after = s.session();
        assert!(s.observe(now, Evidence::Admin).is_some());
        assert!(during.is_cancelled() && after.is_cancelled(), "it ends with the epoch it joined");
    }

    #[test]
    fn a_session_made_during_a_suspicion_that_cleared_ends_with_the_current_epoch() {
        let now = Instant::now();
        let mut s = Shell::new(1, 1, now);
        s.observe(now, ok(now));
        s.observe(now, Evidence::Sign { signal: Signal::SessionReset });
        let during = s.session();
        s.observe(now, ok(now));
        assert!(s.view.next_epoch_end.is_none());
        assert!(!during.is_cancelled());
        assert!(s.observe(now, Evidence::Admin).is_some());
        assert!(during.is_cancelled());
    }

    #[test]
    fn a_session_made_while_the_host_fails_ends_when_it_is_gone() {
        // Regression: with fall = 2, a session made after one silence took the next epoch's token, and
        // the failover of the second silence made it the new epoch's: the session to the degraded node
        // was left live.
        let now = Instant::now();
        let mut s = Shell::new(2, 1, now);
        s.observe(now, ok(now));
        s.observe(now, Evidence::Silent { signal: Signal::Probe });
        assert_eq!(s.view.state, HostState::Suspect);
        let during = s.session();
        assert!(s.observe(now, Evidence::Silent { signal: Signal::Probe }).is_some());
        assert!(during.is_cancelled(), "the failover ends the session made to the degraded node");
    }

    #[test]
    fn a_reload_ends_the_sessions_made_during_a_suspicion() {
        let now = Instant::now();
        let mut s = Shell::new(1, 1, now);
        s.observe(now, ok(now));
        s.observe(now, Evidence::Sign { signal: Signal::SessionReset });
        let during = s.session();
        assert!(s.observe(now, Evidence::Reload).is_some_and(|f| !f.takes_provisional));
        assert!(during.is_cancelled(), "it reached the old address");
        assert!(!s.session().is_cancelled());
    }
}
