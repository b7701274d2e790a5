//! Guard mode (`guard = true`): no listener and nothing in the data path. The service's detector watches the
//! logical host as usual; when an epoch ends, this host's own established TCP sockets to `upstream` are
//! destroyed with sock_diag `SOCK_DESTROY` (what `ss -K` does), so a legacy client blocked on a session to
//! the old node gets an error (`ECONNABORTED`) at once instead of hanging until its own timers give up.
//!
//! sock_diag sees the sockets of staybound's own network namespace only: staybound runs in the clients'
//! namespace (on the host, or in the pod). Destroying needs `CAP_NET_ADMIN` and a kernel built with
//! `CONFIG_INET_DIAG_DESTROY`; [`probe`] finds out once, on a socket pair of its own, and `check` and
//! `/status` say what it found. staybound's own sockets (the probe connection) are never destroyed.
//!
//! Which sockets go is decided without I/O ([`doomed`]); the netlink side (`diag`) only lists and destroys.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::UpstreamAddr;
use crate::oserror::{self, OsError};
use crate::service::Service;

// why: without the `netlink` feature nothing lists sockets, but the decision stays built and tested.
/// `TCP_ESTABLISHED` in the kernel's socket states.
#[cfg_attr(not(feature = "netlink"), allow(dead_code))]
pub(crate) const TCP_ESTABLISHED: u8 = 1;

/// One TCP socket of this host's network namespace, as sock_diag lists it.
#[cfg_attr(not(feature = "netlink"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    /// The socket's inode: how a socket of this process is recognised.
    pub inode: u32,
}

/// Whether a listed socket is one to destroy at an epoch's end: established, to `upstream` (an IPv4 upstream
/// also as the v4-mapped address of an IPv6 socket), and not one of this process's own (`own` inodes).
#[cfg_attr(not(feature = "netlink"), allow(dead_code))]
pub(crate) fn doomed(c: &Candidate, upstream: SocketAddr, own: &HashSet<u32>) -> bool {
    c.state == TCP_ESTABLISHED
        && c.remote.port() == upstream.port()
        && c.remote.ip().to_canonical() == upstream.ip().to_canonical()
        && !own.contains(&c.inode)
}

/// The inode of a `/proc/self/fd` link that names a socket (`socket:[12345]`).
pub(crate) fn socket_inode(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The inodes of this process's sockets.
fn own_inodes() -> HashSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return HashSet::new() };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| socket_inode(&l.to_string_lossy()))
        .collect()
}

/// Whether this process may destroy sockets here: found once by [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ability {
    #[cfg_attr(not(feature = "netlink"), allow(dead_code))]
    Allowed,
    /// No `CAP_NET_ADMIN`.
    NotPermitted,
    /// The kernel lacks `CONFIG_INET_DIAG_DESTROY`.
    NotInKernel,
    /// Anything else (no netlink here, built without the `netlink` feature, ...).
    Unavailable(String),
}

impl Ability {
    /// What `check` and `/status` say.
    pub(crate) fn describe(&self) -> String {
        match self {
            Ability::Allowed => "allowed (sock_diag SOCK_DESTROY works here)".into(),
            Ability::NotPermitted => "not permitted: destroying sockets needs CAP_NET_ADMIN".into(),
            Ability::NotInKernel => "not supported: the kernel lacks CONFIG_INET_DIAG_DESTROY".into(),
            Ability::Unavailable(why) => format!("not available: {why}"),
        }
    }

    #[cfg_attr(not(feature = "netlink"), allow(dead_code))]
    fn from_error(e: &std::io::Error) -> Ability {
        match oserror::kind(e) {
            OsError::NotPermitted => Ability::NotPermitted,
            OsError::NotSupported => Ability::NotInKernel,
            _ => Ability::Unavailable(e.to_string()),
        }
    }
}

/// Finds out whether sockets can be destroyed here: destroys the client side of a loopback connection of
/// its own and checks that the socket saw it. Blocking (a few system calls).
pub(crate) fn probe() -> Ability {
    #[cfg(feature = "netlink")]
    {
        diag::probe()
    }
    #[cfg(not(feature = "netlink"))]
    {
        Ability::Unavailable("built without the netlink feature".into())
    }
}

/// What one epoch's end did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    pub destroyed: u64,
    /// Sockets that matched but could not be destroyed (a socket gone meanwhile is not counted).
    pub failed: u64,
    pub error: Option<String>,
}

/// Destroys this host's established sockets to `upstream` (see [`doomed`]). Blocking.
///
/// # Errors
/// The sockets could not be listed (no netlink, not permitted).
pub(crate) fn sweep(upstream: SocketAddr) -> std::io::Result<Sweep> {
    #[cfg(feature = "netlink")]
    {
        let own = own_inodes();
        let mut out = Sweep::default();
        // why: an IPv6 socket may reach an IPv4 upstream through its v4-mapped address.
        let families: &[bool] = if upstream.is_ipv4() { &[true, false] } else { &[false] };
        for v4 in families {
            for (c, id) in diag::list(*v4)? {
                if !doomed(&c, upstream, &own) {
                    continue;
                }
                match diag::destroy(*v4, id) {
                    Ok(()) => out.destroyed += 1,
                    Err(e) if oserror::kind(&e) == OsError::NotFound => {}
                    Err(e) => {
                        out.failed += 1;
                        out.error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        }
        Ok(out)
    }
    #[cfg(not(feature = "netlink"))]
    {
        let _ = (upstream, own_inodes());
        Err(std::io::Error::other("built without the netlink feature"))
    }
}

/// The last epoch end a guard service acted on, for `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct LastSweep {
    pub at: SystemTime,
    pub epoch: u64,
    pub sweep: Sweep,
    pub took: Duration,
}

/// What `/status` shows of guard mode: whether the kernel allows it, and each service's last sweep.
#[derive(Debug, Default)]
pub struct Board {
    ability: OnceLock<Ability>,
    last: Mutex<HashMap<String, LastSweep>>,
}

impl Board {
    /// Whether sockets can be destroyed here, probed once (the first time a guard service starts).
    pub(crate) fn ability(&self) -> Option<&Ability> {
        self.ability.get()
    }

    pub fn last(&self, service: &str) -> Option<LastSweep> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).get(service).cloned()
    }

    fn record(&self, service: &str, last: LastSweep) {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).insert(service.to_string(), last);
    }
}

/// Probes the kernel once, on a blocking thread, and logs what it found.
pub(crate) async fn probe_once(board: &Board) {
    if board.ability.get().is_some() {
        return;
    }
    let ability = tokio::task::spawn_blocking(probe)
        .await
        .unwrap_or_else(|e| Ability::Unavailable(format!("the probe did not finish: {e}")));
    match &ability {
        Ability::Allowed => info!("guard mode: destroying sockets is allowed here"),
        other => {
            warn!(guard = %other.describe(), "guard mode cannot destroy sockets here: its clients will not be told of a failover")
        }
    }
    let _ = board.ability.set(ability);
}

/// Watches one service's epochs for as long as its name runs (`stop`): at each epoch's end, if the service
/// is in guard mode then, destroys this host's sockets to the upstream address the epoch had. `current`
/// gives the service as the name now runs it (a reload may give it new settings or new listeners).
pub(crate) async fn watch(
    name: String,
    current: impl Fn() -> Option<Arc<Service>>,
    board: Arc<Board>,
    stop: CancellationToken,
) {
    loop {
        let Some(svc) = current() else { return };
        let mut view = svc.detector.view.clone();
        let (end, epoch) = {
            let v = view.borrow_and_update();
            (v.epoch_end.clone(), v.epoch)
        };
        // why: the address of the epoch that ends: a reload to a new upstream ends the sessions to the old one.
        let target = match &svc.cfg.upstream {
            UpstreamAddr::Ip(addr) => Some(*addr),
            UpstreamAddr::Name { .. } => None,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = end.cancelled() => {}
        }
        let guard_now = current().is_some_and(|s| s.cfg.guard);
        if let (true, Some(upstream)) = (guard_now, target) {
            let started = std::time::Instant::now();
            let result = tokio::task::spawn_blocking(move || sweep(upstream)).await;
            let took = started.elapsed();
            let sweep = match result {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => Sweep { error: Some(e.to_string()), ..Sweep::default() },
                Err(e) => Sweep { error: Some(e.to_string()), ..Sweep::default() },
            };
            svc.metrics.guard_destroyed.increment(sweep.destroyed);
            svc.metrics.guard_failed.increment(sweep.failed);
            if sweep.error.is_none() {
                info!(service = %name, epoch, %upstream, destroyed = sweep.destroyed, took_ms = took.as_millis() as u64, "guard: the epoch ended: this host's sockets to the upstream destroyed");
            } else {
                warn!(service = %name, epoch, %upstream, destroyed = sweep.destroyed, failed = sweep.failed, error = sweep.error.as_deref().unwrap_or(""), "guard: the epoch ended, but not every socket to the upstream could be destroyed");
            }
            board.record(&name, LastSweep { at: SystemTime::now(), epoch, sweep, took });
        }
        // The detector publishes the next epoch's token with the failover; wait for it.
        tokio::select! {
            _ = stop.cancelled() => return,
            r = view.wait_for(|v| !v.epoch_end.is_cancelled()) => if r.is_err() { return },
        }
    }
}

#[cfg(feature = "netlink")]
mod diag {
    //! sock_diag over netlink: list this namespace's established TCP sockets of one family, destroy one.

    use std::io;
    use std::net::SocketAddr;
    use std::time::Duration;

    use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
    use netlink_sys::protocols::NETLINK_SOCK_DIAG;
    use netlink_sys::{Socket, SocketAddr as NlAddr};

    use super::{Ability, Candidate};

    /// How long one netlink answer may take before the kernel is taken not to answer.
    const ANSWER_WITHIN: Duration = Duration::from_secs(2);
    /// Most datagrams one dump is read for: a dump ends with `NLMSG_DONE` long before.
    const MAX_READS: usize = 100_000;

    fn open() -> io::Result<Socket> {
        let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
        s.bind_auto()?;
        s.connect(&NlAddr::new(0, 0))?;
        let sock = socket2::SockRef::from(&s);
        sock.set_read_timeout(Some(ANSWER_WITHIN))?;
        Ok(s)
    }

    fn request(v4: bool, id: SocketId, states: StateFlags) -> SockDiagMessage {
        SockDiagMessage::InetRequest(InetRequest {
            family: if v4 { AF_INET } else { AF_INET6 },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: id,
        })
    }

    fn send<T>(s: &Socket, mut msg: NetlinkMessage<T>) -> io::Result<()>
    where
        T: netlink_packet_core::NetlinkSerializable,
    {
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        s.send(&buf, 0)?;
        Ok(())
    }

    /// Every established TCP socket of the family, with the id that destroys it.
    pub(super) fn list(v4: bool) -> io::Result<Vec<(Candidate, SocketId)>> {
        let s = open()?;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let id = if v4 { SocketId::new_v4() } else { SocketId::new_v6() };
        send(&s, NetlinkMessage::new(header, request(v4, id, StateFlags::ESTABLISHED).into()))?;
        let mut out = Vec::new();
        for _ in 0..MAX_READS {
            let (data, _) = s.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&data[offset..]).map_err(io::Error::other)?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let id = r.header.socket_id.clone();
                        let c = Candidate {
                            local: SocketAddr::new(id.source_address, id.source_port),
                            remote: SocketAddr::new(id.destination_address, id.destination_port),
                            state: r.header.state,
                            inode: r.header.inode,
                        };
                        out.push((c, id));
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                // Netlink messages are aligned to 4 bytes.
                offset += (len + 3) & !3;
            }
        }
        Err(io::Error::other("the socket dump did not end"))
    }

    /// Destroys the socket `id` names (its cookie included, so a socket made anew with the same addresses
    /// and ports is not the one destroyed).
    pub(super) fn destroy(v4: bool, id: SocketId) -> io::Result<()> {
        let s = open()?;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let msg = SockDiagDestroy::new(request(v4, id, StateFlags::all()));
        send(&s, NetlinkMessage::new(header, NetlinkPayload::from(msg)))?;
        let (data, _) = s.recv_from_full()?;
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&data).map_err(io::Error::other)?;
        match msg.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
            _ => Ok(()),
        }
    }

    /// Destroys the client side of a loopback connection of its own; `Allowed` when the socket then
    /// reports the abort.
    pub(super) fn probe() -> Ability {
        let attempt = || -> io::Result<Ability> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let client = std::net::TcpStream::connect(listener.local_addr()?)?;
            let (_server, _) = listener.accept()?;
            let (local, remote) = (client.local_addr()?, client.peer_addr()?);
            let mut id = SocketId::new_v4();
            id.source_address = local.ip();
            id.source_port = local.port();
            id.destination_address = remote.ip();
            id.destination_port = remote.port();
            // why: INET_DIAG_NOCOOKIE: the addresses and ports alone name the socket.
            id.cookie = [0xff; 8];
            if let Err(e) = destroy(true, id) {
                return Ok(Ability::from_error(&e));
            }
            client.set_read_timeout(Some(ANSWER_WITHIN))?;
            let mut buf = [0u8; 1];
            match std::io::Read::read(&mut &client, &mut buf) {
                Err(e) if crate::oserror::kind(&e) == crate::oserror::OsError::Aborted => Ok(Ability::Allowed),
                other => Ok(Ability::Unavailable(format!(
                    "a destroyed socket of staybound's own did not report the abort ({other:?})"
                ))),
            }
        };
        attempt().unwrap_or_else(|e| Ability::Unavailable(format!("the check could not run: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_established_sockets_to_the_upstream_that_are_not_ours_are_doomed() {
        let up = sa("198.18.0.100:6379");
        let own: HashSet<u32> = [7].into();
        let c = |remote: &str, state: u8, inode: u32| Candidate {
            local: sa("198.18.0.10:40000"),
            remote: sa(remote),
            state,
            inode,
        };
        // Every combination of the three conditions: only all three together doom a socket.
        for remote in ["198.18.0.100:6379", "[::ffff:198.18.0.100]:6379", "198.18.0.100:6380", "198.18.0.1:6379"] {
            for state in 0..=12u8 {
                for inode in [7u32, 8] {
                    let to_upstream = remote.contains("198.18.0.100]:6379") || remote == "198.18.0.100:6379";
                    let want = to_upstream && state == TCP_ESTABLISHED && inode != 7;
                    assert_eq!(
                        doomed(&c(remote, state, inode), up, &own),
                        want,
                        "{remote} state {state} inode {inode}"
                    );
                }
            }
        }
        let up6 = sa("[2001:db8::1]:5432");
        let six = Candidate { local: sa("[2001:db8::2]:1"), remote: up6, state: TCP_ESTABLISHED, inode: 1 };
        assert!(doomed(&six, up6, &own));
        assert!(!doomed(&six, up, &own));
    }

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("socket:[]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[99999999999]"), None, "not a u32");
    }

    #[test]
    fn abilities_say_what_is_missing() {
        let e = |n| Ability::from_error(&std::io::Error::from_raw_os_error(n));
        assert_eq!(e(libc::EPERM), Ability::NotPermitted);
        assert_eq!(e(libc::EOPNOTSUPP), Ability::NotInKernel);
        assert!(matches!(e(libc::EINVAL), Ability::Unavailable(_)));
        assert!(Ability::NotPermitted.describe().contains("CAP_NET_ADMIN"));
        assert!(Ability::NotInKernel.describe().contains("CONFIG_INET_DIAG_DESTROY"));
    }

    #[test]
    fn ip_canonical_form_is_what_is_compared() {
        use std::net::IpAddr;
        let v4: IpAddr = "198.18.0.100".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.0.100".parse().unwrap();
        assert_eq!(mapped.to_canonical(), v4);
    }
}
