//! Neighbour-table watch: the "same-LAN gratuitous ARP / unsolicited NA" failover sign.
//!
//! When an HA cluster moves a logical host (a relocatable IP address) to another node on the
//! same LAN, the new node announces it with a gratuitous ARP (IPv4) or an unsolicited Neighbour
//! Advertisement with the override flag (IPv6). The kernel of every host that already has a
//! neighbour entry for that address rewrites the entry's link-layer address to the new node's
//! one and sends an `RTM_NEWNEIGH` notification to the `RTNLGRP_NEIGH` netlink group.
//!
//! This module owns that sign and nothing else:
//! - [`NeighborWatch`] / [`watch`] subscribe to `RTNLGRP_NEIGH`, seed the known link-layer
//!   address of each watched IP from a dump of the neighbour table, and report a
//!   [`NeighborChange`] each time the address of a watched IP changes from a known value to a
//!   different one. A repeat of the same address, or an entry passing through a state without a
//!   usable address (`INCOMPLETE`, `FAILED`, deleted), is not a change: the last known address
//!   is kept across those. A netlink receive-buffer overrun triggers a re-dump so no change is
//!   lost silently.
//! - [`is_directly_connected`] tells whether the sign can exist at all for an address: only a
//!   destination on a directly connected, ARP/NDP-capable network has a neighbour entry.
//! - [`resolve_again`] forces the entry of one IP to be resolved anew (it deletes it), for when the
//!   takeover's announcement was lost or filtered and the entry still holds the old node's address.
//!
//! Netlink access can be missing (the `netlink` cargo feature is off, the kernel has no
//! netlink, or a container/sandbox denies `NETLINK_ROUTE` sockets). That is reported as
//! [`WatchError::Unavailable`] so callers can run without this sign. No privilege is needed
//! otherwise: reading the neighbour table and joining `RTNLGRP_NEIGH` do not need
//! `CAP_NET_ADMIN`. Only [`resolve_again`] changes the table, and it needs `CAP_NET_ADMIN`: without
//! it the kernel refuses (`EPERM`), reported as [`WatchError::Unavailable`].
//!
//! With the default `arp_accept=0` (and `accept_untracked_na=0` for IPv6) the kernel only
//! *updates* an existing entry on a gratuitous announcement (in any state, `FAILED` included; it
//! then goes `STALE` with the new address); it never creates one. Callers must keep an entry for
//! each watched address alive with their own traffic to it (see [`NeighborWatch::known`]): once
//! the table holds more than `gc_thresh1` (128) entries, unused ones are collected after
//! `gc_stale_time` (60 s).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::IpAddr;

/// One observed change of the link-layer address of a watched IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborChange {
    /// The watched IP address whose neighbour entry changed.
    pub ip: IpAddr,
    /// Interface index of the neighbour entry.
    pub ifindex: u32,
    /// The link-layer address known before the change (6 bytes for Ethernet).
    pub old: Vec<u8>,
    /// The new link-layer address.
    pub new: Vec<u8>,
    /// The entry had no usable address in between (deleted, `INCOMPLETE`, `FAILED`): the new one answers
    /// a resolution, not an announcement (a gratuitous ARP updates an entry that has an address, it
    /// never makes one).
    pub resolved: bool,
}

impl fmt::Display for NeighborChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (ifindex {}): {} -> {}", self.ip, self.ifindex, Lladdr(&self.old), Lladdr(&self.new))
    }
}

/// A fingerprint of a link-layer address, so signs can carry and compare it without holding the bytes.
pub(crate) fn fingerprint(lladdr: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    // why: DefaultHasher::new() has fixed keys: the same address gives the same value all process long.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    lladdr.hash(&mut h);
    h.finish()
}

/// Formats a link-layer address as colon-separated hex (`02:00:5e:00:01:02`).
struct Lladdr<'a>(&'a [u8]);

impl fmt::Display for Lladdr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why the neighbour-table watch could not run or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchError {
    /// Netlink route sockets cannot be used here (feature `netlink` disabled, no kernel
    /// support, or denied by a container/sandbox). The sign is unavailable: degrade cleanly.
    Unavailable(String),
    /// The netlink connection failed after it had been set up.
    Netlink(String),
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(m) => write!(f, "neighbour-table watch unavailable: {m}"),
            Self::Netlink(m) => write!(f, "neighbour-table watch failed: {m}"),
        }
    }
}

impl std::error::Error for WatchError {}

#[cfg(not(feature = "netlink"))]
fn no_netlink() -> WatchError {
    WatchError::Unavailable("built without the `netlink` cargo feature".into())
}

/// Pure bookkeeping of the last known link-layer address per (IP, interface).
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "netlink"), allow(dead_code))]
struct Tracker {
    ips: HashSet<IpAddr>,
    known: HashMap<(IpAddr, u32), Vec<u8>>,
    /// Entries seen without a usable address since their last known one.
    unresolved: HashSet<(IpAddr, u32)>,
}

#[cfg_attr(not(feature = "netlink"), allow(dead_code))]
impl Tracker {
    fn new(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            ips: ips.into_iter().map(|ip| ip.to_canonical()).collect(),
            known: HashMap::new(),
            unresolved: HashSet::new(),
        }
    }

    /// Records one neighbour-table observation. `lladdr` is `None` when the entry has no
    /// usable address (INCOMPLETE, FAILED, NONE, deleted): the last known one is then kept.
    fn observe(&mut self, ip: IpAddr, ifindex: u32, lladdr: Option<&[u8]>) -> Option<NeighborChange> {
        let ip = ip.to_canonical();
        if !self.ips.contains(&ip) {
            return None;
        }
        let Some(new) = lladdr.filter(|a| !a.is_empty()) else {
            self.unresolved.insert((ip, ifindex));
            return None;
        };
        let resolved = self.unresolved.remove(&(ip, ifindex));
        match self.known.get_mut(&(ip, ifindex)) {
            Some(old) if old.as_slice() == new => None,
            Some(old) => {
                let old = std::mem::replace(old, new.to_vec());
                Some(NeighborChange { ip, ifindex, old, new: new.to_vec(), resolved })
            }
            None => {
                self.known.insert((ip, ifindex), new.to_vec());
                None
            }
        }
    }

    fn known(&self, ip: IpAddr) -> Option<&[u8]> {
        let ip = ip.to_canonical();
        self.known
            .iter()
            .filter(|((k, _), _)| *k == ip)
            .min_by_key(|((_, ifindex), _)| *ifindex)
            .map(|(_, v)| v.as_slice())
    }
}

/// A neighbour-table watch that is subscribed and seeded, ready to [`run`](Self::run).
///
/// Splitting [`start`](Self::start) from `run` lets a caller learn whether the sign is
/// available (and which addresses already have an entry) before spawning the long-running part.
/// Notifications arriving in between are queued, not lost.
pub struct NeighborWatch {
    tracker: Tracker,
    #[cfg(feature = "netlink")]
    conn: imp::Conn,
}

impl fmt::Debug for NeighborWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NeighborWatch").field("tracker", &self.tracker).finish_non_exhaustive()
    }
}

impl NeighborWatch {
    /// Subscribes to `RTNLGRP_NEIGH` (IPv4 ARP and IPv6 NDP entries alike), then seeds the known
    /// link-layer address of each of `ips` from a dump of the current neighbour table.
    ///
    /// Subscribing before dumping means no change between the two is missed.
    pub async fn start(ips: Vec<IpAddr>) -> Result<Self, WatchError> {
        #[cfg(feature = "netlink")]
        {
            let mut tracker = Tracker::new(ips);
            let conn = imp::Conn::open()?;
            imp::dump(&conn.handle, &mut tracker, |_| {})
                .await
                .map_err(|e| WatchError::Unavailable(format!("cannot dump the neighbour table: {e}")))?;
            tracing::debug!(watched = tracker.ips.len(), seeded = tracker.known.len(), "neighbour watch started");
            Ok(Self { tracker, conn })
        }
        #[cfg(not(feature = "netlink"))]
        {
            let _ = ips;
            Err(no_netlink())
        }
    }

    /// The link-layer address currently known for `ip` (on the lowest interface index if it
    /// has entries on several), or `None` if it has no neighbour entry with an address yet.
    /// A gratuitous ARP/NA cannot update a missing entry: send traffic to `ip` to create it.
    pub fn known(&self, ip: IpAddr) -> Option<&[u8]> {
        self.tracker.known(ip)
    }

    /// Reports on `tx` each change of the link-layer address of a watched IP until `cancel`
    /// completes (`Ok`), `tx` is closed (`Ok`), or the netlink connection fails (`Err`).
    pub async fn run(
        self,
        tx: tokio::sync::mpsc::Sender<NeighborChange>,
        cancel: impl Future<Output = ()>,
    ) -> Result<(), WatchError> {
        #[cfg(feature = "netlink")]
        {
            let Self { mut tracker, conn } = self;
            tokio::select! {
                r = conn.event_loop(&mut tracker, &tx) => r,
                () = cancel => Ok(()),
                () = tx.closed() => Ok(()),
            }
        }
        #[cfg(not(feature = "netlink"))]
        {
            let _ = (self, tx, cancel);
            Err(no_netlink())
        }
    }
}

/// Subscribes to `RTM_NEWNEIGH`/`RTM_DELNEIGH` notifications (`RTNLGRP_NEIGH`) and reports on
/// `tx` each time the link-layer address of one of `ips` changes from a known value to a
/// different one. Seeds the known addresses from a dump of the neighbour table at start.
///
/// Equivalent to [`NeighborWatch::start`] followed by [`NeighborWatch::run`]. Returns `Ok(())`
/// when `cancel` completes or `tx` is closed, [`WatchError::Unavailable`] at once if netlink
/// cannot be used here, and [`WatchError::Netlink`] if the connection fails later.
pub async fn watch(
    ips: Vec<IpAddr>,
    tx: tokio::sync::mpsc::Sender<NeighborChange>,
    cancel: impl Future<Output = ()>,
) -> Result<(), WatchError> {
    NeighborWatch::start(ips).await?.run(tx, cancel).await
}

/// Why the neighbour-table sign cannot exist for `ip`, in the words `check` and `/status` show; `None`
/// when it can (a directly connected network).
pub async fn unavailable(ip: IpAddr) -> Option<String> {
    if ip.to_canonical().is_loopback() {
        return Some("the upstream is on loopback: this host itself, where no ARP is sent".into());
    }
    match is_directly_connected(ip).await {
        Ok(true) => None,
        Ok(false) => Some(
            "the upstream is not on a directly connected network: it is routed (no gratuitous ARP reaches this \
             host) or an address of this host"
                .into(),
        ),
        Err(e) => Some(e.to_string()),
    }
}

/// Whether `ip` is on a directly connected network of this host, so that the neighbour-table
/// sign can exist for it: the kernel's route for it (`RTM_GETROUTE`, like `ip route get`) is a
/// unicast route with no gateway, through an interface that is neither loopback nor `NOARP`.
///
/// An address of this host itself, an unreachable one, or one behind a router gives `Ok(false)`.
pub async fn is_directly_connected(ip: IpAddr) -> Result<bool, WatchError> {
    #[cfg(feature = "netlink")]
    {
        imp::is_directly_connected(ip.to_canonical()).await
    }
    #[cfg(not(feature = "netlink"))]
    {
        let _ = ip;
        Err(no_netlink())
    }
}

/// What [`resolve_again`] did to the neighbour entry of an IP.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "netlink"), allow(dead_code))]
pub(crate) enum Resolve {
    /// The entry was deleted: the next packet to the IP resolves it anew with a broadcast request.
    Deleted {
        /// Interface index of the entry deleted (the first, if there were several).
        ifindex: u32,
        /// The link-layer address the entry held.
        lladdr: Vec<u8>,
    },
    /// No entry holds a link-layer address to forget (none, `INCOMPLETE`, `FAILED`): the kernel resolves
    /// it anew on the next packet anyway.
    Nothing,
    /// The entry is `PERMANENT` or `NOARP`: set by hand or not resolved by ARP/NDP, so left alone.
    Static,
}

/// Forces the neighbour entry of `ip` to be resolved anew, so that the next packet to it asks the LAN who
/// holds it now instead of going to a link-layer address known from before: for a takeover whose
/// gratuitous ARP (or unsolicited NA) was lost or filtered, which the kernel's own timers would only
/// notice after its `reachable_time` (15 to 45 s), `delay_first_probe_time` (5 s) and unicast probes.
///
/// Only entries of `ip` that hold an address and were learnt (`REACHABLE`, `STALE`, `DELAY`, `PROBE`)
/// are touched; `PERMANENT` and `NOARP` ones and every other IP's are not. Needs `CAP_NET_ADMIN`: a
/// refusal is [`WatchError::Unavailable`].
pub(crate) async fn resolve_again(ip: IpAddr) -> Result<Resolve, WatchError> {
    #[cfg(feature = "netlink")]
    {
        imp::resolve_again(ip.to_canonical()).await
    }
    #[cfg(not(feature = "netlink"))]
    {
        let _ = ip;
        Err(no_netlink())
    }
}

#[cfg(feature = "netlink")]
mod imp {
    use std::io::ErrorKind;
    use std::net::IpAddr;
    use std::time::Duration;

    use futures_util::{StreamExt, TryStreamExt};
    use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
    use rtnetlink::packet_route::link::LinkFlags;
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    };
    use rtnetlink::packet_route::route::{RouteAttribute, RouteType};
    use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
    use tokio::task::JoinHandle;

    use super::{NeighborChange, Resolve, Tracker, WatchError};

    /// Receive buffer asked for the multicast socket (capped by `net.core.rmem_max`); bursts of
    /// neighbour churn beyond it cause an overrun, which is handled by a re-dump.
    const RX_BUF: i32 = 1 << 20; // a C `int`, as SO_RCVBUF takes

    /// Bound on one dump of the neighbour table, so a lost reply cannot stall the watch.
    const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

    type Messages = futures_util::stream::BoxStream<'static, (NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

    /// The task driving a netlink connection, aborted when this is dropped (also on cancellation).
    struct Driver(JoinHandle<()>);

    impl Drop for Driver {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// A netlink connection subscribed to `RTNLGRP_NEIGH`.
    pub(super) struct Conn {
        pub(super) handle: Handle,
        messages: Messages,
        _driver: Driver,
    }

    impl Conn {
        pub(super) fn open() -> Result<Self, WatchError> {
            let (mut conn, handle, messages) =
                rtnetlink::new_multicast_connection(&[MulticastGroup::Neigh]).map_err(|e| {
                    WatchError::Unavailable(format!(
                        "cannot open a NETLINK_ROUTE socket subscribed to RTNLGRP_NEIGH ({e}); \
                         netlink may be denied in this container or sandbox"
                    ))
                })?;
            if let Err(e) = conn.socket_mut().socket_ref().set_rx_buf_sz(RX_BUF) {
                tracing::debug!(error = %e, "cannot enlarge the netlink receive buffer");
            }
            let _driver = Driver(tokio::spawn(conn));
            Ok(Self { handle, messages: messages.boxed(), _driver })
        }

        pub(super) async fn event_loop(
            mut self,
            tracker: &mut Tracker,
            tx: &tokio::sync::mpsc::Sender<NeighborChange>,
        ) -> Result<(), WatchError> {
            while let Some((msg, _)) = self.messages.next().await {
                let change = match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => observe(tracker, &n, false),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => observe(tracker, &n, true),
                    NetlinkPayload::Overrun(_) => {
                        tracing::warn!("netlink receive buffer overrun: neighbour notifications lost, re-dumping");
                        let mut changes = Vec::new();
                        dump(&self.handle, tracker, |c| changes.push(c))
                            .await
                            .map_err(|e| WatchError::Netlink(format!("re-dump after overrun failed: {e}")))?;
                        for c in changes {
                            if !send(tx, c).await {
                                return Ok(());
                            }
                        }
                        continue;
                    }
                    _ => None,
                };
                if let Some(c) = change
                    && !send(tx, c).await
                {
                    return Ok(());
                }
            }
            Err(WatchError::Netlink("the netlink connection closed".into()))
        }
    }

    /// Dumps the IPv4 and IPv6 neighbour tables through `tracker`, passing each change found
    /// (against what was known before) to `on_change`.
    pub(super) async fn dump(
        handle: &Handle,
        tracker: &mut Tracker,
        mut on_change: impl FnMut(NeighborChange),
    ) -> Result<(), String> {
        let all = async {
            for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                let mut entries = handle.neighbours().get().set_address_family(family).execute();
                while let Some(msg) = entries.try_next().await.map_err(|e| e.to_string())? {
                    if let Some(change) = observe(tracker, &msg, false) {
                        on_change(change);
                    }
                }
            }
            Ok(())
        };
        tokio::time::timeout(DUMP_TIMEOUT, all).await.unwrap_or_else(|_| Err(format!("no reply in {DUMP_TIMEOUT:?}")))
    }

    /// Bound on one forced re-resolution (a dump and a delete), so the detector never waits long on it.
    const RESOLVE_TIMEOUT: Duration = Duration::from_millis(500);

    pub(super) async fn resolve_again(ip: IpAddr) -> Result<Resolve, WatchError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
            WatchError::Unavailable(format!(
                "cannot open a NETLINK_ROUTE socket ({e}); netlink may be denied in this container or sandbox"
            ))
        })?;
        let _driver = Driver(tokio::spawn(conn));
        tokio::time::timeout(RESOLVE_TIMEOUT, forget(&handle, ip))
            .await
            .unwrap_or_else(|_| Err(WatchError::Netlink(format!("no reply in {RESOLVE_TIMEOUT:?}"))))
    }

    /// Deletes the learnt entries of `ip` (see [`super::resolve_again`]).
    async fn forget(handle: &Handle, ip: IpAddr) -> Result<Resolve, WatchError> {
        // why: delete rather than set NUD_PROBE. A PROBE entry is probed by unicast first, `ucast_probes`
        // (3) requests `retrans_time` (1 s) apart, to the old link-layer address, which no longer answers
        // for the IP: three seconds before the first broadcast. A deleted entry is made anew (INCOMPLETE)
        // by the next packet, whose request is broadcast at once, so the node that holds the IP now
        // answers within a round trip. The watch keeps the last known address across a delete, so the
        // new one is still seen as a change.
        let family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let mut learnt = Vec::new();
        let mut fixed = false;
        let mut entries = handle.neighbours().get().set_address_family(family).execute();
        while let Some(msg) = entries.try_next().await.map_err(|e| unavailable_or_netlink("neighbour dump", e))? {
            let Some((entry_ip, ifindex, lladdr)) = parse(&msg, false) else { continue };
            if entry_ip.to_canonical() != ip {
                continue;
            }
            match (msg.header.state, lladdr) {
                (NeighbourState::Permanent | NeighbourState::Noarp, _) => fixed = true,
                (_, Some(lladdr)) if !lladdr.is_empty() => learnt.push((ifindex, lladdr.to_vec())),
                _ => {}
            }
        }
        let mut deleted = None;
        for (ifindex, lladdr) in learnt {
            let mut msg = NeighbourMessage::default();
            msg.header.family = family;
            msg.header.ifindex = ifindex;
            msg.attributes = vec![NeighbourAttribute::Destination(match ip {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            })];
            match handle.neighbours().del(msg).execute().await {
                Ok(()) => {
                    deleted.get_or_insert(Resolve::Deleted { ifindex, lladdr });
                }
                // ENOENT: gone meanwhile (the kernel's own garbage collection): nothing left to forget.
                Err(rtnetlink::Error::NetlinkError(e)) if e.to_io().kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(unavailable_or_netlink("neighbour delete", e)),
            }
        }
        Ok(deleted.unwrap_or(if fixed { Resolve::Static } else { Resolve::Nothing }))
    }

    /// Sends `c`; false if the receiver is gone.
    async fn send(tx: &tokio::sync::mpsc::Sender<NeighborChange>, c: NeighborChange) -> bool {
        tracing::debug!(change = %c, "neighbour link-layer address changed");
        tx.send(c).await.is_ok()
    }

    /// The parts of one neighbour message that matter, or `None` if it is not an IPv4/IPv6
    /// neighbour entry (bridge FDB entries share the group and may carry an IP in `NDA_DST`).
    pub(super) fn parse(msg: &NeighbourMessage, deleted: bool) -> Option<(IpAddr, u32, Option<&[u8]>)> {
        if !matches!(msg.header.family, AddressFamily::Inet | AddressFamily::Inet6)
            || msg.header.flags.contains(NeighbourFlags::Proxy)
        {
            return None;
        }
        let mut ip = None;
        let mut lladdr = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => ip = Some(IpAddr::V6(*a)),
                NeighbourAttribute::LinkLayerAddress(a) => lladdr = Some(a.as_slice()),
                _ => {}
            }
        }
        // Only NUD_VALID states carry a meaningful address (the kernel omits it otherwise).
        let valid = !deleted
            && matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
        Some((ip?, msg.header.ifindex, lladdr.filter(|_| valid)))
    }

    fn observe(tracker: &mut Tracker, msg: &NeighbourMessage, deleted: bool) -> Option<NeighborChange> {
        let (ip, ifindex, lladdr) = parse(msg, deleted)?;
        if tracker.ips.contains(&ip.to_canonical()) {
            tracing::debug!(
                %ip, ifindex, deleted, state = ?msg.header.state,
                lladdr = %super::Lladdr(lladdr.unwrap_or_default()),
                "neighbour event"
            );
        }
        tracker.observe(ip, ifindex, lladdr)
    }

    pub(super) async fn is_directly_connected(ip: IpAddr) -> Result<bool, WatchError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
            WatchError::Unavailable(format!(
                "cannot open a NETLINK_ROUTE socket ({e}); netlink may be denied in this container or sandbox"
            ))
        })?;
        let _driver = Driver(tokio::spawn(conn));
        lookup(&handle, ip).await
    }

    async fn lookup(handle: &Handle, ip: IpAddr) -> Result<bool, WatchError> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let query = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, prefix)
            .map_err(|e| WatchError::Netlink(e.to_string()))?
            .build();
        let route = match handle.route().get(query).execute().try_next().await {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(false),
            // ENETUNREACH, EHOSTUNREACH, EACCES (a `prohibit` route), EINVAL (`blackhole`): no usable route.
            Err(rtnetlink::Error::NetlinkError(e))
                if matches!(
                    e.to_io().kind(),
                    ErrorKind::NetworkUnreachable
                        | ErrorKind::HostUnreachable
                        | ErrorKind::PermissionDenied
                        | ErrorKind::InvalidInput
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(unavailable_or_netlink("route lookup", e)),
        };
        let has_gateway = route.attributes.iter().any(|a| match a {
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => true,
            RouteAttribute::MultiPath(hops) => hops
                .iter()
                .any(|h| h.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_)))),
            _ => false,
        });
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let (RouteType::Unicast, false, Some(oif)) = (route.header.kind, has_gateway, oif) else {
            return Ok(false);
        };
        let link = handle
            .link()
            .get()
            .match_index(oif)
            .execute()
            .try_next()
            .await
            .map_err(|e| unavailable_or_netlink("link lookup", e))?;
        Ok(link.is_some_and(|l| !l.header.flags.intersects(LinkFlags::Loopback | LinkFlags::Noarp)))
    }

    fn unavailable_or_netlink(what: &str, e: rtnetlink::Error) -> WatchError {
        match &e {
            // EPERM, EACCES, EOPNOTSUPP: a sandbox that lets the socket open but refuses requests.
            rtnetlink::Error::NetlinkError(m)
                if matches!(m.to_io().kind(), ErrorKind::PermissionDenied | ErrorKind::Unsupported) =>
            {
                WatchError::Unavailable(format!("{what} refused: {e}"))
            }
            _ => WatchError::Netlink(format!("{what} failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    #[test]
    fn first_sighting_seeds_and_same_address_is_no_change() {
        let mut t = Tracker::new([v4(100)]);
        assert_eq!(t.observe(v4(100), 3, Some(&A)), None);
        assert_eq!(t.observe(v4(100), 3, Some(&A)), None);
        assert_eq!(t.known(v4(100)), Some(&A[..]));
    }

    #[test]
    fn different_address_is_a_change_once() {
        let mut t = Tracker::new([v4(100)]);
        t.observe(v4(100), 3, Some(&A));
        let c = t.observe(v4(100), 3, Some(&B)).expect("change");
        assert_eq!(
            (c.ip, c.ifindex, c.old.as_slice(), c.new.as_slice(), c.resolved),
            (v4(100), 3, &A[..], &B[..], false)
        );
        assert_eq!(c.to_string(), "198.18.0.100 (ifindex 3): 02:00:00:00:00:0a -> 02:00:00:00:00:0b");
        assert_eq!(t.observe(v4(100), 3, Some(&B)), None);
        assert!(t.observe(v4(100), 3, Some(&A)).is_some_and(|c| !c.resolved), "failback is a change too");
    }

    #[test]
    fn a_change_after_the_entry_lost_its_address_answers_a_resolution() {
        let mut t = Tracker::new([v4(100)]);
        t.observe(v4(100), 3, Some(&A));
        assert!(t.observe(v4(100), 3, Some(&B)).is_some_and(|c| !c.resolved), "an announcement");
        t.observe(v4(100), 3, None); // deleted, then INCOMPLETE
        t.observe(v4(100), 3, None);
        assert!(t.observe(v4(100), 3, Some(&A)).is_some_and(|c| c.resolved), "the resolution's answer");
        // Resolved to the same address: no change, and the next change is an announcement again.
        t.observe(v4(100), 3, None);
        assert_eq!(t.observe(v4(100), 3, Some(&A)), None);
        assert!(t.observe(v4(100), 3, Some(&B)).is_some_and(|c| !c.resolved));
    }

    #[test]
    fn no_address_states_keep_the_last_known_one() {
        let mut t = Tracker::new([v4(100)]);
        t.observe(v4(100), 3, Some(&A));
        assert_eq!(t.observe(v4(100), 3, None), None); // FAILED / INCOMPLETE / deleted
        assert_eq!(t.observe(v4(100), 3, Some(&[])), None);
        assert_eq!(t.known(v4(100)), Some(&A[..]));
        assert!(t.observe(v4(100), 3, Some(&B)).is_some());
    }

    #[test]
    fn unwatched_ips_and_other_interfaces_are_separate() {
        let mut t = Tracker::new([v4(100)]);
        assert_eq!(t.observe(v4(101), 3, Some(&A)), None);
        assert_eq!(t.observe(v4(101), 3, Some(&B)), None);
        t.observe(v4(100), 3, Some(&A));
        assert_eq!(t.observe(v4(100), 4, Some(&B)), None, "first sighting on another interface");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_canonicalised_and_ipv6_works() {
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 100).to_ipv6_mapped());
        let mut t = Tracker::new([mapped]);
        t.observe(v4(100), 3, Some(&A));
        assert!(t.observe(v4(100), 3, Some(&B)).is_some());

        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100));
        let mut t = Tracker::new([v6]);
        t.observe(v6, 3, Some(&A));
        assert!(t.observe(v6, 3, Some(&B)).is_some());
    }

    #[cfg(not(feature = "netlink"))]
    #[tokio::test]
    async fn without_netlink_the_sign_is_unavailable() {
        let err = NeighborWatch::start(vec![v4(100)]).await.expect_err("no netlink");
        assert!(matches!(err, WatchError::Unavailable(_)), "{err}");
        let err = is_directly_connected(v4(100)).await.expect_err("no netlink");
        assert!(matches!(err, WatchError::Unavailable(_)), "{err}");
        let err = resolve_again(v4(100)).await.expect_err("no netlink");
        assert!(matches!(err, WatchError::Unavailable(_)), "{err}");
    }

    /// `run` must be spawnable on a multi-threaded runtime.
    #[allow(dead_code)]
    fn run_future_is_send(w: NeighborWatch, tx: tokio::sync::mpsc::Sender<NeighborChange>) {
        fn is_send<T: Send>(_: T) {}
        is_send(w.run(tx, std::future::pending()));
        is_send(watch(Vec::new(), tokio::sync::mpsc::channel(1).0, std::future::pending()));
        is_send(is_directly_connected(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[cfg(feature = "netlink")]
    #[test]
    fn parse_ignores_bridge_fdb_proxy_and_addressless_states() {
        use rtnetlink::packet_route::AddressFamily;
        use rtnetlink::packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        };
        let msg = |family, state, flags| {
            let mut m = NeighbourMessage::default();
            m.header.family = family;
            m.header.ifindex = 3;
            m.header.state = state;
            m.header.flags = flags;
            m.attributes = vec![
                NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(198, 18, 0, 100))),
                NeighbourAttribute::LinkLayerAddress(A.to_vec()),
            ];
            m
        };
        let none = NeighbourFlags::empty();
        let ok = msg(AddressFamily::Inet, NeighbourState::Stale, none);
        assert_eq!(imp::parse(&ok, false), Some((v4(100), 3, Some(&A[..]))));
        assert_eq!(imp::parse(&ok, true), Some((v4(100), 3, None)));
        let failed = msg(AddressFamily::Inet, NeighbourState::Failed, none);
        assert_eq!(imp::parse(&failed, false), Some((v4(100), 3, None)));
        let incomplete = msg(AddressFamily::Inet, NeighbourState::Incomplete, none);
        assert_eq!(imp::parse(&incomplete, false), Some((v4(100), 3, None)));
        assert_eq!(imp::parse(&msg(AddressFamily::Bridge, NeighbourState::Reachable, none), false), None);
        assert_eq!(imp::parse(&msg(AddressFamily::Inet, NeighbourState::Stale, NeighbourFlags::Proxy), false), None);
    }
}
