//! The connect phase of a client session: ride out a takeover on the client's behalf. The client is
//! already accepted; its upstream connect waits while the detector says the host (or a dependency) is
//! away, retries failed attempts with a jittered backoff under the service's retry budget, and gives up
//! at the hold deadline. Nothing is read from the client meanwhile, so nothing it sends is lost.
//!
//! A held client is watched: one that closes its connection with no byte of its own waiting to be relayed,
//! or resets it, leaves at once with its permit and its place in the held gauge, and no upstream connect is
//! made for it. One that sent a request (and perhaps half-closed after it) stays held: it waits for the reply.
//!
//! A held client's attempts take slots of the service's release pacer (`pace`, `release_rate`), so a herd
//! released by a takeover reaches the new node at a bounded rate.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::Poll;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::failover::{HostState, HostView, Sign};
use crate::oserror::ConnectClass;
use crate::pace::Pacer;
use crate::service::{CountGuard, Service};
use crate::upstream::retry::Backoff;
use crate::upstream::{ConnectError, Connector};

/// Why a held client was let go without an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The hold deadline passed.
    Deadline,
    /// staybound is ending the session (shutdown).
    Shutdown,
    /// The client closed or reset its connection while it was held.
    ClientGone,
}

/// Connects the upstream for `client`; returns the stream and the view (epoch) it was made in.
///
/// # Errors
/// A `Refusal` when the deadline passes, `stop` fires or the client leaves first.
pub(super) async fn connect(
    svc: &Service,
    client: &TcpStream,
    stop: &CancellationToken,
) -> Result<(TcpStream, HostView), Refusal> {
    let hold = &svc.cfg.ride_out;
    let start = Instant::now();
    let deadline = start + hold.deadline;
    let mut view_rx = svc.detector.view.clone();
    let mut deps: Vec<watch::Receiver<HostView>> = svc.deps.iter().map(|(_, rx)| rx.clone()).collect();
    let mut backoff = Backoff::new(hold.backoff_initial, hold.backoff_max);
    let mut held: Option<CountGuard> = None;
    // Watches the client from the moment it is held (a first attempt on an up host costs nothing more).
    let mut gone: Option<Gone<'_>> = None;
    let mut first = true;
    // The detector's news at the last attempt: an attempt made on new news is a fresh attempt, not a
    // blind retry, so the budget does not hold clients back once the host is back.
    let mut seen: Option<(u64, HostState)> = None;
    loop {
        if !svc.connectable() {
            held.get_or_insert_with(|| svc.held_guard());
            let gone = gone.get_or_insert_with(|| Box::pin(client_gone(client)));
            wait_change(&mut view_rx, &mut deps, None, deadline, stop, gone).await?;
            continue;
        }
        let view = view_rx.borrow_and_update().clone();
        let now = Instant::now();
        let news = seen.is_some_and(|s| s != (view.epoch, view.state));
        seen = Some((view.epoch, view.state));
        if first || news {
            svc.budget.deposit(now);
        } else if !svc.budget.try_withdraw(now) {
            svc.metrics.budget_exhausted.increment(1);
            debug!(service = %svc.cfg.name, "retry budget spent: waiting for the detector");
            // why: the budget refused; only the detector's news (or the backoff running out) earns another try.
            let pause = backoff.next_delay().max(svc.cfg.probe.interval.min(hold.backoff_max));
            let gone = gone.get_or_insert_with(|| Box::pin(client_gone(client)));
            wait_change(&mut view_rx, &mut deps, Some(now + pause), deadline, stop, gone).await?;
            continue;
        }
        let pace = held.as_ref().and(hold.release_rate).map(|rate| (&*svc.pacer, rate));
        if let Some((pacer, rate)) = pace {
            // why: every held client wakes on the same change of the view; unpaced, the whole herd would dial
            // the node that just took over in the same instant and overflow its listen queue.
            let gone = gone.get_or_insert_with(|| Box::pin(client_gone(client)));
            tokio::select! {
                _ = pacer.turn(rate) => {}
                _ = sleep_until(deadline) => return Err(Refusal::Deadline),
                _ = stop.cancelled() => return Err(Refusal::Shutdown),
                _ = gone.as_mut() => return Err(Refusal::ClientGone),
            }
        }
        first = false;
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        let timeout = if hold.deadline.is_zero() { hold.connect_timeout } else { hold.connect_timeout.min(left) };
        if timeout.is_zero() {
            return Err(Refusal::Deadline);
        }
        let connector = svc.connector.load_full();
        let attempt = tokio::select! {
            r = attempt(&connector, timeout, &mut view_rx, pace) => r,
            _ = stop.cancelled() => return Err(Refusal::Shutdown),
            _ = watching(&mut gone) => return Err(Refusal::ClientGone),
        };
        match attempt {
            Ok(stream) => {
                if held.is_some() {
                    svc.metrics.hold_seconds.record(start.elapsed().as_secs_f64());
                }
                // why: the session belongs to the epoch in force when its connection was made, not when the
                // attempt began: an attempt that straddled a failover reached the node that serves now, and
                // the old epoch's (already ended) token would reset it at once.
                let made_in = view_rx.borrow_and_update().clone();
                let view = if made_in.epoch != view.epoch { made_in } else { view };
                return Ok((stream, view));
            }
            Err(e) => {
                svc.detector.sign(Sign::ConnectFailed(e.class));
                debug!(service = %svc.cfg.name, error = %e, "upstream connect failed; holding the client");
                held.get_or_insert_with(|| svc.held_guard());
                if Instant::now() >= deadline {
                    return Err(Refusal::Deadline);
                }
                let pause = match e.class {
                    // why: the node answers and its service is starting: try again soon.
                    ConnectClass::Refused | ConnectClass::Reset => {
                        let d = backoff.next_delay();
                        backoff.reset();
                        d.max(hold.backoff_initial / 2)
                    }
                    // why: the address is not up; the detector's news will come first, backoff bounds the wait.
                    _ => backoff.next_delay(),
                };
                let gone = gone.get_or_insert_with(|| Box::pin(client_gone(client)));
                wait_change(&mut view_rx, &mut deps, Some(Instant::now() + pause), deadline, stop, gone).await?;
            }
        }
    }
}

/// One connect attempt. When the detector's news comes while it is in flight (a new epoch, or the host back),
/// a fresh attempt joins it and the first to connect wins: an attempt begun while the host was away may be
/// waiting out a lost SYN or an unresolved neighbour entry for a second or more, which the news makes needless.
///
/// A held client's joining attempt takes a slot of the release pacer too (`pace`), so a view that changes
/// twice during a release (down, then up in a new epoch) does not double the herd at the new node.
async fn attempt(
    connector: &Connector,
    timeout: std::time::Duration,
    view: &mut watch::Receiver<HostView>,
    pace: Option<(&Pacer, u32)>,
) -> Result<TcpStream, ConnectError> {
    let seen = {
        let v = view.borrow_and_update();
        (v.epoch, v.state)
    };
    let first = connector.connect(timeout);
    tokio::pin!(first);
    loop {
        tokio::select! {
            r = &mut first => return r,
            changed = view.changed() => {
                if changed.is_err() {
                    return first.await;
                }
                let v = view.borrow_and_update();
                if (v.epoch, v.state) != seen && v.state.connectable() {
                    break;
                }
            }
        }
    }
    let second = async {
        if let Some((pacer, rate)) = pace {
            pacer.turn(rate).await;
        }
        connector.connect(timeout).await
    };
    tokio::pin!(second);
    tokio::select! {
        r = &mut first => match r {
            Ok(stream) => Ok(stream),
            Err(_) => second.await,
        },
        r = &mut second => match r {
            Ok(stream) => Ok(stream),
            Err(_) => first.await,
        },
    }
}

/// A pending change of a dependency's view.
type DepChange<'a> = Pin<Box<dyn Future<Output = Result<(), watch::error::RecvError>> + Send + 'a>>;

/// The watch on a held client: ready when it is gone.
type Gone<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Ready when the watched client is gone; never when it is not watched.
async fn watching(gone: &mut Option<Gone<'_>>) {
    match gone {
        Some(g) => g.await,
        None => std::future::pending().await,
    }
}

/// Returns when `client` is gone: it closed its connection with nothing unread (peeked, never read), or it
/// reset it. A client whose bytes wait unread stays: it sent a request, and a half-close after a request
/// asks for the reply.
async fn client_gone(client: &TcpStream) {
    // why: the watch waits on its own registration of the socket (a duplicate descriptor); clearing its
    // readiness, as waiting past unread bytes requires, must not clear the readiness the relay waits on.
    let watch = match client.as_fd().try_clone_to_owned().map(std::net::TcpStream::from).and_then(TcpStream::from_std) {
        Ok(w) => w,
        Err(e) => {
            debug!(error = %e, "cannot watch a held client; it stays held until its upstream or deadline");
            return std::future::pending().await;
        }
    };
    loop {
        let Ok(ready) = watch.ready(Interest::READABLE).await else { return };
        let mut byte = [MaybeUninit::<u8>::uninit()];
        let peeked = watch.try_io(Interest::READABLE, || SockRef::from(&watch).peek(&mut byte));
        match peeked {
            Ok(0) => return,
            Ok(_) if ready.is_read_closed() => {
                // A request, then a FIN or an RST: a reset leaves its error on the socket.
                if watch.take_error().is_ok_and(|e| e.is_none()) {
                    return std::future::pending().await;
                }
                return;
            }
            Ok(_) => {
                // Unread bytes: wait for what comes next (more bytes, a FIN, an RST), not for these again.
                let _ = watch.try_io(Interest::READABLE, || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Waits until the host's view or a dependency's changes, `until` passes, the deadline passes (an error),
/// `stop` fires or the client is gone (errors). Every held client of a service wakes on the same change.
async fn wait_change(
    view: &mut watch::Receiver<HostView>,
    deps: &mut [watch::Receiver<HostView>],
    until: Option<Instant>,
    deadline: Instant,
    stop: &CancellationToken,
    gone: &mut Gone<'_>,
) -> Result<(), Refusal> {
    let until = until.map_or(deadline, |u| u.min(deadline));
    let mut dep_changes: Vec<Option<DepChange<'_>>> =
        deps.iter_mut().map(|d| Some(Box::pin(d.changed()) as Pin<Box<_>>)).collect();
    let any_dep = std::future::poll_fn(|cx| {
        for slot in dep_changes.iter_mut() {
            let Some(f) = slot else { continue };
            match f.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(()),
                // why: a closed view never changes again; taken as a change it would wake this client in a
                // loop until its deadline. It is left out and its last word stands.
                Poll::Ready(Err(_)) => *slot = None,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    });
    tokio::select! {
        r = view.changed() => {
            if r.is_err() {
                // The detector is gone (the service was removed by a reload): stop waiting for it.
                sleep_until(until).await;
            }
        }
        _ = any_dep => {}
        _ = sleep_until(until) => {}
        _ = stop.cancelled() => return Err(Refusal::Shutdown),
        _ = gone.as_mut() => return Err(Refusal::ClientGone),
    }
    if Instant::now() >= deadline { Err(Refusal::Deadline) } else { Ok(()) }
}
