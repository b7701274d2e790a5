//! A legacy client with minimal retries: one request every `PACE` on a persistent connection, a timeout
//! of `TIMEOUT` per attempt, and when an attempt fails, one reconnect and one resend; a request whose
//! second attempt fails too is lost. It logs every outcome, so the report can say what it saw and when.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Time between the end of one request and the start of the next.
pub(super) const PACE: Duration = Duration::from_millis(20);
/// One attempt (connect if needed, send, read the reply) must finish within this.
pub(super) const TIMEOUT: Duration = Duration::from_secs(1);

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Why {
    Refused,
    Reset,
    /// The server closed the connection (FIN) before replying.
    Closed,
    Timeout,
    Other(String),
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Refused => f.write_str("connection refused"),
            Why::Reset => f.write_str("connection reset"),
            Why::Closed => f.write_str("connection closed by the server (FIN)"),
            Why::Timeout => write!(f, "no reply within {}s", TIMEOUT.as_secs_f64()),
            Why::Other(e) => f.write_str(e),
        }
    }
}

impl From<std::io::Error> for Why {
    fn from(e: std::io::Error) -> Why {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Why::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Why::Reset,
            K::UnexpectedEof => Why::Closed,
            K::TimedOut => Why::Timeout,
            _ => Why::Other(e.to_string()),
        }
    }
}

/// One thing the client saw.
#[derive(Debug, Clone)]
pub(super) enum Seen {
    /// A request was answered by `node`.
    Ok { node: String },
    /// An attempt failed; the request is retried once.
    AttemptFailed(Why),
    /// The second attempt failed too: the request is lost.
    Lost(Why),
}

/// What a client saw, in order, with when it saw it.
#[derive(Debug, Clone, Default)]
pub(super) struct Log {
    pub events: Vec<(Instant, Seen)>,
}

impl Log {
    pub(super) fn ok(&self) -> usize {
        self.events.iter().filter(|(_, s)| matches!(s, Seen::Ok { .. })).count()
    }
    pub(super) fn lost(&self) -> usize {
        self.events.iter().filter(|(_, s)| matches!(s, Seen::Lost(_))).count()
    }
    pub(super) fn reconnects(&self) -> usize {
        self.events.iter().filter(|(_, s)| matches!(s, Seen::AttemptFailed(_))).count()
    }

    /// The longest time between two answered requests, and when it began.
    pub(super) fn longest_stall(&self) -> Option<(Duration, Instant)> {
        let oks = self.events.iter().filter(|(_, s)| matches!(s, Seen::Ok { .. })).map(|(t, _)| *t);
        let mut best: Option<(Duration, Instant)> = None;
        let mut prev: Option<Instant> = None;
        for t in oks {
            if let Some(p) = prev {
                let gap = t.saturating_duration_since(p);
                if best.is_none_or(|(b, _)| gap > b) {
                    best = Some((gap, p));
                }
            }
            prev = Some(t);
        }
        best
    }
}

/// Sends requests to `addr` until `stop`; returns what it saw.
pub(super) async fn run(addr: SocketAddr, stop: CancellationToken) -> Log {
    let mut log = Log::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut seq: u64 = 0;
    while !stop.is_cancelled() {
        seq += 1;
        let request = format!("GET key-{seq}\n");
        let mut retried = false;
        loop {
            match attempt(&mut conn, addr, &request).await {
                Ok(node) => {
                    log.events.push((Instant::now(), Seen::Ok { node }));
                    break;
                }
                Err(why) => {
                    conn = None;
                    if retried {
                        log.events.push((Instant::now(), Seen::Lost(why)));
                        break;
                    }
                    log.events.push((Instant::now(), Seen::AttemptFailed(why)));
                    retried = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(PACE) => {}
        }
    }
    log
}

/// One attempt: connect when there is no connection, send, read one reply line; all within `TIMEOUT`.
async fn attempt(conn: &mut Option<BufReader<TcpStream>>, addr: SocketAddr, request: &str) -> Result<String, Why> {
    let work = async {
        if conn.is_none() {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            *conn = Some(BufReader::new(stream));
        }
        let Some(stream) = conn.as_mut() else { return Err(Why::Other("no connection".into())) };
        stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err(Why::Closed);
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("VALUE"), Some(node)) => Ok(node.to_string()),
            _ => Err(Why::Other(format!("unexpected reply {:?}", line.trim_end()))),
        }
    };
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(Why::Timeout),
    }
}
