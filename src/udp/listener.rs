//! The receive loop of one UDP listen socket: datagrams from clients, in batches, each handed to the flow of
//! its client address and the local address it was sent to (made on the first datagram, within
//! `max_flows`), and sent on from that flow's upstream socket. It owns the flow table and expires flows idle
//! for `flow_idle`; at `max_flows` a new client's flow takes the place of the one whose client sent last
//! longest ago, and an address with `max_flows_per_source` flows gets no more (`table` decides). The reply
//! direction is each flow's own task (`flow`).

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn_udp::RecvMeta;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use super::flow::{FlowEntry, Target};
use super::pktinfo::{ClientSocket, MAX_DATAGRAM};
use super::table::{Admit, LruTable};
use crate::config::UpstreamAddr;
use crate::metrics::UdpDrop;
use crate::oserror::ConnectClass;
use crate::sockopt::udp_upstream_socket;
use crate::upstream::Connector;

/// Datagrams taken per receive call (recvmmsg) when GRO is off.
const BATCH: usize = 8;

/// How long a name's answer serves flows before it is looked up again (on the next datagram).
const RESOLVE_EVERY: Duration = Duration::from_secs(1);

/// Whether the upstream must be resolved again: the service's connector is another one (a reload), or the
/// upstream is a name whose last answer is `RESOLVE_EVERY` old.
fn resolve_due(same_connector: bool, name: bool, age: Duration) -> bool {
    !same_connector || (name && age >= RESOLVE_EVERY)
}

/// The last resolution of a listener's upstream.
struct Resolved {
    target: Option<Target>,
    error: Option<String>,
    /// The connector (one per config generation) it was made with.
    connector: Arc<Connector>,
    at: Instant,
}

/// A flow is its client's address and the local address the client sent to.
type FlowKey = (SocketAddr, Option<IpAddr>);

/// How often idle flows are looked for: a flow ends between `flow_idle` and `flow_idle` plus this.
fn sweep_period(flow_idle: Duration) -> Duration {
    (flow_idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// One listen socket and its flows.
struct Listener {
    sock: Arc<ClientSocket>,
    shared: Arc<Shared>,
    /// In order of the clients' datagrams.
    flows: LruTable<FlowKey, FlowEntry>,
    resolved: Option<Resolved>,
}

/// Serves one bound listen socket until `stop`; its flows end with it.
pub(super) async fn run(sock: Arc<ClientSocket>, shared: Arc<Shared>, stop: CancellationToken) {
    let segments = sock.gro_segments();
    let (per_buf, batch) = if segments > 1 { (MAX_DATAGRAM * segments, 1) } else { (MAX_DATAGRAM, BATCH) };
    // Every receive buffer, allocated once for the life of the listener.
    let mut storage = vec![0u8; per_buf * batch];
    let mut meta = [RecvMeta::default(); BATCH];
    let mut l = Listener { sock, shared, flows: LruTable::default(), resolved: None };
    let mut next_sweep = Instant::now() + sweep_period(l.shared.svc.load().cfg.udp.flow_idle);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = sleep_until(next_sweep) => {
                let idle = l.shared.svc.load().cfg.udp.flow_idle;
                l.expire(idle);
                next_sweep = Instant::now() + sweep_period(idle);
                continue;
            }
            r = l.sock.readable() => if let Err(e) = r {
                warn!(service = %l.shared.name, listen = %l.sock.local_addr(), error = %e, "UDP listen socket failed; it stops");
                break;
            }
        }
        let received = {
            let mut chunks = storage.chunks_mut(per_buf);
            let mut slices: [IoSliceMut<'_>; BATCH] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            l.sock.try_recv(&mut slices[..batch], &mut meta[..batch])
        };
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // An unconnected socket reports no ICMP errors; this is local trouble (ENOMEM ...). Pause
                // instead of spinning on it.
                debug!(service = %l.shared.name, listen = %l.sock.local_addr(), error = %e, "receive failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                }
            }
        };
        for (i, m) in meta.iter().enumerate().take(n) {
            let start = i * per_buf;
            let data = &storage[start..start + m.len.min(per_buf)];
            let local = l.sock.reply_source(m.dst_ip);
            for datagram in datagrams(data, m.stride) {
                l.forward(datagram, m.addr, local, &stop).await;
                // why: `readable()` and the `try_` calls spend no scheduling budget; without this, a steady
                // stream of clients would keep this worker thread from the flows' reply tasks (which are
                // spawned onto it) and from the idle sweep.
                tokio::task::consume_budget().await;
            }
        }
    }
    let flows = l.flows.len();
    l.flows.clear();
    debug!(service = %l.shared.name, listen = %l.sock.local_addr(), flows, "UDP listener stopped");
}

/// The datagrams of one receive buffer: GRO packs equal-sized datagrams `stride` bytes apart (the last one
/// may be shorter). An empty datagram is one datagram too.
pub fn datagrams(data: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    let stride = if stride == 0 || stride > data.len() { data.len().max(1) } else { stride };
    let count = if data.is_empty() { 1 } else { data.len().div_ceil(stride) };
    (0..count).map(move |k| &data[(k * stride).min(data.len())..((k + 1) * stride).min(data.len())])
}

impl Listener {
    /// Sends one client datagram on through its flow, making the flow first if needed.
    async fn forward(&mut self, data: &[u8], client: SocketAddr, local: Option<IpAddr>, stop: &CancellationToken) {
        let key = (client, local);
        let target = self.target().await;
        // why: a flow follows its service: a reload's new upstream or source, or a new DNS answer, applies to
        // it from its next datagram on (a new upstream socket, so the source is the one configured now).
        let (fresh, stale) = match (&target, self.flows.get(&key)) {
            (_, None) => (true, false),
            (Ok(t), Some(e)) => (false, e.flow.target != *t),
            (Err(_), Some(_)) => (false, false),
        };
        if fresh || stale {
            if let Some(old) = self.flows.remove(&key) {
                debug!(service = %self.shared.name, client = %client, from = %old.flow.target.peer, "the flow follows its service: remade");
            }
            let t = match target {
                Ok(t) => t,
                Err(e) => {
                    let shared = &self.shared;
                    shared.dropped(UdpDrop::NoFlow, |n| {
                        warn!(service = %shared.name, client = %client, error = %e, dropped = n, "datagram from a new client dropped: the upstream does not resolve")
                    });
                    return;
                }
            };
            let Some(entry) = self.open(client, local, t, fresh).await else { return };
            self.flows.insert(key, entry);
        }
        self.flows.touch(&key);
        let Some(entry) = self.flows.get(&key) else { return };
        let flow = &entry.flow;
        flow.touch(self.shared.now_ms());
        loop {
            match flow.upstream.try_send_to(data, flow.target.peer) {
                Ok(_) => {
                    self.shared.metrics.udp_upstream.increment(1);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // why: the upstream socket's send buffer drains on its own; waiting here pushes back on
                    // the clients through the listen socket's receive queue, as a kernel relay would.
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => {
                            let name = &self.shared.name;
                            self.shared.dropped(UdpDrop::SendError, |_| {
                                debug!(service = %name, client = %client, "datagram to the upstream dropped: stopping");
                            });
                            return;
                        }
                        r = flow.upstream.writable() => if r.is_err() { continue },
                    }
                }
                Err(e) => {
                    let shared = &self.shared;
                    shared.dropped(UdpDrop::SendError, |n| {
                        warn!(service = %shared.name, client = %client, upstream = %flow.target.peer, error = %e, dropped = n, "datagram to the upstream dropped: send failed")
                    });
                    return;
                }
            }
        }
    }

    /// What flows must send to and from now. Resolved anew when a reload gave the service a new connector
    /// and, for a name, at most every `RESOLVE_EVERY`; between those, the last answer. A failed lookup keeps
    /// the last good answer of the same config.
    async fn target(&mut self) -> Result<Target, String> {
        let connector = self.shared.svc.load().connector.load_full();
        let cfg = connector.config();
        let name = matches!(cfg.upstream, UpstreamAddr::Name { .. });
        if let Some(r) = &self.resolved
            && !resolve_due(Arc::ptr_eq(&r.connector, &connector), name, r.at.elapsed())
        {
            return r.target.ok_or_else(|| r.error.clone().unwrap_or_default());
        }
        // why: the lookup holds this listener, so it is bounded by the connect timeout.
        let timeout = cfg.ride_out.connect_timeout;
        // why: a datagram cannot tell a dead address from a quiet one: the answer's first address is used.
        let resolved = connector.resolve(timeout).await.map(|peers| peers[0]).map_err(|e| e.to_string());
        let (source, freebind) = (cfg.source, cfg.freebind);
        let kept = self.resolved.take().filter(|r| Arc::ptr_eq(&r.connector, &connector)).and_then(|r| r.target);
        let (target, error) = match resolved {
            Ok(peer) => (Some(Target { peer, source, freebind }), None),
            Err(e) => (kept, Some(e)),
        };
        self.resolved = Some(Resolved { target, error: error.clone(), connector, at: Instant::now() });
        target.ok_or_else(|| error.unwrap_or_default())
    }

    /// Makes the flow of a client to `target` (a new client, or one whose flow no longer matches the service),
    /// or counts and logs why it cannot be made. Only a new client counts as `proxied`.
    async fn open(
        &mut self,
        client: SocketAddr,
        local: Option<IpAddr>,
        target: Target,
        new: bool,
    ) -> Option<FlowEntry> {
        let shared = self.shared.clone();
        let svc = shared.svc.load_full();
        let cfg = &svc.cfg;
        let (max_flows, per_source) = (cfg.udp.max_flows, cfg.udp.max_flows_per_source);
        let slot = loop {
            match shared.take_slot(client.ip(), max_flows, per_source, self.flows.len()) {
                Ok(slot) => break slot,
                Err(Admit::EvictThenOpen) => {
                    // Each pass ends one of this listener's flows, so the loop ends.
                    let Some(((gone, _), entry)) = self.flows.pop_lru() else { continue };
                    let idle_ms = shared.now_ms().saturating_sub(entry.flow.last());
                    drop(entry);
                    shared.evicted(|n| {
                        warn!(service = %shared.name, client = %client, evicted = %gone, evicted_idle_ms = idle_ms, max_flows, evictions = n, "max_flows reached: the least recently used flow ended to make room for a new client")
                    });
                }
                Err(Admit::SourceLimit) => {
                    shared.dropped(UdpDrop::SourceLimit, |n| {
                        warn!(service = %shared.name, client = %client, max_flows_per_source = per_source, dropped = n, "datagram from a new client dropped: its address has max_flows_per_source flows")
                    });
                    return None;
                }
                Err(Admit::FlowLimit | Admit::Open) => {
                    shared.dropped(UdpDrop::FlowLimit, |n| {
                        warn!(service = %shared.name, client = %client, max_flows, dropped = n, "datagram from a new client dropped: max_flows reached, held by the service's other listen addresses")
                    });
                    return None;
                }
            }
        };
        let no_source = |n: u64| warn!(service = %shared.name, client = %client, source = ?target.source, dropped = n, "datagram from a client dropped: the source address is not on this host");
        if !shared.source_gate_open() {
            shared.dropped(UdpDrop::NoFlow, no_source);
            return None;
        }
        let upstream = match udp_upstream_socket(target.peer, target.source, target.freebind) {
            Ok(s) => {
                shared.source_available();
                s
            }
            Err(e) if crate::oserror::classify(&e) == ConnectClass::AddrUnavailable && target.source.is_some() => {
                shared.source_unavailable(target.source, &e);
                shared.dropped(UdpDrop::NoFlow, no_source);
                return None;
            }
            Err(e) => {
                shared.dropped(UdpDrop::NoFlow, |n| {
                    warn!(service = %shared.name, client = %client, error = %e, dropped = n, "datagram from a client dropped: no upstream socket")
                });
                return None;
            }
        };
        let entry = FlowEntry::start(&shared, &self.sock, upstream, target, client, local, slot);
        if let Ok(from) = entry.flow.upstream.local_addr() {
            debug!(service = %shared.name, client = %client, to = ?local, upstream = %target.peer, from = %from, new, "flow opened");
        }
        if new {
            svc.metrics.outcome(crate::metrics::Outcome::Proxied).increment(1);
        }
        Some(entry)
    }

    /// Ends every flow without a datagram either way for `idle`.
    fn expire(&mut self, idle: Duration) {
        let now = self.shared.now_ms();
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let before = self.flows.len();
        self.flows.retain(|_, e| now.saturating_sub(e.flow.last()) < idle_ms);
        let ended = before - self.flows.len();
        if ended > 0 {
            debug!(service = %self.shared.name, listen = %self.sock.local_addr(), ended, left = self.flows.len(), "idle flows ended");
        }
        // why: after a flood of clients, give the table's memory back.
        self.flows.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gro_buffers_split_on_stride() {
        let data: Vec<u8> = (0..10).collect();
        let parts: Vec<&[u8]> = datagrams(&data, 4).collect();
        assert_eq!(parts, vec![&data[0..4], &data[4..8], &data[8..10]]);
        let one: Vec<&[u8]> = datagrams(&data, 10).collect();
        assert_eq!(one, vec![&data[..]]);
        let zero_stride: Vec<&[u8]> = datagrams(&data, 0).collect();
        assert_eq!(zero_stride, vec![&data[..]]);
        let empty: Vec<&[u8]> = datagrams(&[], 0).collect();
        assert_eq!(empty, vec![&[] as &[u8]]);
    }

    #[test]
    fn a_flow_target_is_resolved_again_after_a_reload_or_a_name_s_ttl() {
        let fresh = Duration::from_millis(10);
        assert!(!resolve_due(true, false, Duration::from_secs(3600)), "an address never needs a lookup");
        assert!(resolve_due(false, false, fresh), "a reload: the new config's upstream");
        assert!(!resolve_due(true, true, fresh), "a name answered a moment ago");
        assert!(resolve_due(true, true, RESOLVE_EVERY), "a name answered a second ago");
    }

    #[test]
    fn sweeps_are_frequent_enough() {
        assert_eq!(sweep_period(Duration::from_secs(1)), Duration::from_millis(250));
        assert_eq!(sweep_period(Duration::from_secs(60)), Duration::from_secs(1));
    }
}
