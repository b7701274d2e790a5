//! One client flow: the datagrams of one client address sent to one local address. A flow owns its upstream
//! socket, bound to `source` when set and never connected, so replies from the nodes' stationary addresses
//! reach it; its reply task accepts a datagram only from the upstream address or a `reply_from` address and
//! relays it to the client from the address the client used. A flow is made for one `Target` (upstream address
//! and source); when the service's target changes (a reload, a new DNS answer), the listener makes the flow
//! anew on its next datagram. The listener owns the table of flows and their
//! expiry (`listener`); the client-facing socket is `pktinfo`'s.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use super::Shared;
use super::pktinfo::{ClientSocket, MAX_DATAGRAM};
use crate::metrics::UdpDrop;
use crate::oserror::{self, OsError};
use crate::service::CountGuard;

thread_local! {
    // why: a reply is received and sent on in one synchronous step, so one buffer per runtime thread serves
    // every flow, instead of 64 KiB per flow (10 000 flows would pin 640 MiB once each saw a large reply).
    static REPLY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// Where a flow sends, and from which address: what the service's config and resolver said when it was made.
/// A flow whose target is no longer the service's is made anew on its next datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Target {
    /// The upstream as resolved.
    pub peer: SocketAddr,
    /// The address the upstream socket is bound to (`source`), with `freebind`.
    pub source: Option<IpAddr>,
    pub freebind: bool,
}

/// What a flow's two directions share.
#[derive(Debug)]
pub(super) struct Flow {
    pub upstream: UdpSocket,
    pub target: Target,
    pub client: SocketAddr,
    /// The source address replies must carry (the address the client sent to), or `None` for the kernel's.
    pub local: Option<IpAddr>,
    /// Milliseconds since `Shared::base` of the last datagram either way.
    last: AtomicU64,
}

impl Flow {
    pub(super) fn touch(&self, now_ms: u64) {
        self.last.store(now_ms, Ordering::Relaxed);
    }

    pub(super) fn last(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }
}

/// A flow in the listener's table: dropping it ends the reply task, closes the socket and frees its place
/// under `max_flows` and `max_flows_per_source`.
pub(super) struct FlowEntry {
    pub flow: Arc<Flow>,
    _reply_task: DropGuard,
    _active: CountGuard,
    _slot: FlowSlot,
}

/// One place under `max_flows` and `max_flows_per_source`, taken with `Shared::take_slot`.
pub(super) struct FlowSlot {
    pub(super) shared: Arc<Shared>,
    /// The client's address.
    pub(super) source: IpAddr,
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.shared.free_slot(self.source);
    }
}

impl FlowEntry {
    /// Starts the reply task of a new flow and returns its table entry.
    pub(super) fn start(
        shared: &Arc<Shared>,
        client_sock: &Arc<ClientSocket>,
        upstream: UdpSocket,
        target: Target,
        client: SocketAddr,
        local: Option<IpAddr>,
        slot: FlowSlot,
    ) -> FlowEntry {
        let flow = Arc::new(Flow { upstream, target, client, local, last: AtomicU64::new(shared.now_ms()) });
        let stop = CancellationToken::new();
        shared.tasks.spawn(replies(flow.clone(), client_sock.clone(), shared.clone(), stop.clone()));
        let active = shared.svc.load().active_guard();
        FlowEntry { flow, _reply_task: stop.drop_guard(), _active: active, _slot: slot }
    }
}

/// What one receive on the upstream socket came to.
enum Step {
    /// Relayed, or dropped and counted: look for the next one.
    Done,
    /// Nothing queued.
    Empty,
    /// The client socket's send buffer is full; the reply waits in `pending`.
    Blocked,
    Failed(io::Error),
}

/// Relays the upstream's replies of one flow to its client until `stop`.
async fn replies(flow: Arc<Flow>, client_sock: Arc<ClientSocket>, shared: Arc<Shared>, stop: CancellationToken) {
    // Allocated only if the client socket ever pushes back; reused after that.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = flow.upstream.readable() => if let Err(e) = r {
                warn!(service = %shared.name, client = %flow.client, error = %e, "flow upstream socket failed");
                return;
            }
        }
        loop {
            let step = REPLY_BUF.with_borrow_mut(|buf| receive_one(&flow, &client_sock, &shared, buf, &mut pending));
            match step {
                Step::Done => {}
                Step::Empty => break,
                Step::Blocked => {
                    if !send_pending(&flow, &client_sock, &shared, &pending, &stop).await {
                        return;
                    }
                }
                Step::Failed(e) => {
                    // An unconnected UDP socket reports no ICMP errors; what is left is local trouble.
                    debug!(service = %shared.name, client = %flow.client, error = %e, "receive on a flow's upstream socket failed");
                    break;
                }
            }
            // why: `readable()` and the `try_` calls spend no scheduling budget; without this, a flow whose
            // queue never empties would keep its worker thread from every other task.
            tokio::task::consume_budget().await;
        }
    }
}

/// Receives one datagram on the upstream socket and relays or drops it, all without waiting.
fn receive_one(
    flow: &Flow,
    client_sock: &ClientSocket,
    shared: &Shared,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
) -> Step {
    let (n, from) = match flow.upstream.try_recv_from(buf) {
        Ok(ok) => ok,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Empty,
        Err(e) => return Step::Failed(e),
    };
    let svc = shared.svc.load();
    if !svc.cfg.udp.is_reply(from, flow.target.peer) {
        shared.dropped(UdpDrop::UnknownSource, |n_dropped| {
            warn!(
                service = %shared.name, from = %from, client = %flow.client, upstream = %flow.target.peer,
                dropped = n_dropped,
                "datagram dropped: it comes neither from the upstream nor from a reply_from address"
            )
        });
        return Step::Done;
    }
    flow.touch(shared.now_ms());
    match client_sock.try_send(flow.client, flow.local, &buf[..n]) {
        Ok(()) => {
            shared.metrics.udp_client.increment(1);
            Step::Done
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            pending.clear();
            pending.extend_from_slice(&buf[..n]);
            Step::Blocked
        }
        Err(e) => {
            client_send_failed(flow, shared, &e);
            Step::Done
        }
    }
}

/// Waits until the client socket takes the reply in `pending`; false when stopped meanwhile.
async fn send_pending(
    flow: &Flow,
    client_sock: &ClientSocket,
    shared: &Shared,
    pending: &[u8],
    stop: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                shared.dropped(UdpDrop::SendError, |_| {
                    debug!(service = %shared.name, client = %flow.client, "reply to a client dropped: the flow ended");
                });
                return false;
            }
            r = client_sock.writable() => if let Err(e) = r {
                client_send_failed(flow, shared, &e);
                return true;
            }
        }
        match client_sock.try_send(flow.client, flow.local, pending) {
            Ok(()) => {
                shared.metrics.udp_client.increment(1);
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                client_send_failed(flow, shared, &e);
                return true;
            }
        }
    }
}

fn client_send_failed(flow: &Flow, shared: &Shared, e: &io::Error) {
    let hint = match oserror::kind(e) {
        OsError::Invalid => "the address the client used is no longer on this host",
        OsError::TooLarge => "the reply is larger than the path allows",
        _ => "",
    };
    shared.dropped(UdpDrop::SendError, |n| {
        warn!(
            service = %shared.name, client = %flow.client, from = ?flow.local, error = %e, hint, dropped = n,
            "reply to a client dropped: send failed"
        )
    });
}
