//! The upstream side: the only place that dials the logical host. `Connector` resolves a name through
//! `resolve` on every attempt (its answer cached for its TTL, so DNS-based failover is followed), tries its
//! addresses in order (the last one that worked first), creates the socket with `sockopt`'s options, binds
//! the relocatable source, and connects, all within the attempt's timeout. It counts every attempt that ends
//! (`staybound_upstream_connect_attempts_total`), so its callers do not.

mod resolve;
pub(crate) mod retry;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{KeepaliveConfig, ServiceConfig, UpstreamAddr};
use crate::metrics::ConnectCounts;
use crate::oserror::{ConnectClass, classify};
use crate::sockopt;

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
    svc: Arc<ServiceConfig>,
    /// The upstream's name, when it is one: its answers and lookups, shared by the clones.
    name: Option<Arc<resolve::Name>>,
    /// The address of the name that last took a connection: tried first next time.
    preferred: Arc<Mutex<Option<SocketAddr>>>,
    /// Every attempt that ends (a failed lookup included) is counted here, by how it ended. An attempt
    /// its caller drops before it ends (the loser of a race) is not.
    counts: ConnectCounts,
}

impl Connector {
    pub fn new(svc: Arc<ServiceConfig>, counts: ConnectCounts) -> Connector {
        let name = match &svc.upstream {
            UpstreamAddr::Name { host, port } => Some(Arc::new(resolve::Name::new(host, *port))),
            UpstreamAddr::Ip(_) => None,
        };
        Connector { svc, name, preferred: Arc::default(), counts }
    }

    /// The connector for a reload's settings: with the same upstream name it keeps the name's cached
    /// answer and the address that last took a connection, so a reload costs no lookup and no dead record
    /// is tried first again.
    pub fn reloaded(&self, svc: Arc<ServiceConfig>) -> Connector {
        let same = self.svc.upstream == svc.upstream;
        let mut next = Connector::new(svc, self.counts.clone());
        if same && self.name.is_some() {
            next.name = self.name.clone();
            next.preferred = self.preferred.clone();
        }
        next
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.svc
    }

    /// The upstream's addresses in the order to try them: the address itself, or a name's answer (cached
    /// for its TTL; a lookup waits at most `within`) with the address that last took a connection first.
    ///
    /// # Errors
    /// No answer within `within` (`timeout`), the resolver's error (`other`), or no address of the source's
    /// family (`unreachable`).
    pub(crate) async fn resolve(&self, within: Duration) -> Result<Vec<SocketAddr>, ConnectError> {
        let Some(name) = &self.name else {
            let UpstreamAddr::Ip(addr) = &self.svc.upstream else { unreachable!("a name has a resolver") };
            return Ok(vec![*addr]);
        };
        let target = self.svc.upstream.to_string();
        let answer = name.lookup(within).await.map_err(|why| {
            let class = if why.starts_with("no answer") { ConnectClass::Timeout } else { ConnectClass::Other };
            self.counts.count(class);
            ConnectError { class, target: target.clone(), source: io::Error::other(why) }
        })?;
        let preferred = *self.preferred.lock().unwrap_or_else(|e| e.into_inner());
        let order = resolve::order(&answer, preferred, self.svc.source.map(|s| s.is_ipv4()));
        if order.is_empty() {
            self.counts.count(ConnectClass::Unreachable);
            return Err(ConnectError {
                class: ConnectClass::Unreachable,
                target,
                source: io::Error::new(io::ErrorKind::NotFound, "no address of the source's family"),
            });
        }
        Ok(order)
    }

    /// Tries `peers` in order until one connects, all within `timeout` (shared evenly by the ones left, so
    /// a black-holed first record leaves time for the next); the one that connects is tried first next time.
    ///
    /// # Errors
    /// The last attempt's error.
    pub(crate) async fn connect_any(
        &self,
        peers: &[SocketAddr],
        timeout: Duration,
        keepalive: &KeepaliveConfig,
    ) -> Result<TcpStream, ConnectError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        for (i, peer) in peers.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / u32::try_from(peers.len() - i).unwrap_or(u32::MAX);
            match self.connect_with(*peer, share, keepalive).await {
                Ok(stream) => {
                    if self.name.is_some() {
                        *self.preferred.lock().unwrap_or_else(|e| e.into_inner()) = Some(*peer);
                    }
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ConnectError {
            class: ConnectClass::Unreachable,
            target: self.svc.upstream.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address"),
        }))
    }

    /// `peer` did not take a connection: a name's next address goes first from now on.
    pub(crate) fn passed_over(&self, peer: SocketAddr, peers: &[SocketAddr]) {
        if self.name.is_none() || peers.len() < 2 {
            return;
        }
        let next = peers.iter().position(|p| *p == peer).map(|i| peers[(i + 1) % peers.len()]);
        *self.preferred.lock().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// One connect attempt bounded by `timeout`, with the service's socket options.
    ///
    /// # Errors
    /// A `ConnectError` whose class says why.
    pub async fn connect(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let start = tokio::time::Instant::now();
        let peers = self.resolve(timeout).await?;
        self.connect_any(&peers, timeout.saturating_sub(start.elapsed()), &self.svc.keepalive).await
    }

    /// One connect attempt with other keep-alive settings (the probe session's).
    ///
    /// # Errors
    /// A `ConnectError` whose class says why.
    pub(crate) async fn connect_with(
        &self,
        peer: SocketAddr,
        timeout: Duration,
        keepalive: &KeepaliveConfig,
    ) -> Result<TcpStream, ConnectError> {
        let result = self.dial(peer, timeout, keepalive).await;
        self.counts.count(result.as_ref().map_or_else(|e| e.class, |_| ConnectClass::Ok));
        result
    }

    async fn dial(
        &self,
        peer: SocketAddr,
        timeout: Duration,
        keepalive: &KeepaliveConfig,
    ) -> Result<TcpStream, ConnectError> {
        let svc = &self.svc;
        let fail = |source: io::Error| ConnectError { class: classify(&source), target: peer.to_string(), source };
        let socket = sockopt::tcp_upstream_socket(peer, svc.source, svc.freebind, keepalive).map_err(fail)?;
        if svc.intercept {
            sockopt::mark_own(&socket);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(upstream: &str) -> Arc<ServiceConfig> {
        let text = format!("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"{upstream}\"\n");
        let c = crate::config::Config::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
        Arc::new(c.services[0].clone())
    }

    #[test]
    fn a_reload_keeps_the_names_answer_and_the_address_that_worked() {
        let old = Connector::new(svc("db.example:5432"), ConnectCounts::unrecorded());
        *old.preferred.lock().unwrap() = Some("198.18.0.2:5432".parse().unwrap());
        let same = old.reloaded(svc("db.example:5432"));
        assert!(Arc::ptr_eq(same.name.as_ref().unwrap(), old.name.as_ref().unwrap()), "the cached answer stays");
        assert_eq!(*same.preferred.lock().unwrap(), Some("198.18.0.2:5432".parse().unwrap()));
        // Another name, or another port: nothing of the old one applies.
        for other in ["other.example:5432", "db.example:5433"] {
            let next = old.reloaded(svc(other));
            assert!(!Arc::ptr_eq(next.name.as_ref().unwrap(), old.name.as_ref().unwrap()));
            assert_eq!(*next.preferred.lock().unwrap(), None);
        }
    }
}
