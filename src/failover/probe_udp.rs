//! The send-expect probe of a UDP service, over UDP: send `probe.send` to the logical host from a fresh socket
//! (bound to `source`, as a UDP flow's), and wait up to `probe.timeout` for a reply that counts by the flows' rule
//! (`UdpConfig::is_reply`) and contains `probe.expect`. The detector turns the result
//! into evidence for its state machine; nothing here decides.

use std::io;

use super::probe::{ExchangeError, contains};
use crate::config::ServiceConfig;
use crate::oserror::classify;
use crate::sockopt::udp_upstream_socket;
use crate::upstream::Connector;

/// The largest reply kept; a longer one is cut (the kernel truncates it into this buffer).
const MAX_REPLY: usize = 64 * 1024;

/// One probe exchange: the reply that contains `expect`, or why there was none.
///
/// # Errors
/// `Timeout` when no counting reply came in time; `Mismatch` when one came without `expect`;
/// `Failed(Refused, ..)` when the host answered with ICMP port unreachable (seen only when `reply_from` is
/// empty: the socket is then connected, so the kernel reports it); `Failed(..)` for local errors.
pub(super) async fn exchange(svc: &ServiceConfig, connector: &Connector) -> Result<Vec<u8>, ExchangeError> {
    let probe = &svc.probe;
    let fail = |e: io::Error| ExchangeError::Failed(classify(&e), e);
    let peer = connector.resolve(probe.timeout).await.map_err(|e| ExchangeError::Failed(e.class, e.source))?[0];
    let sock = udp_upstream_socket(peer, svc.source, svc.freebind).map_err(fail)?;
    let connected = svc.udp.reply_from.is_empty();
    if connected {
        // why: replies can only come from the upstream address then, and a connected socket reports the
        // ICMP port unreachable of a host whose service is down (refused: up on some node, not serving).
        sock.connect(peer).await.map_err(fail)?;
    }
    let work = async {
        if connected { sock.send(&probe.send).await } else { sock.send_to(&probe.send, peer).await }.map_err(fail)?;
        let mut buf = vec![0u8; MAX_REPLY];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.map_err(fail)?;
            if !svc.udp.is_reply(from, peer) {
                continue;
            }
            buf.truncate(n);
            return if contains(&buf, &probe.expect) { Ok(buf) } else { Err(ExchangeError::Mismatch(buf)) };
        }
    };
    match tokio::time::timeout(probe.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ExchangeError::Timeout),
    }
}
