//! The admin server, on its own thread and single-threaded runtime so a saturated data path cannot starve
//! it. Endpoints:
//! * `GET /metrics`: Prometheus text format.
//! * `GET /healthz`: 200 while the process runs.
//! * `GET /readyz`: 200 when every listener is bound and no service is beyond its hold deadline or
//!   waiting for a dependency; 503 with the reasons otherwise.
//! * `GET /status`: JSON, one object per service.
//! * `POST /failover/{service}`: declare a failover now (a cluster manager's notify hook); 202, or 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::failover::Sign;
use crate::registry::Registry;

/// The running admin server.
pub struct AdminHandle {
    addr: SocketAddr,
    fd: OwnedFd,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
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
pub fn start_on(std_listener: std::net::TcpListener, registry: Arc<Registry>) -> std::io::Result<AdminHandle> {
    std_listener.set_nonblocking(true)?;
    // why: kept to hand the socket to the process an upgrade starts.
    let fd = std_listener.as_fd().try_clone_to_owned()?;
    let bound = std_listener.local_addr()?;
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
    info!(listen = %bound, "admin endpoint listening");
    Ok(AdminHandle { addr: bound, fd, stop, thread: Some(thread) })
}

async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, stop: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = upkeep.tick() => registry.telemetry.upkeep(),
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let registry = registry.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let registry = registry.clone();
                        async move { Ok::<_, Infallible>(route(&registry, req)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(TokioIo::new(stream), svc);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "admin connection ended with an error");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "admin accept failed"),
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn route(registry: &Registry, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", registry.telemetry.render())
        }
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            let reasons = not_ready(registry);
            if reasons.is_empty() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", reasons.join("\n") + "\n")
            }
        }
        (&Method::GET, "/status") => reply(StatusCode::OK, "application/json", status_json(registry).to_string()),
        (&Method::POST, p) if p.starts_with("/failover/") => {
            let name = &p["/failover/".len()..];
            let services = registry.services.load();
            match services.iter().find(|e| e.name == name) {
                Some(entry) => {
                    info!(service = %name, "failover declared through the admin endpoint");
                    entry.service.load().detector.sign(Sign::Admin);
                    reply(StatusCode::ACCEPTED, "text/plain", format!("failover of {name} declared\n"))
                }
                None => reply(StatusCode::NOT_FOUND, "text/plain", format!("no service named {name:?}\n")),
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/status") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n")
        }
        (_, p) if p.starts_with("/failover/") => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n"),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /metrics /healthz /readyz /status /failover/{service}\n",
        ),
    }
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
        if !view.state.connectable() && now.saturating_duration_since(view.since) > svc.cfg.hold.deadline {
            reasons.push(format!(
                "service {}: upstream {} {} for {:.1}s, beyond the hold deadline of {}",
                entry.name,
                svc.cfg.upstream,
                view.state.as_str(),
                now.saturating_duration_since(view.since).as_secs_f64(),
                humantime::format_duration(svc.cfg.hold.deadline)
            ));
        }
        if let Some(dep) = svc.missing_dependency() {
            reasons.push(format!("service {}: waiting for dependency {dep} (its upstream is not up)", entry.name));
        }
    }
    reasons
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
                "neighbor_watch": &*view.neighbor,
                "note": view.note.as_deref(),
            })
        })
        .collect();
    serde_json::Value::Array(list)
}
