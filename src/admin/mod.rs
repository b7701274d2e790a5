//! The admin server, on its own thread and single-threaded runtime so a saturated data path cannot starve
//! it. Endpoints (GET ones answer HEAD too):
//! * `GET /metrics`: Prometheus text format.
//! * `GET /healthz`: 200 while the process runs.
//! * `GET /readyz`: 200 when every listener is bound and no service is beyond its hold deadline or
//!   waiting for a dependency; 503 with the reasons otherwise.
//! * `GET /status`: JSON, one object per service.
//! * `POST /failover/{service}`: declare a failover now (a cluster manager's notify hook); 202, or 404.
//!
//! Safe to expose: a request whose `Host` or `Origin` is not this endpoint is refused 403 (DNS rebinding,
//! cross-site posts from a browser); the hook needs the bearer token when one is configured (401) and
//! declares at most one failover per service per `failover_rate` (429 with `Retry-After`). Connections
//! have a budget of their own, [`MAX_CONNECTIONS`], apart from the data path's, and one request each;
//! a request head must arrive within [`HEADER_TIMEOUT`]. Every refusal is counted
//! (`staybound_admin_requests_refused_total{reason}`) and logged at most once a second per reason.
//! Errors have JSON bodies (`{"error": "..."}`); 405 names the methods allowed in `Allow`.

mod guard;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::failover::Sign;
use crate::metrics::AdminRefusal;
use crate::ratelog::RateLimitedLog;
use crate::registry::Registry;

/// Admin connections open at once. Beyond it the oldest one that has not sent a whole request yet is
/// closed to make room (or the new one, when every open one is being answered).
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request head, from its connect.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The running admin server.
pub(crate) struct AdminHandle {
    addr: SocketAddr,
    fd: OwnedFd,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminHandle {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening socket.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Stops the server and waits for its thread.
    pub(crate) fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds the admin address: done before anything else starts, so a busy port fails the start before any
/// service says it is listening.
///
/// # Errors
/// The bind error.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
}

/// Serves on a listening socket already bound (by [`bind`], or by the process this one upgrades), on a
/// thread of its own.
///
/// # Errors
/// The socket cannot be set up.
pub(crate) fn start_on(std_listener: std::net::TcpListener, registry: Arc<Registry>) -> std::io::Result<AdminHandle> {
    std_listener.set_nonblocking(true)?;
    // why: kept to hand the socket to the process an upgrade starts.
    let fd = std_listener.as_fd().try_clone_to_owned()?;
    let bound = std_listener.local_addr()?;
    // why: the log says whether the hook needs a token, never the token.
    let hook_token = if registry.admin.load().token.is_some() { "set" } else { "none" };
    let stop = CancellationToken::new();
    let stop_thread = stop.clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let thread = std::thread::Builder::new().name("admin".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "admin server could not start");
                    return;
                }
            };
            serve(listener, registry, stop_thread).await;
        });
    })?;
    info!(listen = %bound, hook_token = hook_token, "admin endpoint listening");
    Ok(AdminHandle { addr: bound, fd, stop, thread: Some(thread) })
}

/// What the admin server keeps between requests.
struct State {
    registry: Arc<Registry>,
    rate: Mutex<guard::HookRate>,
    /// One rate-limited log per refusal reason.
    refusals: Mutex<[RateLimitedLog; AdminRefusal::ALL.len()]>,
}

impl State {
    /// Counts a refusal, and logs it unless a line for the same reason was written within the second.
    fn refused(&self, reason: AdminRefusal, peer: SocketAddr, detail: &str) {
        self.registry.telemetry.admin_refused(reason);
        debug!(reason = reason.as_str(), client = %peer, detail, "admin request refused");
        let due = self.refusals.lock().ok().and_then(|mut logs| {
            let i = reason.index();
            logs[i].hit()
        });
        if let Some(n) = due {
            warn!(reason = reason.as_str(), client = %peer, detail, refused = n, "admin requests refused");
        }
    }
}

/// An open admin connection, in accept order.
struct Slot {
    id: u64,
    /// A request of it is being answered: not to be closed for room.
    answering: Arc<AtomicBool>,
    evict: CancellationToken,
}

async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, stop: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    let state = Arc::new(State {
        registry: registry.clone(),
        rate: Mutex::default(),
        refusals: Mutex::new(std::array::from_fn(|_| RateLimitedLog::new(Duration::from_secs(1)))),
    });
    let slots: Arc<Mutex<Vec<Slot>>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            _ = upkeep.tick() => { registry.telemetry.upkeep(); continue }
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    // why: out of file descriptors, accept fails at once again; pause instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        let admitted = {
            let mut open = slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let answering: Vec<bool> = open.iter().map(|s| s.answering.load(Ordering::Relaxed)).collect();
            match guard::admit(&answering, MAX_CONNECTIONS) {
                guard::Admit::Take => true,
                guard::Admit::Evict(i) => {
                    open.remove(i).evict.cancel();
                    state.refused(
                        AdminRefusal::ConnectionLimit,
                        peer,
                        "connection budget full: closed the oldest connection that had not sent a whole request",
                    );
                    true
                }
                guard::Admit::Refuse => false,
            }
        };
        if !admitted {
            drop(stream);
            state.refused(AdminRefusal::ConnectionLimit, peer, "connection budget full: closed the new connection");
            continue;
        }
        let local = stream.local_addr().unwrap_or_else(|_| listener.local_addr().unwrap_or(peer));
        let answering = Arc::new(AtomicBool::new(false));
        let evict = CancellationToken::new();
        next_id += 1;
        let id = next_id;
        slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Slot {
            id,
            answering: answering.clone(),
            evict: evict.clone(),
        });
        let st = state.clone();
        let svc = hyper::service::service_fn(move |req| {
            answering.store(true, Ordering::Relaxed);
            let resp = route(&st, local, peer, &req);
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            // why: one request per connection, so a connection is either sending its request (and may be
            // closed for room) or being answered; an idle keep-alive connection cannot hold a slot.
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        let slots = slots.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(error = %e, client = %peer, "admin connection ended with an error");
                },
                _ = evict.cancelled() => debug!(client = %peer, "admin connection closed for room"),
            }
            slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|s| s.id != id);
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// An error answer: `{"error": message}`.
fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    reply(status, "application/json", json!({ "error": message.into() }).to_string() + "\n")
}

fn header(req: &Request<Incoming>, name: header::HeaderName) -> Option<&str> {
    // A value that is not visible ASCII is no host or origin of ours; "\u{fffd}" is refused by both checks.
    req.headers().get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// The endpoints, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint<'a> {
    Metrics,
    Healthz,
    Readyz,
    Status,
    Failover(&'a str),
}

impl<'a> Endpoint<'a> {
    fn of(path: &'a str) -> Option<Endpoint<'a>> {
        match path {
            "/metrics" => Some(Endpoint::Metrics),
            "/healthz" => Some(Endpoint::Healthz),
            "/readyz" => Some(Endpoint::Readyz),
            "/status" => Some(Endpoint::Status),
            p => p.strip_prefix("/failover/").map(Endpoint::Failover),
        }
    }

    /// The methods it answers, as `Allow` lists them.
    fn allow(self) -> &'static str {
        match self {
            Endpoint::Failover(_) => "POST",
            _ => "GET, HEAD",
        }
    }
}

const ENDPOINTS: &str = "GET /metrics, /healthz, /readyz, /status; POST /failover/{service}";

fn route(state: &State, local: SocketAddr, peer: SocketAddr, req: &Request<Incoming>) -> Reply {
    let allowed = guard::allowed_hosts(local);
    let host = header(req, header::HOST);
    if !guard::host_ok(host, &allowed) {
        let host = host.unwrap_or_default();
        state.refused(AdminRefusal::ForbiddenHost, peer, host);
        return error(StatusCode::FORBIDDEN, format!("Host {host:?} is not this admin endpoint ({})", allowed[0]));
    }
    let origin = header(req, header::ORIGIN);
    if !guard::origin_ok(origin, &allowed) {
        let origin = origin.unwrap_or_default();
        state.refused(AdminRefusal::ForbiddenOrigin, peer, origin);
        return error(StatusCode::FORBIDDEN, format!("requests from origin {origin:?} are not accepted"));
    }
    let Some(endpoint) = Endpoint::of(req.uri().path()) else {
        return error(StatusCode::NOT_FOUND, format!("no such endpoint; the endpoints: {ENDPOINTS}"));
    };
    let method = req.method();
    let get = matches!(*method, Method::GET | Method::HEAD);
    match endpoint {
        Endpoint::Failover(name) if method == Method::POST => failover(state, peer, req, name),
        Endpoint::Failover(_) => not_allowed(endpoint),
        _ if !get => not_allowed(endpoint),
        _ => {
            let resp = answer(&state.registry, endpoint);
            if method == Method::HEAD { head(resp) } else { resp }
        }
    }
}

fn not_allowed(endpoint: Endpoint<'_>) -> Reply {
    let allow = endpoint.allow();
    let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; use {allow}"));
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// The GET answer without its body: same status and headers, the length the body would have.
fn head(resp: Reply) -> Reply {
    use hyper::body::Body;
    let len = resp.body().size_hint().exact().unwrap_or(0);
    let (mut parts, _) = resp.into_parts();
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Response::from_parts(parts, Full::new(Bytes::new()))
}

fn answer(registry: &Registry, endpoint: Endpoint<'_>) -> Reply {
    match endpoint {
        Endpoint::Metrics => {
            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", registry.telemetry.render())
        }
        Endpoint::Healthz => reply(StatusCode::OK, "text/plain", "ok\n"),
        Endpoint::Readyz => {
            let reasons = not_ready(registry);
            if reasons.is_empty() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                let body = json!({ "error": format!("not ready: {}", reasons.join("; ")), "reasons": reasons });
                reply(StatusCode::SERVICE_UNAVAILABLE, "application/json", body.to_string() + "\n")
            }
        }
        Endpoint::Status => reply(StatusCode::OK, "application/json", status_json(registry).to_string()),
        Endpoint::Failover(_) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
    }
}

/// `POST /failover/{name}`: the token first (so service names are not told to strangers), then the name,
/// then the rate.
fn failover(state: &State, peer: SocketAddr, req: &Request<Incoming>, name: &str) -> Reply {
    let registry = &state.registry;
    let settings = registry.admin.load();
    let auth = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    if !guard::authorized(auth, settings.token.as_ref()) {
        let why = if auth.is_some() { "wrong bearer token" } else { "no bearer token" };
        state.refused(AdminRefusal::Unauthorized, peer, why);
        let mut resp =
            error(StatusCode::UNAUTHORIZED, format!("{why}: send Authorization: Bearer <the token_file's token>"));
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"staybound\""));
        return resp;
    }
    let services = registry.services.load();
    let Some(entry) = services.iter().find(|e| e.name == name) else {
        return error(StatusCode::NOT_FOUND, format!("no service named {name:?}"));
    };
    let admitted = state
        .rate
        .lock()
        .map_or(Ok(()), |mut rate| rate.admit(name, std::time::Instant::now(), settings.failover_rate));
    if let Err(wait) = admitted {
        state.refused(AdminRefusal::RateLimited, peer, name);
        let secs = guard::retry_after_secs(wait);
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "a failover of {name} was declared less than {} ago (admin.failover_rate); retry in {secs}s",
                humantime::format_duration(settings.failover_rate)
            ),
        );
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    info!(service = %name, client = %peer, "failover declared through the admin endpoint");
    entry.service.load().detector.sign(Sign::Admin);
    reply(StatusCode::ACCEPTED, "text/plain", format!("failover of {name} declared\n"))
}

/// Why the process is not ready, one line per reason; empty when ready.
pub fn not_ready(registry: &Registry) -> Vec<String> {
    let mut reasons = Vec::new();
    let now = Instant::now();
    let services = registry.services.load();
    if services.is_empty() {
        reasons.push("no service is running".to_string());
    }
    for entry in services.iter() {
        let svc = entry.service.load();
        if entry.bound().len() != svc.cfg.listen.len() {
            reasons.push(format!("service {}: not every listener is bound", entry.name));
        }
        let view = svc.detector.view.borrow().clone();
        if !view.state.connectable() && now.saturating_duration_since(view.since) > svc.cfg.ride_out.deadline {
            reasons.push(format!(
                "service {}: upstream {} {} for {:.1}s, beyond the hold deadline of {}",
                entry.name,
                svc.cfg.upstream,
                view.state.as_str(),
                now.saturating_duration_since(view.since).as_secs_f64(),
                humantime::format_duration(svc.cfg.ride_out.deadline)
            ));
        }
        if let Some(dep) = svc.missing_dependency() {
            reasons.push(format!("service {}: waiting for dependency {dep} (its upstream is not up)", entry.name));
        }
    }
    reasons
}

/// A guard service's part of `/status` (null for other services): whether the kernel lets staybound destroy
/// sockets, and what the last epoch end destroyed.
fn guard_json(registry: &Registry, name: &str, guard: bool) -> serde_json::Value {
    if !guard {
        return serde_json::Value::Null;
    }
    let last = registry.guard.last(name).map(|l| {
        json!({
            "time": humantime::format_rfc3339_millis(l.at).to_string(),
            "epoch": l.epoch,
            "destroyed": l.sweep.destroyed,
            "failed": l.sweep.failed,
            "error": l.sweep.error,
            "seconds": l.took.as_secs_f64(),
        })
    });
    json!({
        "destroy": registry.guard.ability().map_or("not checked yet".to_string(), |a| a.describe()),
        "last_epoch_end": last,
    })
}

/// The `/status` document.
pub fn status_json(registry: &Registry) -> serde_json::Value {
    let services = registry.services.load();
    let list: Vec<serde_json::Value> = services
        .iter()
        .map(|entry| {
            let svc = entry.service.load();
            let view = svc.detector.view.borrow().clone();
            let last = view.last_failover.as_ref().map(|f| {
                json!({
                    "time": humantime::format_rfc3339_millis(f.at).to_string(),
                    "cause": f.signal.as_str(),
                    "detection_seconds": f.detection.as_secs_f64(),
                    "epoch": f.epoch,
                })
            });
            json!({
                "name": entry.name,
                "state": view.state.as_str(),
                "epoch": view.epoch,
                "identity": view.identity.as_deref(),
                "last_failover": last,
                "active_sessions": svc.counts.active(),
                "held_clients": svc.counts.held(),
                "upstream": svc.cfg.upstream.to_string(),
                "listen": entry.bound().iter().map(ToString::to_string).collect::<Vec<_>>(),
                "probe": svc.cfg.probe.mode.as_str(),
                "preset": svc.cfg.probe.preset.as_ref().map(|p| p.kind.as_str()),
                "role": view.role.as_deref(),
                "neighbor_watch": &*view.neighbor,
                "note": view.note.as_deref(),
                "split_brain": view.split_brain,
                "guard": guard_json(registry, &entry.name, svc.cfg.guard),
                "intercept": if svc.cfg.intercept {
                    json!({ "rules": registry.intercept.rules().unwrap_or_else(|| "not installed yet".into()) })
                } else {
                    serde_json::Value::Null
                },
            })
        })
        .collect();
    serde_json::Value::Array(list)
}
