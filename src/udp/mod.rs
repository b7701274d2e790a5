//! `protocol = "udp"` services: datagrams relayed between legacy clients and the logical host, answered from
//! the address each client sent to.
//!
//! What this module owns:
//! * the listen sockets of a UDP service ([`bind`]): every address that can be bound at start is bound then;
//!   one that is not on this host yet (EADDRNOTAVAIL, no `freebind`) is bound as soon as it appears, with a
//!   backoff of 0.5 s to 5 s, and `staybound_udp_listener_bound` is 1 only once all are;
//! * replies from the right address ([`pktinfo`]): on a wildcard listen address every datagram's local
//!   address is read (IP_PKTINFO / IPV6_PKTINFO) and the reply leaves from exactly that address;
//! * flows (`listener`, `flow`): one per client address and local address, each with its own upstream
//!   socket bound to `source` and not connected, so that replies from the nodes' stationary addresses (listed
//!   in `reply_from`) arrive; flows end after `flow_idle`; at most `max_flows` exist, a new client's flow
//!   taking the place of the least recently used one (`table`, counted in `staybound_udp_flows_evicted_total`),
//!   and at most `max_flows_per_source` from one client address; every datagram not relayed is counted in
//!   `staybound_udp_dropped_total` and logged at most once a second per reason, and so is every eviction;
//! * the UDP send-expect probe ([`probe`]) that the detector runs for a UDP service.
//!
//! What it leaves to others: the failover state. A datagram has no session to reset, so nothing happens here
//! on a new epoch: flows stay, and replies simply come from the new node. A UDP service's host state is that
//! of the service named first in its `depends_on` (a TCP service on the same logical host, whose detector
//! holds a probe session) when its own probe is off ([`ServiceConfig::follows`]), or its own detector's when its probe is
//! `send-expect` (sent over UDP). Datagrams are relayed whatever that state: holding them would only delay
//! what the client's own retries already cover.

mod flow;
mod listener;
pub(crate) mod pktinfo;
mod table;

/// The flow path's pure decisions, for tests and fuzzing: which datagrams are replies, and how a
/// coalesced (GRO) receive buffer splits into datagrams.
pub use listener::datagrams;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::ServiceConfig;
use crate::metrics::{ServiceMetrics, UdpDrop};
use crate::oserror::{self, OsError};
use crate::ratelog::RateLimitedLog;
use crate::service::Service;
use crate::upstream::retry::Backoff;
use flow::FlowSlot;
use pktinfo::ClientSocket;

/// Retry pace for a listen or source address that is not on this host yet.
const BIND_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));
/// At most one log line per this period per drop reason and service.
const DROP_LOG_PERIOD: Duration = Duration::from_secs(1);

/// A listen address that could not be bound, for a reason other than "not on this host yet".
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on udp {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// The listen addresses of a UDP service as bound so far (ports resolved), in `listen` order; `None` for an
/// address that is not bound yet.
#[derive(Debug, Clone)]
pub struct BoundAddrs(watch::Receiver<Vec<Option<SocketAddr>>>);

impl BoundAddrs {
    /// The addresses bound now.
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.0.borrow().iter().flatten().copied().collect()
    }
}

/// The listen sockets of one UDP service by configured address, as bound so far (late binds included): what a
/// reload hands to whichever service names an address next.
#[derive(Debug, Clone, Default)]
pub struct Sockets(Arc<Mutex<Vec<Kept>>>);

/// A listen socket with its configured address.
pub type Kept = (SocketAddr, Arc<ClientSocket>);

impl Sockets {
    fn add(&self, addr: SocketAddr, sock: Arc<ClientSocket>) {
        lock(&self.0).push((addr, sock));
    }

    /// Every socket with its configured address.
    pub fn all(&self) -> Vec<Kept> {
        lock(&self.0).clone()
    }
}

/// The listen sockets of one UDP service, bound (or waiting for their address), not yet serving.
#[derive(Debug)]
pub struct Listeners {
    bound: Vec<Arc<ClientSocket>>,
    pending: Vec<(usize, SocketAddr)>,
    freebind: bool,
    addrs: watch::Sender<Vec<Option<SocketAddr>>>,
    sockets: Sockets,
}

/// Binds every listen address of `cfg` that can be bound now, taking the socket `reuse` returns for an address
/// already bound (by this service or another, before a reload). An address that is not on this host yet is
/// left for [`Listeners::serve`] to bind when it appears. Must run inside a tokio runtime.
///
/// # Errors
/// The first listen address that cannot be bound for another reason (in use, permission, ...).
pub fn bind(
    cfg: &ServiceConfig,
    mut reuse: impl FnMut(SocketAddr) -> Option<Arc<ClientSocket>>,
) -> Result<Listeners, ListenError> {
    let mut bound = Vec::new();
    let mut pending = Vec::new();
    let mut addrs = Vec::new();
    let sockets = Sockets::default();
    for (i, addr) in cfg.listen.iter().enumerate() {
        if let Some(s) = reuse(*addr) {
            addrs.push(Some(s.local_addr()));
            sockets.add(*addr, s.clone());
            bound.push(s);
            continue;
        }
        match ClientSocket::bind(*addr, cfg.freebind) {
            Ok(s) => {
                let s = Arc::new(s);
                addrs.push(Some(s.local_addr()));
                sockets.add(*addr, s.clone());
                bound.push(s);
            }
            Err(e) if oserror::kind(&e) == OsError::AddrUnavailable => {
                warn!(service = %cfg.name, listen = %addr, "UDP listen address not on this host (yet): it is bound as soon as it appears (set freebind = true to bind it at once)");
                addrs.push(None);
                pending.push((i, *addr));
            }
            Err(source) => return Err(ListenError { addr: *addr, source }),
        }
    }
    let (addrs, _) = watch::channel(addrs);
    Ok(Listeners { bound, pending, freebind: cfg.freebind, addrs, sockets })
}

impl Listeners {
    /// The addresses bound now (ports resolved).
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.iter().map(|s| s.local_addr()).collect()
    }

    /// A view of the bound addresses that follows late binds.
    pub fn addrs(&self) -> BoundAddrs {
        BoundAddrs(self.addrs.subscribe())
    }

    /// The sockets by configured address, late binds included.
    pub fn sockets(&self) -> Sockets {
        self.sockets.clone()
    }

    /// Serves until `stop`: the bound sockets at once, the others once bound. Flows end with it. The serving
    /// tasks start before this returns (so the service is listening when the caller goes on); the future
    /// returned ends when they have all stopped. Must run inside a tokio runtime.
    pub fn serve(self, svc: Arc<ArcSwap<Service>>, stop: CancellationToken) -> impl Future<Output = ()> + use<> {
        let current = svc.load_full();
        let shared = Arc::new(Shared {
            name: current.cfg.name.clone(),
            metrics: current.metrics.clone(),
            svc,
            base: Instant::now(),
            flows: Mutex::new(FlowCount::default()),
            logs: UdpDrop::ALL.map(|_| Mutex::new(RateLimitedLog::new(DROP_LOG_PERIOD))),
            evict_log: Mutex::new(RateLimitedLog::new(DROP_LOG_PERIOD)),
            source: Mutex::new(SourceGate { closed_until: None, backoff: Backoff::new(BIND_RETRY.0, BIND_RETRY.1) }),
            tasks: TaskTracker::new(),
        });
        let all = self.pending.is_empty();
        shared.metrics.udp_bound.set(if all { 1.0 } else { 0.0 });
        for sock in self.bound {
            info!(service = %shared.name, listen = %sock.local_addr(), upstream = %current.cfg.upstream, wildcard = sock.is_wildcard(), "listening (udp)");
            shared.tasks.spawn(listener::run(sock, shared.clone(), stop.clone()));
        }
        let addrs = Arc::new(self.addrs);
        for (index, addr) in self.pending {
            let (shared2, stop2, addrs2) = (shared.clone(), stop.clone(), addrs.clone());
            let (freebind, sockets) = (self.freebind, self.sockets.clone());
            shared.tasks.spawn(async move {
                let Some(sock) = bind_when_present(addr, freebind, &shared2, &stop2).await else { return };
                let sock = Arc::new(sock);
                sockets.add(addr, sock.clone());
                let local = sock.local_addr();
                addrs2.send_modify(|v| {
                    if let Some(slot) = v.get_mut(index) {
                        *slot = Some(local);
                    }
                });
                let all = addrs2.borrow().iter().all(Option::is_some);
                if all {
                    shared2.metrics.udp_bound.set(1.0);
                }
                info!(service = %shared2.name, listen = %local, all_bound = all, "UDP listen address appeared on this host: listening");
                listener::run(sock, shared2, stop2).await;
            });
        }
        shared.tasks.spawn(mirror_host_state(shared.clone(), stop.clone()));
        async move {
            stop.cancelled().await;
            shared.tasks.close();
            shared.tasks.wait().await;
            // (`udp_bound` is left as it is: a reload that moved the listeners has set it for the new ones.)
            addrs.send_modify(|v| v.iter_mut().for_each(|a| *a = None));
        }
    }
}

/// Binds and serves every listen address of a UDP service until `stop`: [`bind`], then
/// [`Listeners::serve`].
///
/// # Errors
/// A listen address that cannot be bound for a reason other than "not on this host yet".
pub async fn serve(svc: Arc<ArcSwap<Service>>, stop: CancellationToken) -> Result<(), ListenError> {
    let cfg = svc.load().cfg.clone();
    bind(&cfg, |_| None)?.serve(svc, stop).await;
    Ok(())
}

/// Retries binding `addr` until it is on this host (or another error goes away), with a bounded backoff.
async fn bind_when_present(
    addr: SocketAddr,
    freebind: bool,
    shared: &Shared,
    stop: &CancellationToken,
) -> Option<ClientSocket> {
    let mut backoff = Backoff::new(BIND_RETRY.0, BIND_RETRY.1);
    let mut last_error: Option<io::ErrorKind> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
        match ClientSocket::bind(addr, freebind) {
            Ok(s) => return Some(s),
            Err(e) if oserror::kind(&e) == OsError::AddrUnavailable => last_error = None,
            Err(e) => {
                // The address is here now, but something else is wrong (in use, ...): say so once per kind.
                if last_error != Some(e.kind()) {
                    warn!(service = %shared.name, listen = %addr, error = %e, "cannot bind the UDP listen address; retrying");
                    last_error = Some(e.kind());
                }
            }
        }
    }
}

/// Keeps this service's `staybound_upstream_up` and `staybound_epoch` equal to the host view its service
/// reads: the followed service's (see [`follows`]), or its own detector's, which sets the same values itself.
async fn mirror_host_state(shared: Arc<Shared>, stop: CancellationToken) {
    let mut view = shared.svc.load().detector.view.clone();
    loop {
        {
            let v = view.borrow_and_update();
            shared.metrics.upstream_up.set(if v.state.connectable() { 1.0 } else { 0.0 });
            shared.metrics.epoch.set(v.epoch as f64);
        }
        let closed = tokio::select! {
            _ = stop.cancelled() => return,
            r = view.changed() => r.is_err(),
            // why: a reload may give the service another detector (its probe turned on or off, or another
            // first dependency) without the followed view changing.
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let current = &shared.svc.load().detector.view;
        if !view.same_channel(current) {
            view = current.clone();
        } else if closed {
            // The detector stopped and the service has no new one yet (a reload in progress).
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

/// What every listener and flow of one UDP service shares.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) metrics: Arc<ServiceMetrics>,
    /// The current generation of the service (replaced on reload).
    pub(crate) svc: Arc<ArcSwap<Service>>,
    /// Origin of the flows' activity clocks.
    base: Instant,
    /// Flows alive across the service's listeners.
    flows: Mutex<FlowCount>,
    logs: [Mutex<RateLimitedLog>; UdpDrop::ALL.len()],
    evict_log: Mutex<RateLimitedLog>,
    source: Mutex<SourceGate>,
    /// Listener, late-bind and flow tasks.
    tasks: TaskTracker,
}

/// The flows alive in a service, in all and by client address (only addresses with a flow are present).
#[derive(Default)]
pub(crate) struct FlowCount {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Whether new flows may try to bind `source`: closed for a backoff after it was not on this host.
struct SourceGate {
    closed_until: Option<Instant>,
    backoff: Backoff,
}

impl Shared {
    /// Milliseconds since the service started serving.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a datagram not relayed, and runs `log` (with the count since the last line) when a line is due.
    pub(crate) fn dropped(&self, reason: UdpDrop, log: impl FnOnce(u64)) {
        self.metrics.udp_dropped(reason).increment(1);
        let index = reason.index();
        let due = lock(&self.logs[index]).hit();
        if let Some(n) = due {
            log(n);
        }
    }

    /// Takes a place for a new flow of a client at `source` when [`table::admit`] says `Open`; else returns
    /// what it said. `own`: the flows of the asking listener.
    fn take_slot(
        self: &Arc<Self>,
        source: IpAddr,
        max_flows: usize,
        per_source: usize,
        own: usize,
    ) -> Result<FlowSlot, table::Admit> {
        let mut count = lock(&self.flows);
        let from_source = count.by_source.get(&source).copied().unwrap_or(0);
        match table::admit(count.total, max_flows, own, from_source, per_source) {
            table::Admit::Open => {
                count.total += 1;
                *count.by_source.entry(source).or_insert(0) += 1;
                Ok(FlowSlot { shared: self.clone(), source })
            }
            other => Err(other),
        }
    }

    /// Gives back the place of a flow that ended.
    fn free_slot(&self, source: IpAddr) {
        let mut count = lock(&self.flows);
        count.total = count.total.saturating_sub(1);
        if let Some(n) = count.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                count.by_source.remove(&source);
            }
        }
        if count.by_source.capacity() > 64 && count.by_source.len() < count.by_source.capacity() / 4 {
            // why: after a flood from many addresses, give the map's memory back.
            count.by_source.shrink_to_fit();
        }
    }

    /// Counts a flow ended to make room, and runs `log` (with the count since the last line) when a line is due.
    pub(crate) fn evicted(&self, log: impl FnOnce(u64)) {
        self.metrics.udp_evicted.increment(1);
        let due = lock(&self.evict_log).hit();
        if let Some(n) = due {
            log(n);
        }
    }

    /// Whether a new flow may try to bind `source` now.
    fn source_gate_open(&self) -> bool {
        lock(&self.source).closed_until.is_none_or(|t| Instant::now() >= t)
    }

    /// `source` was bound: the gate opens (and says so if it was closed).
    fn source_available(&self) {
        let mut gate = lock(&self.source);
        if gate.closed_until.take().is_some() {
            gate.backoff.reset();
            info!(service = %self.name, "the source address is on this host now: new flows are made again");
        }
    }

    /// `source` is not on this host: no new flow tries it again before a backoff.
    fn source_unavailable(&self, source: Option<IpAddr>, e: &io::Error) {
        let mut gate = lock(&self.source);
        let first = gate.closed_until.is_none();
        let delay = gate.backoff.next_delay();
        gate.closed_until = Some(Instant::now() + delay);
        if first {
            warn!(
                service = %self.name, source = ?source, error = %e,
                "the source address is not on this host (yet): datagrams from new clients are dropped (no_flow) until it is; set freebind = true to bind it anyway"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
