//! A running staybound: every service's detector, listeners and sessions, and the admin server, started from
//! a `Config` (or from the sockets an old process handed over, see `upgrade`), reloaded in place on SIGHUP,
//! and shut down with a drain (also after an upgrade handed everything over). It writes what it runs into a
//! [`Registry`] (`registry.rs`), which the admin server and the demo read.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::SockRef;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{self, AdminHandle};
use crate::config::{Config, InterceptConfig, InterceptMethod, Protocol, ServiceConfig};
use crate::failover::{Detector, DetectorHandle, Reconfigure};
use crate::intercept;
use crate::listener;
use crate::metrics::{ServiceMetrics, Telemetry};
pub(crate) use crate::registry::Entry;
pub use crate::registry::Registry;
use crate::service::{Lasting, Service};
use crate::sockopt;
use crate::udp;
use crate::upgrade::{Handed, Kind};

/// One listening socket of a running service.
#[derive(Debug)]
pub struct ListenSocket {
    pub service: String,
    pub protocol: Protocol,
    /// The address as configured (port 0 stays 0; the socket knows the port it got).
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

/// The listen sockets of a service, bound before anything else changes.
enum Bound {
    /// Each configured address with its listener (kept across reloads while the address stays).
    Tcp(Vec<(SocketAddr, Arc<tokio::net::TcpListener>)>),
    Udp(udp::Listeners),
}

/// Why staybound could not start (or a reload could not be applied).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("service {service:?}: cannot listen on {addr}: {source}")]
    Listen {
        service: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin: cannot listen on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct Running {
    entry: Arc<Entry>,
    cfg: Arc<ServiceConfig>,
    metrics: Arc<ServiceMetrics>,
    /// What every generation of the service shares: counts, limit, retry budget, connector.
    lasting: Lasting,
    /// The service's one detector, for as long as its name is in the config.
    detector: DetectorHandle,
    reconfigure: Reconfigure,
    stop_detector: CancellationToken,
    stop_accept: CancellationToken,
    /// The TCP listeners by configured address, reused by a reload that keeps the address.
    tcp: Vec<(SocketAddr, Arc<tokio::net::TcpListener>)>,
    /// A UDP service's listen sockets by configured address, likewise.
    udp: udp::Sockets,
}

impl Running {
    /// Whether `new` names the listen sockets this service has, in the same order: the same addresses, or the
    /// ports they were bound to (a file rewritten with the ports a `:0` got). Then nothing is re-bound and a
    /// UDP service keeps its flows.
    fn same_listeners(&self, new: &ServiceConfig) -> bool {
        let udp = self.udp.all();
        let local = |i: usize, old: &SocketAddr| match new.protocol {
            Protocol::Tcp => self.tcp.get(i).and_then(|(_, l)| l.local_addr().ok()),
            Protocol::Udp => udp.iter().find(|(a, _)| a == old).map(|(_, s)| s.local_addr()),
        };
        self.cfg.protocol == new.protocol
            && self.cfg.listen.len() == new.listen.len()
            && new
                .listen
                .iter()
                .zip(&self.cfg.listen)
                .enumerate()
                .all(|(i, (n, o))| n == o || same_address(*n, *o, local(i, o)))
    }
}

/// Every listening socket bound before a reload (or handed over by the process this one upgrades), by
/// configured address.
#[derive(Default)]
struct Pool {
    tcp: Vec<Pooled<Arc<tokio::net::TcpListener>>>,
    udp: Vec<Pooled<Arc<udp::pktinfo::ClientSocket>>>,
}

struct Pooled<T> {
    addr: SocketAddr,
    local: Option<SocketAddr>,
    sock: T,
    inherited: bool,
    taken: bool,
}

impl<T: Clone> Pooled<T> {
    fn new(addr: SocketAddr, local: Option<SocketAddr>, sock: T, inherited: bool) -> Pooled<T> {
        Pooled { addr, local, sock, inherited, taken: false }
    }
}

fn take<T: Clone>(pool: &mut [Pooled<T>], addr: SocketAddr) -> Option<T> {
    let p = pool.iter_mut().find(|p| takes(addr, p.addr, p.local, p.inherited))?;
    p.taken = true;
    Some(p.sock.clone())
}

impl Pool {
    fn tcp(&mut self, addr: SocketAddr) -> Option<Arc<tokio::net::TcpListener>> {
        take(&mut self.tcp, addr)
    }

    fn udp(&mut self, addr: SocketAddr) -> Option<Arc<udp::pktinfo::ClientSocket>> {
        take(&mut self.udp, addr)
    }

    /// Says which sockets handed over by the old process no config entry took: they close now.
    fn report_unused(&self) {
        let unused = self.tcp.iter().filter(|p| p.inherited && !p.taken).map(|p| (p.addr, "tcp"));
        for (addr, protocol) in
            unused.chain(self.udp.iter().filter(|p| p.inherited && !p.taken).map(|p| (p.addr, "udp")))
        {
            info!(listen = %addr, protocol, "a listen socket handed over by the old process is not in the config: closed");
        }
    }
}

/// Whether a listen address of the new config takes a pooled socket: one bound at the same address (see
/// `same_address`), or one handed over by the old process at exactly the same configured address (port 0
/// included: the same entry of the same file).
fn takes(addr: SocketAddr, configured: SocketAddr, local: Option<SocketAddr>, inherited: bool) -> bool {
    same_address(addr, configured, local) || (inherited && addr == configured)
}

/// Whether a listen address of the new config is a socket already bound at `configured` (as the old config
/// said) or at `local` (as bound, port resolved). A port-0 address asks for a new port: never the same.
fn same_address(addr: SocketAddr, configured: SocketAddr, local: Option<SocketAddr>) -> bool {
    addr.port() != 0 && (addr == configured || local == Some(addr))
}

/// Applies `backlog` (TCP) and `freebind` to a kept listening socket; a failure is logged, the socket stays.
fn retune(service: &str, sock: &SockRef<'_>, local: Option<SocketAddr>, backlog: Option<u32>, freebind: bool) {
    let Some(local) = local else { return };
    if let Err(e) = sockopt::retune_listener(sock, local.ip(), backlog, freebind) {
        warn!(service, listen = %local, error = %e, "could not apply backlog or freebind to a kept listener: it keeps the ones it had");
    }
}

/// A running staybound.
pub struct Instance {
    config: Config,
    registry: Arc<Registry>,
    running: HashMap<String, Running>,
    /// Sockets handed over by the process this one upgrades, until the first `apply` takes them.
    inherited: Vec<(Handed, OwnedFd)>,
    /// What removed services' sessions still drain under, by name, until they end.
    draining: HashMap<String, Lasting>,
    sessions: TaskTracker,
    background: TaskTracker,
    stop_sessions: CancellationToken,
    admin: Option<AdminHandle>,
    /// The interception rules this process installed (nftables table `staybound`), removed at shutdown
    /// unless an upgrade's new process took them over.
    rules: Option<Vec<intercept::Redirect>>,
    /// The connect hook this process attached (`[intercept] method = "connect"`) and what it redirects. Its
    /// links end with the process, however it ends.
    hook: Option<(intercept::Hook, Vec<intercept::Redirect>)>,
}

impl Instance {
    /// Binds every listener and the admin server, and starts every detector.
    ///
    /// # Errors
    /// A listener or the admin address that cannot be bound.
    pub async fn start(config: Config, telemetry: Telemetry) -> Result<Instance, StartError> {
        Instance::start_with(config, telemetry, Vec::new()).await
    }

    /// Starts as [`Instance::start`] does, taking the sockets an old process handed over (see `upgrade`) for
    /// the addresses its config still names; the others close.
    ///
    /// # Errors
    /// A listener or the admin address that cannot be bound.
    pub async fn start_with(
        config: Config,
        telemetry: Telemetry,
        mut inherited: Vec<(Handed, OwnedFd)>,
    ) -> Result<Instance, StartError> {
        let registry = Arc::new(Registry::new(telemetry, config.admin.clone()));
        let admin_socket = inherited.iter().position(|(h, _)| h.kind == Kind::Admin).map(|i| inherited.remove(i));
        let mut instance = Instance {
            config: config.clone(),
            registry: registry.clone(),
            inherited,
            running: HashMap::new(),
            draining: HashMap::new(),
            sessions: TaskTracker::new(),
            background: TaskTracker::new(),
            stop_sessions: CancellationToken::new(),
            admin: None,
            rules: None,
            hook: None,
        };
        // why: bound first (or taken from the process this one upgrades), so a busy admin port fails the
        // start before any service says it listens; served after the services, so an admin endpoint that
        // answers shows all of them.
        let admin_listener = match admin_socket {
            Some((h, fd)) if takes(config.admin.listen, h.addr, Some(h.local), true) => std::net::TcpListener::from(fd),
            _ => admin::bind(config.admin.listen)
                .map_err(|source| StartError::Admin { addr: config.admin.listen, source })?,
        };
        instance.apply(&config).await?;
        let admin = match admin::start_on(admin_listener, registry) {
            Ok(admin) => admin,
            Err(source) => {
                instance.abort().await;
                return Err(StartError::Admin { addr: config.admin.listen, source });
            }
        };
        if !config.admin.listen.ip().is_loopback() {
            warn!(listen = %admin.addr(), "the admin endpoint listens on a non-loopback address: anyone who reaches it can read metrics and status (the failover hook needs the token)");
        }
        instance.admin = Some(admin);
        Ok(instance)
    }

    /// Where the admin endpoint listens, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminHandle::addr)
    }

    /// The bound listen addresses of a service.
    pub fn listen_addrs(&self, service: &str) -> Vec<SocketAddr> {
        self.running.get(service).map(|r| r.entry.bound()).unwrap_or_default()
    }

    /// Every listening socket now bound, each a duplicate of the descriptor (the same kernel socket), with
    /// its service, protocol and configured address.
    ///
    /// # Errors
    /// A descriptor cannot be duplicated (out of descriptors).
    pub fn listen_sockets(&self) -> std::io::Result<Vec<ListenSocket>> {
        let mut out = Vec::new();
        for (name, r) in &self.running {
            for (addr, l) in &r.tcp {
                let fd = l.as_fd().try_clone_to_owned()?;
                out.push(ListenSocket { service: name.clone(), protocol: Protocol::Tcp, addr: *addr, fd });
            }
            for (addr, s) in r.udp.all() {
                let fd = s.fd().try_clone_to_owned()?;
                out.push(ListenSocket { service: name.clone(), protocol: Protocol::Udp, addr, fd });
            }
        }
        Ok(out)
    }

    /// Every listening socket and the admin endpoint's, described for the process an upgrade starts.
    ///
    /// # Errors
    /// A descriptor cannot be duplicated or its address read.
    pub fn handover_sockets(&self) -> std::io::Result<Vec<(Handed, OwnedFd)>> {
        let mut out = Vec::new();
        for s in self.listen_sockets()? {
            let local = local_addr(&s.fd)?;
            let kind = if s.protocol == Protocol::Tcp { Kind::Tcp } else { Kind::Udp };
            out.push((Handed { kind, service: s.service, addr: s.addr, local }, s.fd));
        }
        if let Some(admin) = &self.admin {
            let fd = admin.fd().try_clone_to_owned()?;
            let h = Handed {
                kind: Kind::Admin,
                service: String::new(),
                addr: self.config.admin.listen,
                local: admin.addr(),
            };
            out.push((h, fd));
        }
        Ok(out)
    }

    /// The process an upgrade started accepts now: this one stops its admin endpoint and accepting at once,
    /// serves its open sessions (its detectors with them) until they end or `grace` runs out, and stops.
    pub async fn handed_over(mut self, grace: Duration) {
        if let Some(admin) = self.admin.take() {
            admin.stop();
        }
        // why: the new process replaced the interception table with its own when it started; removing it now
        // would send its clients past it.
        self.rules = None;
        self.shutdown(grace).await;
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies a new config: new services start, removed ones stop accepting and drain, and only addresses not
    /// bound yet are bound: a listen socket whose address stays goes to whichever service names it now, and
    /// takes the new `backlog` and `freebind`. A service that keeps its name is reconfigured, never reset: its
    /// detector (epoch, tokens, host state) keeps watching the sessions made before, its `max_connections`
    /// is resized over them, its retry budget keeps its window; settings of the data path take effect for
    /// new sessions.
    ///
    /// # Errors
    /// A new listener that cannot be bound; nothing is changed then.
    pub async fn reload(&mut self, config: Config) -> Result<(), StartError> {
        if config.admin.listen != self.config.admin.listen {
            warn!(old = %self.config.admin.listen, new = %config.admin.listen, "admin.listen changes take effect at the next restart");
        }
        self.apply(&config).await?;
        // why: the token file was read again with the file; a rotated token is in force from here on.
        let mut admin = config.admin.clone();
        admin.listen = self.config.admin.listen;
        info!(
            hook_token = if admin.token.is_some() { "set" } else { "none" },
            failover_rate = %humantime::format_duration(admin.failover_rate),
            "admin settings applied"
        );
        self.registry.admin.store(Arc::new(admin));
        self.config = config;
        Ok(())
    }

    async fn apply(&mut self, config: &Config) -> Result<(), StartError> {
        // Every socket bound now, whichever service holds it: an address that stays in the config is handed to
        // the service that names it now (a rename, a swap), never bound twice (EADDRINUSE).
        let mut pool = Pool::default();
        for r in self.running.values() {
            for (addr, l) in &r.tcp {
                pool.tcp.push(Pooled::new(*addr, l.local_addr().ok(), l.clone(), false));
            }
            for (addr, sock) in r.udp.all() {
                pool.udp.push(Pooled::new(addr, Some(sock.local_addr()), sock, false));
            }
        }
        for (h, fd) in std::mem::take(&mut self.inherited) {
            match h.kind {
                Kind::Tcp => match inherited_tcp(fd) {
                    Ok(l) => pool.tcp.push(Pooled::new(h.addr, Some(h.local), Arc::new(l), true)),
                    Err(e) => warn!(listen = %h.addr, error = %e, "a TCP listen socket handed over cannot be used"),
                },
                Kind::Udp => match udp::pktinfo::ClientSocket::inherited(std::net::UdpSocket::from(fd)) {
                    Ok(sock) => pool.udp.push(Pooled::new(h.addr, Some(h.local), Arc::new(sock), true)),
                    Err(e) => warn!(listen = %h.addr, error = %e, "a UDP listen socket handed over cannot be used"),
                },
                Kind::Admin => {}
            }
        }
        // Bind every listener that is new or moved before changing anything, so a failure changes nothing.
        let mut bound: HashMap<String, Bound> = HashMap::new();
        for s in &config.services {
            if self.running.get(&s.name).is_some_and(|r| r.same_listeners(s)) {
                continue;
            }
            let listeners = match s.protocol {
                Protocol::Tcp => {
                    let mut listeners = Vec::new();
                    for addr in &s.listen {
                        if let Some(l) = pool.tcp(*addr) {
                            listeners.push((*addr, l));
                            continue;
                        }
                        let l = sockopt::tcp_listener(*addr, s.backlog, s.freebind, &s.keepalive)
                            .map_err(|source| StartError::Listen { service: s.name.clone(), addr: *addr, source })?;
                        listeners.push((*addr, Arc::new(l)));
                    }
                    Bound::Tcp(listeners)
                }
                // An address not on this host yet is no error: the service binds it when it appears.
                Protocol::Udp => Bound::Udp(udp::bind(s, |addr| pool.udp(addr)).map_err(|e| StartError::Listen {
                    service: s.name.clone(),
                    addr: e.addr,
                    source: e.source,
                })?),
            };
            bound.insert(s.name.clone(), listeners);
        }

        pool.report_unused();

        // Sockets kept (by the same service or handed to another) take the new `backlog` and `freebind`.
        for s in &config.services {
            let kept_tcp: Vec<Arc<tokio::net::TcpListener>> = match bound.get(&s.name) {
                Some(Bound::Tcp(l)) => l.iter().map(|(_, l)| l.clone()).collect(),
                Some(Bound::Udp(_)) => Vec::new(),
                None => self
                    .running
                    .get(&s.name)
                    .map(|r| r.tcp.iter().map(|(_, l)| l.clone()).collect())
                    .unwrap_or_default(),
            };
            for l in kept_tcp {
                retune(&s.name, &SockRef::from(&*l), l.local_addr().ok(), Some(s.backlog), s.freebind);
            }
            let kept_udp = match bound.get(&s.name) {
                Some(Bound::Udp(l)) => l.sockets().all(),
                Some(Bound::Tcp(_)) => Vec::new(),
                None => self.running.get(&s.name).map(|r| r.udp.all()).unwrap_or_default(),
            };
            for (_, sock) in kept_udp {
                retune(&s.name, &SockRef::from(&sock.fd()), Some(sock.local_addr()), None, s.freebind);
            }
        }

        // Stop what was removed.
        let keep: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let removed: Vec<String> = self.running.keys().filter(|n| !keep.contains(n.as_str())).cloned().collect();
        for name in removed {
            if let Some(r) = self.running.remove(&name) {
                info!(service = %name, "service removed: it stops accepting; its sessions drain");
                r.stop_accept.cancel();
                r.stop_detector.cancel();
                // why: its sessions drain under its counts and limit; a service of the same name added back
                // before they end takes them over, so its gauges and `max_connections` count them.
                self.draining.insert(name, r.lasting);
            }
        }
        self.draining.retain(|_, l| l.counts.active() + l.counts.held() > 0);

        // Detectors first (new ones started, kept ones reconfigured in place), so dependencies can be wired.
        let mut started = Vec::new();
        for s in &config.services {
            let cfg = Arc::new(s.clone());
            if let Some(r) = self.running.get(&s.name) {
                // why: the shared connector changes before the detector hears of a new address, so a held
                // client that sees the new epoch dials the new address.
                r.lasting.reconfigure(&cfg);
                r.reconfigure.send(cfg);
                continue;
            }
            let metrics = self.registry.telemetry.service(&s.name);
            let lasting = match self.draining.remove(&s.name) {
                Some(l) => {
                    l.reconfigure(&cfg);
                    l
                }
                None => Lasting::new(&cfg, metrics.connect_counts()),
            };
            let (detector, handle, reconfigure) =
                Detector::new(cfg.clone(), metrics.clone(), lasting.connector.clone());
            let stop_detector = CancellationToken::new();
            self.background.spawn(detector.run(stop_detector.clone()));
            started.push(s.name.clone());
            let placeholder = Arc::new(Entry {
                name: s.name.clone(),
                service: Arc::new(ArcSwap::from_pointee(Service::new(
                    cfg.clone(),
                    metrics.clone(),
                    handle.clone(),
                    Vec::new(),
                    &lasting,
                ))),
                listen: Vec::new(),
                udp: None,
            });
            self.running.insert(
                s.name.clone(),
                Running {
                    entry: placeholder,
                    cfg,
                    metrics,
                    lasting,
                    detector: handle,
                    reconfigure,
                    stop_detector,
                    stop_accept: CancellationToken::new(),
                    tcp: Vec::new(),
                    udp: udp::Sockets::default(),
                },
            );
        }

        // why: every service whose listeners change stops accepting before any starts on the sockets it hands
        // over, so a connect in between is taken by the service that names the address now, not the old one.
        for name in bound.keys() {
            if let Some(r) = self.running.get_mut(name) {
                r.stop_accept.cancel();
                r.stop_accept = CancellationToken::new();
            }
        }

        // Services with their (transitive) dependencies, then listeners.
        for s in &config.services {
            let cfg = Arc::new(s.clone());
            let deps = transitive_deps(config, &s.name)
                .into_iter()
                .filter_map(|d| self.running.get(&d).map(|r| (d.clone(), r.detector.view.clone())))
                .collect();
            // A UDP service without a probe of its own takes its host state from the service it follows.
            let followed = s.follows().and_then(|d| self.running.get(d)).map(|d| d.detector.clone());
            let Some(r) = self.running.get_mut(&s.name) else { continue };
            let detector = followed.unwrap_or_else(|| r.detector.clone());
            let service = Service::new(cfg.clone(), r.metrics.clone(), detector, deps, &r.lasting);
            r.cfg = cfg;
            match bound.remove(&s.name) {
                None => r.entry.service.store(Arc::new(service)),
                Some(Bound::Tcp(listeners)) => {
                    let shared = Arc::new(ArcSwap::from_pointee(service));
                    let mut addrs = Vec::new();
                    for (_, l) in &listeners {
                        let addr = l.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                        info!(service = %s.name, listen = %addr, upstream = %s.upstream, "listening");
                        addrs.push(addr);
                        // why: accepted sockets inherit the listener's TCP options (Linux clones the
                        // listening socket), so a listener that has them saves six system calls per client.
                        // Read back, not assumed: a listener inherited from an older process may not.
                        let tuned = sockopt::tuned_as(l, &s.keepalive).then(|| s.keepalive.clone());
                        self.background.spawn(listener::accept_loop(
                            l.clone(),
                            tuned,
                            shared.clone(),
                            r.stop_accept.clone(),
                            self.stop_sessions.clone(),
                            self.sessions.clone(),
                        ));
                    }
                    r.tcp = listeners;
                    r.udp = udp::Sockets::default();
                    r.entry = Arc::new(Entry { name: s.name.clone(), service: shared, listen: addrs, udp: None });
                }
                Some(Bound::Udp(listeners)) => {
                    r.tcp.clear();
                    let shared = Arc::new(ArcSwap::from_pointee(service));
                    let (listen, bound) = (listeners.local_addrs(), listeners.addrs());
                    r.udp = listeners.sockets();
                    // why: a datagram flow has nothing to drain; it stops with the listeners.
                    self.background.spawn(listeners.serve(shared.clone(), r.stop_accept.clone()));
                    r.entry = Arc::new(Entry { name: s.name.clone(), service: shared, listen, udp: Some(bound) });
                }
            }
        }
        let entries: Vec<Arc<Entry>> =
            config.services.iter().filter_map(|s| self.running.get(&s.name).map(|r| r.entry.clone())).collect();
        self.registry.services.store(Arc::new(entries));
        // Guard mode: every new TCP service's epochs are watched as long as its name runs, so a reload can turn
        // guard on or off; whether the kernel allows destroying sockets is found out once, when first needed.
        if config.services.iter().any(|s| s.guard) {
            crate::guard::probe_once(&self.registry.guard).await;
        }
        for name in started {
            if let Some(r) = self.running.get(&name).filter(|r| r.cfg.protocol == Protocol::Tcp) {
                let (registry, board) = (self.registry.clone(), self.registry.guard.clone());
                let key = name.clone();
                let current = move || registry.entry(&key).map(|e| e.service.load_full());
                self.background.spawn(crate::guard::watch(name, current, board, r.stop_detector.clone()));
            }
        }
        // Interception rules last, once every listener they send clients to accepts.
        self.intercept(intercept::redirects(config), &config.intercept).await;
        Ok(())
    }

    /// Redirects `want` the configured way, and ends the other way's redirects if a reload changed it.
    async fn intercept(&mut self, want: Vec<intercept::Redirect>, how: &InterceptConfig) {
        // why: the new way first, then the old one goes, so no connect in between goes past staybound. The
        // two never send one connection twice: after the hook's rewrite the destination is the listener,
        // which no rule matches.
        match how.method {
            InterceptMethod::Nat => {
                self.install_rules(want).await;
                if let Some((hook, _)) = self.hook.take() {
                    info!(cgroup = %hook.cgroup().display(), "connect hook detached: the nftables rules redirect now");
                }
            }
            InterceptMethod::Connect => {
                self.attach_hook(want, how.cgroup.as_deref());
                self.remove_rules().await;
            }
        }
    }

    /// Attaches, updates or detaches the connect hook so it redirects `want`. A failure is logged and shown
    /// in `/status`; the services run on (their listen addresses still work). A changed cgroup gets the new
    /// hook before the old one goes, so no connect in between goes past staybound.
    fn attach_hook(&mut self, want: Vec<intercept::Redirect>, cgroup: Option<&std::path::Path>) {
        if want.is_empty() {
            self.detach_hook();
            return;
        }
        let cgroup = match cgroup.map(|c| Ok(c.to_path_buf())).unwrap_or_else(intercept::cgroup2_root) {
            Ok(c) => c,
            Err(e) => return self.hook_failed(&e.to_string()),
        };
        let result = match self.hook.as_ref().filter(|(hook, _)| hook.cgroup() == cgroup) {
            Some((_, had)) if *had == want => return,
            Some((hook, _)) => hook.update(&want),
            None => intercept::Hook::attach(&cgroup, &want).map(|hook| self.hook = Some((hook, Vec::new()))),
        };
        match result {
            Ok(()) => {
                for r in &want {
                    info!(service = %r.service, upstream = %r.upstream, to = %r.to, cgroup = %cgroup.display(), "intercepting: connects to the upstream from this cgroup are sent to the listener");
                }
                self.registry.intercept.set(Some(format!(
                    "attached by this process: connect hook on cgroup {}, {} redirect(s)",
                    cgroup.display(),
                    want.len()
                )));
                if let Some((_, had)) = &mut self.hook {
                    *had = want;
                }
            }
            Err(e) => self.hook_failed(&e.to_string()),
        }
    }

    fn hook_failed(&mut self, e: &str) {
        error!(error = %e, "cannot attach the connect hook: clients that dial the upstream go past staybound (they can still use the listen address); it needs a cgroup v2 and CAP_BPF with CAP_NET_ADMIN");
        let state = if self.hook.is_some() { "the previous redirects stay" } else { "not attached" };
        self.registry.intercept.set(Some(format!("{state}: {e}")));
    }

    /// Ends this process's connect hook, if it has one: a connect from now on goes where it was meant to.
    fn detach_hook(&mut self) {
        if let Some((hook, _)) = self.hook.take() {
            info!(cgroup = %hook.cgroup().display(), "connect hook detached");
            self.registry.intercept.set(None);
        }
    }

    /// Installs, replaces or removes the interception rules so they redirect `want`. A failure is logged
    /// and shown in `/status`; the services run on (their listen addresses still work).
    async fn install_rules(&mut self, want: Vec<intercept::Redirect>) {
        if self.rules.as_ref() == Some(&want) || (self.rules.is_none() && want.is_empty()) {
            return;
        }
        if want.is_empty() {
            self.remove_rules().await;
            self.registry.intercept.set(None);
            return;
        }
        let redirects = want.clone();
        let result = tokio::task::spawn_blocking(move || intercept::install(&redirects, intercept::Exempt::default()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match result {
            Ok(()) => {
                for r in &want {
                    info!(service = %r.service, upstream = %r.upstream, to = %r.to, table = intercept::TABLE, "intercepting: this host's TCP to the upstream is redirected into the listener");
                }
                self.registry.intercept.set(Some(format!(
                    "installed by this process: nftables table inet {}, {} redirect(s)",
                    intercept::TABLE,
                    want.len()
                )));
                self.rules = Some(want);
            }
            Err(e) => {
                error!(error = %e, "cannot install the interception rules: clients that dial the upstream go past staybound (they can still use the listen address); they need CAP_NET_ADMIN and nft, or `staybound setup` run beforehand with them");
                self.registry.intercept.set(Some(format!("not installed by this process: {e}")));
            }
        }
    }

    /// Deletes the interception table this process installed, if it did.
    async fn remove_rules(&mut self) {
        if self.rules.take().is_none() {
            return;
        }
        match tokio::task::spawn_blocking(intercept::remove).await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(()) => info!(table = intercept::TABLE, "interception rules removed"),
            Err(e) => error!(error = %e, "cannot remove the interception rules: run `staybound cleanup`"),
        }
    }

    /// Stops accepting, lets sessions drain for `grace`, then ends the rest and stops every task.
    pub async fn shutdown(mut self, grace: Duration) {
        // why: first, so a client that dials the upstream from now on goes to it directly instead of to a
        // listener that no longer accepts; redirected sessions keep their NAT record and drain.
        self.remove_rules().await;
        self.detach_hook();
        for r in self.running.values_mut() {
            r.stop_accept.cancel();
            // The listening sockets close now: a new connect is refused, not queued.
            r.tcp.clear();
        }
        self.sessions.close();
        let active: i64 = self.running.values().map(|r| r.lasting.counts.active() + r.lasting.counts.held()).sum();
        info!(sessions = active, grace_ms = grace.as_millis() as u64, "shutting down: draining sessions");
        if tokio::time::timeout(grace, self.sessions.wait()).await.is_err() {
            warn!("drain grace over: ending the remaining sessions");
            self.stop_sessions.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.sessions.wait()).await;
        }
        self.stop_sessions.cancel();
        for r in self.running.values() {
            r.stop_detector.cancel();
        }
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.background.wait()).await;
        if let Some(admin) = self.admin.take() {
            admin.stop();
        }
        info!("stopped");
    }

    /// Ends every session and task at once (SIGINT).
    pub async fn abort(self) {
        self.shutdown(Duration::ZERO).await;
    }
}

/// A TCP listening socket handed over by the old process, ready for tokio.
fn inherited_tcp(fd: OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// The bound address of a socket.
fn local_addr(fd: &OwnedFd) -> std::io::Result<SocketAddr> {
    SockRef::from(fd).local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP socket"))
}

/// Every service `name` depends on, directly or through others.
fn transitive_deps(config: &Config, name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut stack: Vec<&str> = vec![name];
    while let Some(n) = stack.pop() {
        if let Some(s) = config.service(n) {
            for d in &s.depends_on {
                if d != name && !out.contains(d) {
                    out.push(d.clone());
                    stack.push(d);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_address_is_found_by_its_configured_or_bound_address() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
        assert!(same_address(a("127.0.0.1:5000"), a("127.0.0.1:5000"), Some(a("127.0.0.1:5000"))));
        assert!(same_address(a("127.0.0.1:41234"), a("127.0.0.1:0"), Some(a("127.0.0.1:41234"))), "a port 0 bound");
        assert!(!same_address(a("127.0.0.1:0"), a("127.0.0.1:0"), Some(a("127.0.0.1:41234"))), "port 0 is a new port");
        assert!(!same_address(a("127.0.0.2:5000"), a("127.0.0.1:5000"), Some(a("127.0.0.1:5000"))));
        assert!(same_address(a("0.0.0.0:53"), a("0.0.0.0:53"), None), "a UDP address not bound yet");
    }

    #[test]
    fn an_upgrade_takes_the_old_process_s_socket_of_the_same_entry() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
        let bound = Some(a("127.0.0.1:41234"));
        assert!(takes(a("127.0.0.1:0"), a("127.0.0.1:0"), bound, true), "the same :0 entry keeps its port");
        assert!(!takes(a("127.0.0.1:0"), a("127.0.0.1:0"), bound, false), "a reload's :0 is a new port");
        assert!(takes(a("127.0.0.1:41234"), a("127.0.0.1:0"), bound, true));
        assert!(!takes(a("127.0.0.2:0"), a("127.0.0.1:0"), bound, true));
    }
}
