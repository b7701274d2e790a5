//! Probe presets: application keep-alives that speak the service's own protocol on the probe
//! connection, log in with a password read from a file, and say whether the node is ready in the role
//! required. The protocols' decisions (parsing a reply, the login's next step, mapping a reply to an
//! `Answer`) are pure functions in `redis` and `postgres`; this is the I/O around them: write the request,
//! read until the replies are whole, within the probe timeout.

pub(crate) mod postgres;
pub(crate) mod redis;

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::sync::Arc;

use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::config::{Preset, PresetKind, TlsCa};
use crate::oserror::classify;

use super::probe::{ExchangeError, ProbeStream};

/// What one exchange of a preset found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Ready in the role required: `identity` names the node (redis `run_id`), `role` is the role it said
    /// when the preset asked (`primary`).
    Ready { identity: Option<String>, role: Option<String> },
    /// It answers in another role than required (`replica`, `standby`).
    WrongRole { role: String },
    /// It answers, but is not ready or does not let the probe in; why, for `/status` and the log (never
    /// a secret).
    NotReady(String),
}

/// The most read for one exchange's replies (`INFO server` is about 1.5 KiB), or for one postgres message.
const REPLY_LIMIT: usize = 64 * 1024;

/// One exchange of the preset on the probe connection, logging in first when it is `fresh` (just connected);
/// each step within `timeout`.
///
/// # Errors
/// No reply in time (`Timeout`), the server closed (`Eof`), or an I/O error; a reply that is not the
/// protocol's is an `Answer::NotReady`.
pub async fn exchange(
    stream: &mut ProbeStream,
    preset: &Preset,
    timeout: Duration,
    fresh: bool,
) -> Result<Answer, ExchangeError> {
    // why: a fresh session starts TLS before the protocol's own login, whichever protocol it is.
    if fresh && let Err(why) = within(timeout, start_tls(stream, preset)).await? {
        return Ok(Answer::NotReady(why));
    }
    match preset.kind {
        PresetKind::Redis => redis_exchange(stream, preset, timeout, fresh).await,
        PresetKind::Postgres => postgres_exchange(stream, preset, timeout, fresh).await,
    }
}

async fn postgres_exchange(
    stream: &mut ProbeStream,
    preset: &Preset,
    timeout: Duration,
    fresh: bool,
) -> Result<Answer, ExchangeError> {
    let mut buf = BytesMut::from(&std::mem::take(&mut stream.unread)[..]);
    if fresh && let Err(why) = within(timeout, postgres_login(stream, &mut buf, preset)).await? {
        return Ok(Answer::NotReady(why));
    }
    let answer = within(timeout, postgres_query(stream, &mut buf, preset)).await?;
    stream.unread = buf.to_vec();
    Ok(answer.unwrap_or_else(Answer::NotReady))
}

/// The startup message and the login the server asks for, until it is ready for a query.
async fn postgres_login(
    stream: &mut ProbeStream,
    buf: &mut BytesMut,
    preset: &Preset,
) -> Result<Result<(), String>, ExchangeError> {
    let startup = match postgres::startup(&preset.user, &preset.database) {
        Ok(startup) => startup,
        Err(e) => return Ok(Err(format!("cannot write the startup message: {e}"))),
    };
    write(stream, &startup).await?;
    let mut login = postgres::Login::new(&preset.user, preset.password.as_ref().map(|p| p.expose()));
    // why: a login is a handful of messages (SCRAM: 3 from the server, then parameters); a server that
    // keeps talking without ever being ready is no server to probe.
    for _ in 0..64 {
        let msg = match read_message(stream, buf).await? {
            Ok(msg) => msg,
            Err(why) => return Ok(Err(why)),
        };
        match login.step(msg) {
            Ok(postgres::Step::Send(out)) => write(stream, &out).await?,
            Ok(postgres::Step::Wait) => {}
            Ok(postgres::Step::Ready) => return Ok(Ok(())),
            Err(why) => return Ok(Err(why)),
        }
    }
    Ok(Err("the login did not end within 64 messages".into()))
}

/// The query of every interval, and what its row says.
async fn postgres_query(
    stream: &mut ProbeStream,
    buf: &mut BytesMut,
    preset: &Preset,
) -> Result<Result<Answer, String>, ExchangeError> {
    write(stream, &postgres::query()).await?;
    let mut row = None;
    for _ in 0..64 {
        let msg = match read_message(stream, buf).await? {
            Ok(msg) => msg,
            Err(why) => return Ok(Err(why)),
        };
        match msg {
            Message::DataRow(body) => match postgres::row_values(&body) {
                Ok(values) => row = Some(values),
                Err(e) => return Ok(Err(format!("the reply is not postgres's ({e})"))),
            },
            Message::ErrorResponse(body) => return Ok(Err(postgres::error_text(body.fields()))),
            Message::ReadyForQuery(_) => {
                return Ok(match row {
                    Some(values) => Ok(postgres::verdict(preset.role, &values)),
                    None => Err("the query returned no row".into()),
                });
            }
            // RowDescription, CommandComplete, and what the server may say at any time.
            _ => {}
        }
    }
    Ok(Err("the query's reply did not end within 64 messages".into()))
}

/// The next whole backend message; `Ok(Err(why))` when the bytes are not postgres's.
async fn read_message(stream: &mut ProbeStream, buf: &mut BytesMut) -> Result<Result<Message, String>, ExchangeError> {
    let mut chunk = [0u8; 4096];
    loop {
        match Message::parse(buf) {
            Ok(Some(msg)) => return Ok(Ok(msg)),
            Ok(None) => {}
            Err(e) => return Ok(Err(format!("the reply is not postgres's ({e}): \"{}\"", shown(buf)))),
        }
        if buf.len() > REPLY_LIMIT {
            return Ok(Err(format!("a message larger than {} KiB", REPLY_LIMIT / 1024)));
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err(ExchangeError::Eof),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(ExchangeError::Failed(classify(&e), e)),
        }
    }
}

async fn write(stream: &mut ProbeStream, bytes: &[u8]) -> Result<(), ExchangeError> {
    // why: over TLS, written bytes may wait in the session until flushed.
    stream.write_all(bytes).await.map_err(|e| ExchangeError::Failed(classify(&e), e))?;
    stream.flush().await.map_err(|e| ExchangeError::Failed(classify(&e), e))
}

/// Starts TLS on a fresh session when the preset asks for it; `Ok(Err(why))` when the server cannot be
/// verified or does not speak TLS (the node is there: not ready).
async fn start_tls(stream: &mut ProbeStream, preset: &Preset) -> Result<Result<(), String>, ExchangeError> {
    let Some(ca) = &preset.tls else { return Ok(Ok(())) };
    if stream.is_tls() {
        return Ok(Ok(()));
    }
    if preset.kind == PresetKind::Postgres {
        // why: a postgres server speaks TLS only after it has said yes to an SSLRequest.
        let mut request = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut request);
        write(stream, &request).await?;
        let mut yes = [0u8; 1];
        match stream.read(&mut yes).await {
            Ok(0) => return Err(ExchangeError::Eof),
            Ok(_) if yes[0] == b'S' => {}
            Ok(_) if yes[0] == b'N' => {
                return Ok(Err("the server does not accept TLS (it answered N to the SSLRequest)".into()));
            }
            Ok(_) => return Ok(Err(format!("the server answered {:?} to the SSLRequest", char::from(yes[0])))),
            Err(e) => return Err(ExchangeError::Failed(classify(&e), e)),
        }
    }
    let config = match tls_config(ca) {
        Ok(c) => c,
        Err(why) => return Ok(Err(why)),
    };
    let name = match preset.tls_name.parse::<std::net::IpAddr>() {
        Ok(ip) => rustls_pki_types::ServerName::from(ip),
        Err(_) => match rustls_pki_types::ServerName::try_from(preset.tls_name.clone()) {
            Ok(name) => name,
            Err(e) => return Ok(Err(format!("{:?} is no name a certificate can carry: {e}", preset.tls_name))),
        },
    };
    match stream.start_tls(config, name).await {
        Ok(()) => Ok(Ok(())),
        // why: a reset or a close during the handshake is the address's answer, as on a plain session.
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted) => {
            Err(ExchangeError::Failed(classify(&e), e))
        }
        Err(e) => Ok(Err(format!("TLS: {e}"))),
    }
}

/// The TLS client settings: the server's certificate must chain to a certificate of the CA file.
fn tls_config(ca: &TlsCa) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for der in &ca.certs {
        roots
            .add(rustls_pki_types::CertificateDer::from(der.clone()))
            .map_err(|e| format!("a certificate of {} cannot be a root: {e}", ca.file.display()))?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn redis_exchange(
    stream: &mut ProbeStream,
    preset: &Preset,
    timeout: Duration,
    fresh: bool,
) -> Result<Answer, ExchangeError> {
    if fresh && let Some(password) = &preset.password {
        let replies = within(timeout, ask_redis(stream, &redis::auth(&preset.user, password.expose()), 1)).await?;
        match replies {
            Err(why) => return Ok(Answer::NotReady(why)),
            Ok(replies) => {
                if let Err(why) = replies.first().map_or(Err("no reply to AUTH".into()), redis::login) {
                    return Ok(Answer::NotReady(why));
                }
            }
        }
    }
    let (request, count) = redis::request(preset.role);
    match within(timeout, ask_redis(stream, &request, count)).await? {
        Ok(replies) => Ok(redis::verdict(preset.role, &replies)),
        Err(why) => Ok(Answer::NotReady(why)),
    }
}

/// Runs one step within `timeout`.
async fn within<T>(
    timeout: Duration,
    step: impl Future<Output = Result<T, ExchangeError>>,
) -> Result<T, ExchangeError> {
    tokio::time::timeout(timeout, step).await.unwrap_or(Err(ExchangeError::Timeout))
}

/// Sends `request` and reads `count` replies; `Ok(Err(why))` when what came back is not redis's.
async fn ask_redis(
    stream: &mut ProbeStream,
    request: &[u8],
    count: usize,
) -> Result<Result<Vec<redis::Value>, String>, ExchangeError> {
    write(stream, request).await?;
    let mut buf = std::mem::take(&mut stream.unread);
    let mut replies = Vec::with_capacity(count);
    let mut at = 0;
    let mut chunk = [0u8; 4096];
    loop {
        while replies.len() < count {
            match redis::parse(&buf[at..]) {
                Ok(Some((value, used))) => {
                    replies.push(value);
                    at += used;
                }
                Ok(None) => break,
                Err(e) => return Ok(Err(format!("the reply is not redis's ({e}): \"{}\"", shown(&buf)))),
            }
        }
        if replies.len() == count {
            stream.unread = buf.split_off(at);
            return Ok(Ok(replies));
        }
        if buf.len() > REPLY_LIMIT {
            return Ok(Err(format!("the reply is larger than {} KiB", REPLY_LIMIT / 1024)));
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err(ExchangeError::Eof),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(ExchangeError::Failed(classify(&e), e)),
        }
    }
}

/// The start of a reply, for a message (lossy UTF-8, escaped, at most 120 bytes).
fn shown(reply: &[u8]) -> String {
    String::from_utf8_lossy(&reply[..reply.len().min(120)]).escape_debug().collect()
}
