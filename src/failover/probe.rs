//! The probe session's I/O: how a held connection is watched, how a status request is exchanged, and how
//! a node identity is read from a reply. Decisions are the state machine's; this only observes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{KeepaliveConfig, ProbeConfig};
use crate::oserror::{ConnectClass, classify};

/// The probe connection: a TCP connection (with a preset's `tls`, TLS over it), and what a preset's
/// protocol sent between two exchanges.
#[derive(Debug)]
pub struct ProbeStream {
    io: Io,
    /// With a preset: bytes that arrived while no exchange was under way (a server's notice), read so
    /// that a reset or close is still seen at once; the next exchange reads them first.
    pub(crate) unread: Vec<u8>,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A TLS handshake that failed took the connection with it.
    Gone,
}

impl ProbeStream {
    pub fn new(tcp: TcpStream) -> ProbeStream {
        ProbeStream { io: Io::Plain(tcp), unread: Vec::new() }
    }

    /// The TCP connection under it (keep-alive, TCP_INFO); none after a failed TLS handshake.
    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match &self.io {
            Io::Plain(tcp) => Some(tcp),
            Io::Tls(tls) => Some(tls.get_ref().0),
            Io::Gone => None,
        }
    }

    /// Whether the session runs TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }

    /// Makes the plain session a TLS one: the handshake, with the server's certificate verified by
    /// `config` for `name`. A failed handshake leaves the session unusable.
    ///
    /// # Errors
    /// The handshake failed (the certificate did not verify, the server does not speak TLS), or the
    /// session was not plain.
    pub(crate) async fn start_tls(
        &mut self,
        config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
        name: rustls_pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Err(io::Error::other("TLS over a session that is not plain"));
        };
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        self.io = Io::Tls(Box::new(tls));
        Ok(())
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the probe session's TLS handshake failed")
}

impl AsyncRead for ProbeStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for ProbeStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// The most a preset keeps of what arrives between exchanges; more is no notice.
const UNREAD_LIMIT: usize = 64 * 1024;

/// What happened on a probe connection.
#[derive(Debug)]
pub(crate) enum ProbeConnEvent {
    /// The server sent bytes (a banner, or unsolicited data).
    Data(Vec<u8>),
    /// The server closed the session (FIN).
    Eof,
    /// The session failed: RST (`Reset`), keep-alive expiry (`Timeout`), or another error.
    Failed(ConnectClass, io::Error),
}

/// Waits for the next event on a held connection; never returns when there is none. With `keep` (a preset,
/// whose protocol may send between exchanges) the bytes are kept for the next exchange instead of returned.
pub(crate) async fn watch_probe_conn(held: Option<&mut ProbeStream>, keep: bool) -> ProbeConnEvent {
    let Some(stream) = held else { return std::future::pending().await };
    let mut buf = [0u8; 2048];
    loop {
        // why: `read` is cancel-safe: when another event wins, nothing read is lost.
        match stream.read(&mut buf).await {
            Ok(0) => return ProbeConnEvent::Eof,
            Ok(n) if keep && stream.unread.len() + n <= UNREAD_LIMIT => stream.unread.extend_from_slice(&buf[..n]),
            Ok(n) => return ProbeConnEvent::Data(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return ProbeConnEvent::Eof,
            Err(e) => return ProbeConnEvent::Failed(classify(&e), e),
        }
    }
}

/// Why a send-expect exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// No (complete) reply within the timeout.
    Timeout,
    /// A reply came but lacks `expect` (by the timeout): something else answers on the port.
    Mismatch(Vec<u8>),
    Eof,
    Failed(ConnectClass, io::Error),
}

/// How long a reply that lacks `expect` may pause before it is taken as complete: a server sends its
/// reply at once, so one that stops short of `expect` this long said something else (`-LOADING`).
const REPLY_PAUSE: Duration = Duration::from_millis(100);

/// Sends `send`, then reads until the reply contains `expect` (any reply when `expect` is empty).
///
/// # Errors
/// Timeout, a reply without `expect` (once it pauses for `REPLY_PAUSE`), EOF, or an I/O error.
pub async fn exchange(stream: &mut ProbeStream, probe: &ProbeConfig) -> Result<Vec<u8>, ExchangeError> {
    let mut reply = Vec::new();
    let work = async {
        stream.write_all(&probe.send).await.map_err(|e| ExchangeError::Failed(classify(&e), e))?;
        let mut buf = [0u8; 4096];
        loop {
            // why: a node that answers "not ready" is known as soon as its reply ends, not at the timeout;
            // the probe's pace while it loads then sees it ready within a check.
            let read = stream.read(&mut buf);
            let got = if reply.is_empty() {
                read.await
            } else {
                match tokio::time::timeout(REPLY_PAUSE, read).await {
                    Ok(r) => r,
                    Err(_) => return Err(ExchangeError::Mismatch(Vec::new())),
                }
            };
            match got {
                Ok(0) => return Err(ExchangeError::Eof),
                Ok(n) => {
                    reply.extend_from_slice(&buf[..n]);
                    if contains(&reply, &probe.expect) {
                        return Ok(());
                    }
                    if reply.len() > 64 * 1024 {
                        return Err(ExchangeError::Mismatch(Vec::new()));
                    }
                }
                Err(e) => return Err(ExchangeError::Failed(classify(&e), e)),
            }
        }
    };
    match tokio::time::timeout(probe.timeout, work).await {
        Ok(Ok(())) => Ok(reply),
        Ok(Err(ExchangeError::Mismatch(_))) => Err(ExchangeError::Mismatch(reply)),
        Ok(Err(e)) => Err(e),
        // why: something answered, just not what the service would: another service holds the port.
        Err(_) if !reply.is_empty() => Err(ExchangeError::Mismatch(reply)),
        Err(_) => Err(ExchangeError::Timeout),
    }
}

/// Reads whatever the server sends first, for up to `timeout` (a banner), to take an identity from it.
pub(crate) async fn read_banner(stream: &TcpStream, timeout: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    let work = async {
        loop {
            stream.readable().await.ok()?;
            match stream.try_read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => return Some(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(timeout, work).await.ok().flatten()
}

/// Whether `haystack` contains `needle` (an empty needle always matches).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The node identity a reply names: the regex's capture group, matched against the reply as lossy UTF-8.
pub fn identity_of(probe: &ProbeConfig, reply: &[u8]) -> Option<String> {
    let re = probe.identity.as_ref()?;
    let text = String::from_utf8_lossy(reply);
    re.captures(&text).and_then(|c| c.get(1)).map(|m| m.as_str().to_string())
}

/// Keep-alive settings of the probe connection: a keep-alive every probe interval, and the kernel ends
/// the session when no ACK came for one interval plus the probe timeout.
pub(crate) fn probe_keepalive(probe: &ProbeConfig, base: &KeepaliveConfig) -> KeepaliveConfig {
    let ceil =
        |d: Duration| Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(Duration::from_secs(1));
    let idle = ceil(probe.interval);
    let interval = ceil(probe.timeout);
    KeepaliveConfig {
        idle,
        interval,
        count: base.count,
        // why: one lost keep-alive (or its ACK) must not end the session: the detector asks the address
        // anew after one unanswered keep-alive and decides a black hole itself after `idle + interval`;
        // the kernel ends the session only after three in a row went unanswered.
        user_timeout: idle + interval * 3,
        client_idle: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reply_without_expect_is_a_mismatch_once_it_pauses_not_at_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            s.write_all(b"-LOADING Redis is loading the dataset in memory\r\n").await.unwrap();
            // Keeps the connection open, silent.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut stream = ProbeStream::new(TcpStream::connect(addr).await.unwrap());
        let probe = ProbeConfig {
            mode: ProbeMode::SendExpect,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            send: b"PING\r\n".to_vec(),
            expect: b"+PONG".to_vec(),
            identity: None,
            fall: 1,
            rise: 1,
            neighbor: false,
            split_brain_window: crate::config::defaults::SPLIT_BRAIN_WINDOW,
            preset: None,
        };
        let t = std::time::Instant::now();
        let r = exchange(&mut stream, &probe).await;
        assert!(matches!(&r, Err(ExchangeError::Mismatch(reply)) if reply.starts_with(b"-LOADING")), "{r:?}");
        // The pause is 100 ms; the timeout 10 s: well under the one, far from the other.
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        server.abort();
    }
    use crate::config::ProbeMode;

    #[test]
    fn identity_and_expect() {
        let probe = ProbeConfig {
            mode: ProbeMode::SendExpect,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(1500),
            send: b"INFO server\r\n".to_vec(),
            expect: b"redis_version".to_vec(),
            identity: Some(regex_lite::Regex::new(r"run_id:([0-9a-f]+)").unwrap()),
            fall: 1,
            rise: 1,
            neighbor: true,
            split_brain_window: crate::config::defaults::SPLIT_BRAIN_WINDOW,
            preset: None,
        };
        let reply = b"$100\r\n# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n";
        assert!(contains(reply, &probe.expect));
        assert!(!contains(b"-ERR", &probe.expect));
        assert_eq!(identity_of(&probe, reply).as_deref(), Some("abc123"));
        assert_eq!(identity_of(&probe, b"\xff\xfe garbage"), None);
        let base = KeepaliveConfig {
            idle: Duration::from_secs(9),
            interval: Duration::from_secs(9),
            count: 3,
            user_timeout: Duration::ZERO,
            client_idle: None,
        };
        let ka = probe_keepalive(&probe, &base);
        assert_eq!(
            (ka.idle, ka.interval, ka.user_timeout),
            (Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(7))
        );
    }
}
