//! Moves bytes both ways between a client and its upstream, preserving half-close: one side's FIN is
//! passed on as a shutdown(SHUT_WR) and the other direction keeps flowing.
//!
//! An idle session holds no buffer: each direction waits for readability, then borrows a buffer from a
//! per-thread pool for as long as the bytes it read are not yet written, and gives it back. Backpressure
//! is the kernel's: a direction whose writer is full stops reading. Per read there is one atomic add for
//! the byte counter and nothing else: no lock, allocation or channel send.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use metrics::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

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
    eof: bool,
    done: bool,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe { buf: None, pos: 0, end: 0, eof: false, done: false }
    }

    /// Copies from `from` to `to` until `from` ends and the end is passed on.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        from: (&TcpStream, Side),
        to: (&TcpStream, Side),
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
                    ready!(to.0.poll_write_ready(cx)).map_err(err(to.1))?;
                    match to.0.try_write(&buf[self.pos..self.end]) {
                        Ok(n) => self.pos += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
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
                // still carry the reply.
                match SockRef::from(to.0).shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Poll::Ready(Err(err(to.1)(e))),
                }
                self.done = true;
                continue;
            }
            ready!(from.0.poll_read_ready(cx)).map_err(err(from.1))?;
            let mut buf = take_buf();
            match read_once(from.0, &mut buf) {
                Ok(0) => {
                    give_buf(buf);
                    self.eof = true;
                }
                Ok(n) => {
                    bytes.increment(n as u64);
                    activity.fetch_add(1, Ordering::Relaxed);
                    self.buf = Some(buf);
                    self.pos = 0;
                    self.end = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_buf(buf),
                Err(e) => {
                    give_buf(buf);
                    return Poll::Ready(Err(err(from.1)(e)));
                }
            }
        }
    }
}

/// One read from a socket the reactor says is readable.
///
/// why: a read shorter than the buffer drained the socket; telling the reactor so saves the read that
/// would only return EAGAIN: one syscall in three on a request/response path. The reactor clears the
/// readiness only for the event it reported, so data that arrives meanwhile is not missed.
fn read_once(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(stream)).read(buf)?;
        got = Some(n);
        if n > 0 && n < buf.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
    });
    match (r, got) {
        (Ok(n), _) => Ok(n),
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (Err(e), _) => Err(e),
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
    poll_fn(|cx| {
        let a = up.poll_copy(cx, (client, Side::Client), (upstream, Side::Upstream), to_upstream, activity)?;
        let b = down.poll_copy(cx, (upstream, Side::Upstream), (client, Side::Client), to_client, activity)?;
        match (a, b) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}
