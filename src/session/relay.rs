//! Moves bytes both ways between a client and its upstream, preserving half-close: one side's FIN is
//! passed on as a shutdown(SHUT_WR) and the other direction keeps flowing.
//!
//! An idle session holds no buffer: each direction waits for readability, then borrows a buffer from a
//! per-thread pool for as long as the bytes it read are not yet written, and gives it back. Backpressure
//! is the kernel's: a direction whose writer is full stops reading. Per read there is one atomic add for
//! the byte counter and nothing else: no lock, allocation or channel send.
//!
//! A wake-up polls only the direction that has work: each direction remembers that it registered the
//! session's waker for readability (it is *armed*), and an armed direction whose socket the reactor has not
//! marked readable since costs one atomic load, not a readiness poll (a lock and a waker compare).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};

use metrics::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::task::coop;

/// Size of one relay buffer.
pub(super) const BUF_SIZE: usize = 32 * 1024;
/// Buffers a worker thread keeps for reuse.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

/// Which side of the session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Client,
    Upstream,
}

/// How a relay ended when it did not end cleanly.
#[derive(Debug)]
pub(super) struct RelayError {
    pub side: Side,
    pub error: io::Error,
}

/// One direction of the relay.
struct Pipe {
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    /// The last read was short: it emptied the socket, and the reactor's readiness for it was cleared.
    drained: bool,
    /// The reader's readiness poll returned `Pending`: the reactor holds the session's waker for `from`
    /// and takes it only when it marks `from` readable, so until the readiness is seen set there is
    /// nothing to poll. Cleared when the readiness is seen, and by `relay` if the session's waker changes.
    armed: bool,
    eof: bool,
    done: bool,
}

/// What a read found.
enum Got {
    /// The reactor has not marked the socket readable: no syscall was made.
    NotReady,
    /// The socket was read (or the read failed).
    Done(io::Result<usize>),
}

impl Pipe {
    fn new() -> Pipe {
        Pipe { buf: None, pos: 0, end: 0, drained: false, armed: false, eof: false, done: false }
    }

    /// Copies from `from` to `to` until `from` ends and the end is passed on. `to_ended`: the other
    /// direction has read `to`'s end, so the relay ends with this direction and closes both sockets.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        from: (&TcpStream, Side),
        to: (&TcpStream, Side),
        to_ended: bool,
        bytes: &Counter,
        activity: &AtomicU64,
    ) -> Poll<Result<(), RelayError>> {
        let err = |side: Side| move |error: io::Error| RelayError { side, error };
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(buf) = &self.buf {
                if self.pos < self.end {
                    // why: the write is tried first; `try_write` makes no syscall unless the reactor says
                    // the socket is writable, and a readiness poll is needed only to register for it.
                    match to.0.try_write(&buf[self.pos..self.end]) {
                        Ok(n) => self.pos += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            ready!(to.0.poll_write_ready(cx)).map_err(err(to.1))?;
                        }
                        Err(e) => return Poll::Ready(Err(err(to.1)(e))),
                    }
                    continue;
                }
                if let Some(buf) = self.buf.take() {
                    give_buf(buf);
                }
            }
            if self.eof {
                // why: a half-close is passed on, not turned into a full close: the other direction may
                // still carry the reply. When it has ended too, the close that follows sends the FIN
                // (nothing is left unread on `to`, so it is not a reset): one system call fewer.
                if to_ended {
                    self.done = true;
                    continue;
                }
                match SockRef::from(to.0).shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Poll::Ready(Err(err(to.1)(e))),
                }
                self.done = true;
                continue;
            }
            // why: a socket that always has data would never return `Pending`; the task budget makes a
            // busy session yield to the others, as tokio's own readiness polls do. It is taken before a
            // readiness poll too, and given back (dropped unused): a readiness poll is also `Pending` when
            // the budget is spent, and then it registers nothing, so that `Pending` must not arm.
            let coop = ready!(coop::poll_proceed(cx));
            if self.drained {
                // The socket is known empty: register for its next data (or find it already there).
                self.drained = false;
                drop(coop);
                ready!(self.poll_arm(cx, from.0)).map_err(err(from.1))?;
                continue;
            }
            match read_once(from.0, &mut self.buf, &mut self.drained) {
                Got::NotReady if self.armed => return Poll::Pending,
                Got::NotReady => {
                    drop(coop);
                    ready!(self.poll_arm(cx, from.0)).map_err(err(from.1))?;
                }
                Got::Done(Ok(n)) if n > 0 => {
                    self.armed = false;
                    coop.made_progress();
                    bytes.increment(n as u64);
                    activity.fetch_add(1, Ordering::Relaxed);
                    self.pos = 0;
                    self.end = n;
                }
                Got::Done(r) => {
                    self.armed = false;
                    if let Some(buf) = self.buf.take() {
                        give_buf(buf);
                    }
                    match r {
                        Ok(_) => self.eof = true,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(err(from.1)(e))),
                    }
                }
            }
        }
    }

    /// Registers the session's waker for `from`'s readability; `Pending` arms the direction. Called only
    /// with budget left (see `poll_copy`), so a `Pending` is the reactor's, not the budget's.
    fn poll_arm(&mut self, cx: &mut Context<'_>, from: &TcpStream) -> Poll<io::Result<()>> {
        let r = from.poll_read_ready(cx);
        self.armed = r.is_pending();
        r.map_ok(|_| ())
    }
}

/// One read into `slot` (a pool buffer, taken only if the read is made), made only if the reactor says
/// the socket is readable. Sets `drained` when the read was short.
///
/// why: a read shorter than the buffer drained the socket; telling the reactor so saves the read that
/// would only return EAGAIN: one syscall in three on a request/response path. The reactor clears the
/// readiness only for the event it reported, so data that arrives meanwhile is not missed.
fn read_once(stream: &TcpStream, slot: &mut Option<Box<[u8]>>, drained: &mut bool) -> Got {
    let mut got = None;
    let r = stream.try_io(Interest::READABLE, || {
        let buf = slot.get_or_insert_with(take_buf);
        let n = (&*SockRef::from(stream)).read(buf)?;
        got = Some(n);
        if n > 0 && n < buf.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
    });
    match (r, got) {
        (Ok(n), _) => Got::Done(Ok(n)),
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => {
            *drained = true;
            Got::Done(Ok(n))
        }
        (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock && slot.is_none() => Got::NotReady,
        (Err(e), _) => Got::Done(Err(e)),
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_buf(buf);
        }
    }
}

/// Relays until both directions have ended, or one fails.
///
/// `to_upstream` counts client-to-upstream bytes, `to_client` the other way; `activity` counts reads
/// (the session's own counter, read by its idle watchdog).
///
/// # Errors
/// The first I/O error, with the side it happened on.
pub(super) async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    to_upstream: &Counter,
    to_client: &Counter,
    activity: &AtomicU64,
) -> Result<(), RelayError> {
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    let mut registered: Option<Waker> = None;
    poll_fn(|cx| {
        // why: an armed direction relies on the reactor holding this waker; polled with another (never, as
        // the session's task polls it, but cheap to make sure) both directions register again.
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            registered = Some(cx.waker().clone());
            up.armed = false;
            down.armed = false;
        }
        let a =
            up.poll_copy(cx, (client, Side::Client), (upstream, Side::Upstream), down.done, to_upstream, activity)?;
        let b = down.poll_copy(cx, (upstream, Side::Upstream), (client, Side::Client), up.done, to_client, activity)?;
        match (a, b) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::{Pin, pin};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected loopback pair: (the end the relay gets, its peer).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (l.accept().await.unwrap().0, peer)
    }

    /// Reads one byte from `peer` while `relay` runs; `None` if none came within 10 s.
    async fn one_byte<F>(relay: &mut Pin<&mut F>, peer: &mut TcpStream) -> Option<u8>
    where
        F: Future<Output = Result<(), RelayError>>,
    {
        let mut got = [0u8; 1];
        // why: a bound on a test that fails, not a pace: a stalled direction never wakes again.
        tokio::select! {
            r = relay.as_mut() => panic!("the relay ended: {:?}", r.err()),
            r = peer.read_exact(&mut got) => { r.unwrap(); Some(got[0]) }
            () = tokio::time::sleep(Duration::from_secs(10)) => None,
        }
    }

    /// Takes up to `limit` units of the task's budget in this poll; returns how many it took.
    fn spend(cx: &mut Context<'_>, limit: usize) -> usize {
        let mut n = 0;
        while n < limit {
            match coop::poll_proceed(cx) {
                Poll::Ready(r) => r.made_progress(),
                Poll::Pending => break,
            }
            n += 1;
        }
        n
    }

    /// Regression: a readiness poll that was `Pending` only because the task's budget was spent left the
    /// direction armed (believed registered with the reactor) when no waker was registered, and the next
    /// bytes from a one-way stream never woke the session (iperf3: 0 Gbit/s in two rounds of three). The
    /// relay is polled with 1, 2 and 3 units of budget left, so the budget runs out at each step of the
    /// read, relay and register sequence.
    #[tokio::test]
    async fn a_direction_whose_budget_ran_out_still_wakes_for_its_next_bytes() {
        for left in 1..=3 {
            let (client, mut client_peer) = pair().await;
            let (upstream, mut upstream_peer) = pair().await;
            let (bytes, activity) = (Counter::noop(), AtomicU64::new(0));
            let mut relay = pin!(relay(&client, &upstream, &bytes, &bytes, &activity));
            client_peer.write_all(b"a").await.unwrap();
            client.readable().await.unwrap();
            // How many budget units a poll has (tokio's constant), then a poll of the relay with `left`
            // of them. (Each measure starts a poll of its own: `yield_now` ends the one before.)
            tokio::task::yield_now().await;
            let units = poll_fn(|cx| Poll::Ready(spend(cx, usize::MAX))).await;
            assert!(units > left, "a poll has a budget ({units} units)");
            tokio::task::yield_now().await;
            poll_fn(|cx| {
                assert_eq!(spend(cx, units - left), units - left);
                assert!(relay.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            let mut got = [0u8; 1];
            upstream_peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"a");
            client_peer.write_all(b"b").await.unwrap();
            let got = one_byte(&mut relay, &mut upstream_peer).await;
            assert_eq!(got, Some(b'b'), "{left} units left: the second byte was never relayed");
            // The other direction was first polled with what budget the first left: it must wake too.
            upstream_peer.write_all(b"c").await.unwrap();
            let got = one_byte(&mut relay, &mut client_peer).await;
            assert_eq!(got, Some(b'c'), "{left} units left: the reply was never relayed");
        }
    }
}
