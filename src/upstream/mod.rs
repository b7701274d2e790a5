//! The upstream side: the only place that dials the logical host. `Connector` resolves the upstream again on
//! every attempt (so DNS-based failover is followed), creates the socket with `socket`'s options, binds the
//! relocatable source, connects within a timeout, and reports the attempt's class to the metrics.

pub mod classify;
pub mod retry;
pub mod socket;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

pub use classify::{ConnectClass, classify};

use crate::config::{KeepaliveConfig, ServiceConfig, UpstreamAddr};

/// A failed connect attempt, classified.
#[derive(Debug, thiserror::Error)]
#[error("connect to {target} failed ({}): {source}", class.as_str())]
pub struct ConnectError {
    pub class: ConnectClass,
    pub target: String,
    #[source]
    pub source: io::Error,
}

/// Dials the logical host of one service.
#[derive(Debug, Clone)]
pub struct Connector {
    svc: std::sync::Arc<ServiceConfig>,
}

impl Connector {
    pub fn new(svc: std::sync::Arc<ServiceConfig>) -> Connector {
        Connector { svc }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.svc
    }

    /// Resolves the upstream now; a name is looked up on every call.
    ///
    /// # Errors
    /// The resolver's error, classified `other` (or `unreachable` when the name has no usable address).
    pub async fn resolve(&self) -> Result<SocketAddr, ConnectError> {
        match &self.svc.upstream {
            UpstreamAddr::Ip(addr) => Ok(*addr),
            UpstreamAddr::Name { host, port } => {
                let target = format!("{host}:{port}");
                let addrs = tokio::net::lookup_host((host.as_str(), *port)).await.map_err(|source| ConnectError {
                    class: ConnectClass::Other,
                    target: target.clone(),
                    source,
                })?;
                let want_v4 = self.svc.source.map(|s| s.is_ipv4());
                let mut first = None;
                for addr in addrs {
                    if want_v4.is_none_or(|v4| v4 == addr.is_ipv4()) {
                        return Ok(addr);
                    }
                    first.get_or_insert(addr);
                }
                Err(ConnectError {
                    class: ConnectClass::Unreachable,
                    target,
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        if first.is_some() { "no address of the source's family" } else { "no address" },
                    ),
                })
            }
        }
    }

    /// One connect attempt bounded by `timeout`, with the service's socket options.
    ///
    /// # Errors
    /// A `ConnectError` whose class says why.
    pub async fn connect(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let peer = self.resolve().await?;
        self.connect_to(peer, timeout).await
    }

    /// One connect attempt to an already resolved address.
    ///
    /// # Errors
    /// A `ConnectError` whose class says why.
    pub async fn connect_to(&self, peer: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
        self.connect_with(peer, timeout, &self.svc.keepalive).await
    }

    /// One connect attempt with other keep-alive settings (the probe session's).
    ///
    /// # Errors
    /// A `ConnectError` whose class says why.
    pub async fn connect_with(
        &self,
        peer: SocketAddr,
        timeout: Duration,
        keepalive: &KeepaliveConfig,
    ) -> Result<TcpStream, ConnectError> {
        let svc = &self.svc;
        let fail = |source: io::Error| ConnectError { class: classify(&source), target: peer.to_string(), source };
        let socket = socket::upstream_socket(peer, svc.source, svc.freebind, keepalive).map_err(fail)?;
        match tokio::time::timeout(timeout, socket.connect(peer)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(fail(e)),
            Err(_) => Err(ConnectError {
                class: ConnectClass::Timeout,
                target: peer.to_string(),
                source: io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")),
            }),
        }
    }
}
