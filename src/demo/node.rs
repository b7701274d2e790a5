//! One node of the demo's logical host: a tiny line-protocol server on its own (stationary) loopback
//! address. `GET <key>\n` is answered with `VALUE node-<n> <count>\n`, so every reply names the node that
//! served it (the demo's clients and staybound's probe `identity` both read it from there).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running node.
pub(super) struct Node {
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Listens on `addr` (port 0 picks one) and serves until stopped.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub(super) fn start(id: u8, addr: SocketAddr, stop_all: &CancellationToken) -> anyhow::Result<Node> {
        let name = format!("node-{id}");
        let listener = listen(addr).with_context(|| format!("{name}: cannot listen on {addr}"))?;
        let addr = listener.local_addr().with_context(|| format!("{name}: no local address"))?;
        let stop = stop_all.child_token();
        let tasks = TaskTracker::new();
        let served = Arc::new(AtomicU64::new(0));
        tasks.spawn(accept_loop(listener, name.clone(), served, stop.clone(), tasks.clone()));
        Ok(Node { addr, stop, tasks })
    }

    /// A graceful stop: the listener closes (connects are refused) and every connection is closed with
    /// FIN, as a service stopped by its cluster manager does. Waits up to a second for its tasks.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await;
    }
}

/// A listener that can take over a port whose earlier connections are still in TIME_WAIT.
pub(super) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    served: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                tasks.spawn(connection(stream, name.clone(), served.clone(), stop.clone()));
            }
            Err(e) => {
                tracing::debug!(node = %name, error = %e, "demo node: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, name: String, served: Arc<AtomicU64>, stop: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => break,
            l = lines.next_line() => l,
        };
        let reply = match line {
            Ok(Some(line)) => match line.trim().strip_prefix("GET ") {
                Some(_key) => {
                    let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                    format!("VALUE {name} {n}\n")
                }
                None => "ERR unknown command\n".to_string(),
            },
            // The peer closed, or the connection failed: nothing more to answer.
            Ok(None) | Err(_) => break,
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            break;
        }
    }
    // why: the graceful stop of a service: FIN on every connection, which a proxy in between passes on.
    let _ = write.shutdown().await;
}
