//! Accept loops: one per listen address. Each accepted client takes a permit of its service's
//! `max_connections` and becomes a session task; a client over the limit is refused at once (RST),
//! counted and logged. An accept error is logged and the loop goes on. An intercept service refuses (RST,
//! counted, logged) a connection whose original destination was neither its upstream nor its listener.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::KeepaliveConfig;
use crate::intercept;
use crate::metrics::Outcome;
use crate::oserror::{self, OsError};
use crate::ratelog::RateLimitedLog;
use crate::service::Service;
use crate::session;
use crate::sockopt;

/// Accepts until `stop_accept`; sessions end on `stop_sessions`.
///
/// `tuned` is the keep-alive setting the listener's own options were set from (`sockopt::tune_listener`):
/// accepted sockets inherit them, and only a client of a service whose setting differs (a reload changed it)
/// is tuned one by one.
pub(crate) async fn accept_loop(
    listener: Arc<TcpListener>,
    tuned: Option<KeepaliveConfig>,
    svc: Arc<ArcSwap<Service>>,
    stop_accept: CancellationToken,
    stop_sessions: CancellationToken,
    tracker: TaskTracker,
) {
    let mut refused = RateLimitedLog::new(Duration::from_secs(1));
    let mut misdirected = RateLimitedLog::new(Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = stop_accept.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let current = svc.load_full();
                if current.cfg.intercept && !meant_for(&stream, &current) {
                    sockopt::reset_on_close(&stream);
                    drop(stream);
                    current.metrics.intercept_refused.increment(1);
                    if let Some(n) = misdirected.hit() {
                        warn!(service = %current.cfg.name, client = %peer, refused = n, "connections refused: redirected here, but not meant for this service's upstream");
                    }
                    continue;
                }
                match current.limit.try_acquire() {
                    Some(permit) => {
                        if tuned.as_ref() != Some(&current.cfg.keepalive) {
                            sockopt::tune_client(&stream, &current.cfg.keepalive);
                        }
                        tracker.spawn(session::serve(stream, peer, current, permit, stop_sessions.clone()));
                    }
                    None => {
                        sockopt::reset_on_close(&stream);
                        drop(stream);
                        current.metrics.outcome(Outcome::RefusedLimit).increment(1);
                        debug!(service = %current.cfg.name, client = %peer, "client refused: max_connections reached");
                        if let Some(n) = refused.hit() {
                            warn!(service = %current.cfg.name, max_connections = current.cfg.max_connections, refused = n, "clients refused: max_connections reached");
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                // why: out of file descriptors, accept fails at once again; pause instead of spinning.
                if oserror::kind(&e) == OsError::Exhausted {
                    tokio::select! {
                        _ = stop_accept.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }
}

/// Whether a connection accepted by an intercept service was meant for it: redirected from its upstream
/// address, or made to the listen address itself (see `intercept::admit`).
fn meant_for(stream: &tokio::net::TcpStream, svc: &Service) -> bool {
    let crate::config::UpstreamAddr::Ip(upstream) = svc.cfg.upstream else { return true };
    let Ok(local) = stream.local_addr() else { return true };
    intercept::admit(sockopt::original_dst(stream), upstream, local) != intercept::Verdict::Refused
}
