//! The logical host's address: a forwarder on its own loopback address that relays each TCP connection
//! to whichever node is active, standing in for a relocatable IP address that a cluster moves between
//! nodes (which loopback cannot do without root).
//!
//! It can do the two things a cluster does to that address:
//! * refuse connects for a while ([`Forwarder::refuse`], then [`Forwarder::serve`]): the address answers,
//!   the port is closed, as during a switchover between "stop on node 1" and "start on node 2";
//! * move silently ([`Forwarder::silent_move`]): the sessions of the old node are dropped without a FIN or
//!   an RST to their clients, as when a node crashes and its address comes up on the other node.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::node;
use crate::sockopt::reset_on_close;

/// Where new sessions go, and the token that drops the current node's sessions.
struct Route {
    target: SocketAddr,
    /// Cancelled when the node that serves these sessions vanishes (a silent move).
    gone: CancellationToken,
}

/// The forwarder of the logical address.
pub(super) struct Forwarder {
    addr: SocketAddr,
    route: Arc<Mutex<Route>>,
    accept: Option<(CancellationToken, JoinHandle<()>)>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Forwarder {
    /// Listens on `ip:0` and relays to `target`.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub(super) fn start(
        ip: std::net::IpAddr,
        target: SocketAddr,
        stop_all: &CancellationToken,
    ) -> anyhow::Result<Forwarder> {
        let listener = node::listen(SocketAddr::new(ip, 0))
            .with_context(|| format!("forwarder: cannot listen on {ip} (the logical address)"))?;
        let addr = listener.local_addr().context("forwarder: no local address")?;
        let mut fwd = Forwarder {
            addr,
            route: Arc::new(Mutex::new(Route { target, gone: CancellationToken::new() })),
            accept: None,
            stop: stop_all.child_token(),
            tasks: TaskTracker::new(),
        };
        fwd.spawn_accept(listener);
        Ok(fwd)
    }

    /// The logical address.
    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn_accept(&mut self, listener: TcpListener) {
        let stop_accept = self.stop.child_token();
        let handle = tokio::spawn(accept_loop(
            listener,
            self.route.clone(),
            stop_accept.clone(),
            self.stop.clone(),
            self.tasks.clone(),
        ));
        self.accept = Some((stop_accept, handle));
    }

    /// Closes the listener: connects to the logical address are refused from now until [`serve`].
    /// Established sessions are left alone.
    ///
    /// [`serve`]: Forwarder::serve
    pub(super) async fn refuse(&mut self) {
        if let Some((stop, handle)) = self.accept.take() {
            stop.cancel();
            // The listener is dropped when the loop returns: wait for it, so "refusing" is true on return.
            let _ = handle.await;
        }
    }

    /// Listens on the logical address again, relaying new sessions to `target`.
    ///
    /// # Errors
    /// The port cannot be bound again.
    pub(super) async fn serve(&mut self, target: SocketAddr) -> anyhow::Result<()> {
        self.refuse().await;
        {
            let mut route = self.route.lock().unwrap_or_else(|e| e.into_inner());
            route.target = target;
            route.gone = CancellationToken::new();
        }
        let listener =
            node::listen(self.addr).with_context(|| format!("forwarder: cannot listen on {} again", self.addr))?;
        self.spawn_accept(listener);
        Ok(())
    }

    /// Moves the logical address to `target` at once and silently drops the sessions of the old node.
    pub(super) fn silent_move(&self, target: SocketAddr) {
        let old = {
            let mut route = self.route.lock().unwrap_or_else(|e| e.into_inner());
            route.target = target;
            std::mem::replace(&mut route.gone, CancellationToken::new())
        };
        old.cancel();
    }

    /// Ends every session and the listener; waits up to a second.
    pub(super) async fn stop(mut self) {
        self.stop.cancel();
        self.refuse().await;
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    route: Arc<Mutex<Route>>,
    stop_accept: CancellationToken,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop_accept.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, _)) => {
                let (target, gone) = {
                    let r = route.lock().unwrap_or_else(|e| e.into_inner());
                    (r.target, r.gone.clone())
                };
                tasks.spawn(session(client, target, gone, stop.clone()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "demo forwarder: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Relays one client to the active node until either side ends, the node vanishes, or the demo stops.
async fn session(mut client: TcpStream, target: SocketAddr, gone: CancellationToken, stop: CancellationToken) {
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target)) => r,
        _ = stop.cancelled() => return,
    };
    let mut node = match connected {
        Ok(Ok(node)) => node,
        _ => {
            // The address is up but the service is not: a real host answers with RST.
            reset_on_close(&client);
            return;
        }
    };
    let _ = node.set_nodelay(true);
    enum End {
        Relayed(std::io::Result<(u64, u64)>),
        Gone,
        Stop,
    }
    let end = tokio::select! {
        // why: copy_bidirectional passes a half-close on, so a node's graceful FIN reaches the client as a
        // FIN, exactly as it would without a forwarder in between.
        r = tokio::io::copy_bidirectional(&mut client, &mut node) => End::Relayed(r),
        _ = gone.cancelled() => End::Gone,
        _ = stop.cancelled() => End::Stop,
    };
    match end {
        End::Relayed(Ok(_)) | End::Stop => {}
        End::Relayed(Err(_)) => {
            // One side failed: the other gets an RST, as the peer's kernel would send for a dead connection.
            reset_on_close(&client);
            reset_on_close(&node);
        }
        End::Gone => {
            drop(node);
            black_hole(client, stop).await;
        }
    }
}

/// A session whose node vanished in a silent move, as its client experiences it.
///
/// On a real network the old node is simply gone: nothing is sent to the client, and the client learns of
/// the move only when it sends something, because the node that now holds the address does not know the
/// connection and answers the segment with RST. Loopback cannot reproduce that exactly: this socket stays
/// open in our kernel, which keeps ACKing (data, and TCP keep-alive probes, which therefore never see the
/// move here). So the forwarder stops reading and writing it, and as soon as it becomes readable (the
/// client sent a byte, or closed) resets it with SO_LINGER 0 + close. The client's data is ACKed before
/// the RST, where a real new node would RST without ACKing it; a client blocked in read() sees the same
/// thing either way: ECONNRESET.
async fn black_hole(client: TcpStream, stop: CancellationToken) {
    let mut byte = [0u8; 1];
    tokio::select! {
        // peek() returns once a byte (or the client's FIN, or an error) is there, and consumes nothing.
        _ = client.peek(&mut byte) => reset_on_close(&client),
        _ = stop.cancelled() => {}
    }
}
