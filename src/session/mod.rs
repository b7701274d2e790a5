//! One client session, from accept to end: `hold` gets it an upstream (riding out a takeover), `relay`
//! moves its bytes, and `serve` ends it when its epoch ends, its upstream fails, or staybound shuts down,
//! counting and logging how it ended.

mod quiet;
mod relay;
mod ride_out;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::OnFailover;
use crate::failover::Sign;
use crate::metrics::{Outcome, ResetReason};
use crate::oserror::{ConnectClass, classify};
use crate::service::{Permit, Service};
use crate::sockopt;
use relay::{RelayError, Side};
use ride_out::Refusal;

/// Serves one accepted client until its session ends. `stop` ends it (after the drain grace on SIGTERM).
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    svc: Arc<Service>,
    _permit: Permit,
    stop: CancellationToken,
) {
    let name = &svc.cfg.name;
    // why: the connect phase's state (a held client's watches, a dial and its timeout) is three times the
    // relay's; boxed, it is freed when the session starts relaying instead of sizing every session's task
    // (RSS per idle connection: 3.99 KiB unboxed, see benches/README.md).
    let (upstream, view) = match Box::pin(ride_out::connect(&svc, &client, &stop)).await {
        Ok(ok) => ok,
        Err(refusal) => {
            let outcome = match refusal {
                Refusal::Deadline => Outcome::RefusedDeadline,
                Refusal::Shutdown => Outcome::RefusedShutdown,
                Refusal::ClientGone => Outcome::ClientGone,
            };
            svc.metrics.outcome(outcome).increment(1);
            if refusal == Refusal::ClientGone {
                debug!(service = %name, client = %peer, "held client gone: it closed its connection; no upstream made for it");
                return;
            }
            info!(service = %name, client = %peer, outcome = outcome.as_str(), "client refused: no upstream");
            sockopt::reset_on_close(&client);
            return;
        }
    };
    svc.metrics.outcome(Outcome::Proxied).increment(1);
    let _active = svc.active_guard();
    // A session connected while a move is being confirmed belongs to the epoch the move would begin.
    let epoch_end = view.epoch_for_new_session();
    let stop_session = stop.clone();

    enum End {
        Relay(Result<(), RelayError>),
        Failover,
        Shutdown,
        Idle,
    }
    let activity = Arc::new(AtomicU64::new(0));
    // why: the end conditions wake the session themselves; a wake-up for relayed bytes must not poll them
    // (each poll of a cancellation future takes locks).
    let ends = quiet::Quiet::new({
        let activity = activity.clone();
        let idle = svc.cfg.idle_timeout;
        async move {
            tokio::select! {
                biased;
                _ = epoch_end.cancelled() => End::Failover,
                _ = stop_session.cancelled() => End::Shutdown,
                _ = idle_watchdog(idle, &activity) => End::Idle,
            }
        }
    });
    let end = tokio::select! {
        biased;
        r = relay::relay(&client, &upstream, &svc.metrics.bytes_upstream, &svc.metrics.bytes_client, &activity) => End::Relay(r),
        end = ends => end,
    };
    match end {
        End::Relay(Ok(())) => debug!(service = %name, client = %peer, epoch = view.epoch, "session ended"),
        End::Relay(Err(RelayError { side: Side::Upstream, error })) => {
            let class = classify(&error);
            let (reason, sign) = match class {
                ConnectClass::Timeout => (ResetReason::UpstreamTimeout, Sign::SessionTimeout),
                _ => (ResetReason::UpstreamReset, Sign::SessionReset),
            };
            // why: the client sees what it would have seen talking to the host directly: a reset.
            sockopt::reset_on_close(&client);
            svc.metrics.reset(reason).increment(1);
            svc.detector.sign(sign);
            info!(service = %name, client = %peer, epoch = view.epoch, reason = reason.as_str(), error = %error, "session ended by the upstream");
        }
        End::Relay(Err(RelayError { side: Side::Client, error })) => {
            debug!(service = %name, client = %peer, error = %error, "session ended by the client");
        }
        End::Failover => {
            if svc.cfg.on_failover == OnFailover::Reset {
                sockopt::reset_on_close(&client);
            }
            sockopt::reset_on_close(&upstream);
            svc.metrics.reset(ResetReason::Failover).increment(1);
            debug!(service = %name, client = %peer, epoch = view.epoch, "session ended: its epoch ended");
        }
        End::Shutdown => {
            svc.metrics.reset(ResetReason::Shutdown).increment(1);
            debug!(service = %name, client = %peer, "session ended: shutdown");
        }
        End::Idle => {
            info!(service = %name, client = %peer, "session closed: no bytes either way for idle_timeout");
        }
    }
}

/// Returns when no read happened for `timeout`; never when `timeout` is `None`.
async fn idle_watchdog(timeout: Option<Duration>, activity: &AtomicU64) {
    let Some(timeout) = timeout else { return std::future::pending().await };
    // why: checking a counter every half timeout costs nothing per byte; the session is closed between
    // one and one and a half timeouts after its last byte.
    let step = timeout / 2;
    let mut seen = activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            quiet += step;
            if quiet >= timeout {
                return;
            }
        } else {
            seen = now;
            quiet = Duration::ZERO;
        }
    }
}
