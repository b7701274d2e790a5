//! Loopback harness: staybound in-process on port 0, fake upstreams, metric scraping, bounded waiting.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use staybound::config::Config;
use staybound::metrics::Telemetry;
use staybound::server::Instance;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A staybound running in this process.
pub struct Proxy {
    pub instance: Instance,
    pub telemetry: Telemetry,
}

impl Proxy {
    /// Starts staybound from config text; `[admin] listen` defaults to port 0 here.
    pub async fn start(text: &str) -> Proxy {
        let text = if text.contains("[admin]") {
            text.to_string()
        } else {
            format!("[admin]\nlisten = \"127.0.0.1:0\"\n{text}")
        };
        let config = Config::from_toml_str(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
        let telemetry = Telemetry::new();
        let instance = Instance::start(config, telemetry.clone()).await.unwrap_or_else(|e| panic!("{e}"));
        Proxy { instance, telemetry }
    }

    pub fn addr(&self, service: &str) -> SocketAddr {
        self.instance.listen_addrs(service)[0]
    }

    /// The value of one series, e.g. `metric("staybound_bytes_total", &[("service","a"),("direction","upstream")])`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_in(&self.telemetry.render(), name, labels)
    }
}

/// Finds a series in Prometheus text; panics when it is absent, so a renamed metric fails loudly.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_opt(text, name, labels).unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{text}"))
}

/// The value of the series `name` with `labels`, if the exposition has it.
pub fn metric_opt(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            continue;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return Some(value.parse().unwrap_or(f64::NAN));
        }
    }
    None
}

/// Polls `f` every 10 ms until it holds; panics with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that echoes every byte back and passes a half-close on.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A loopback port with nothing listening on it.
pub fn closed_port() -> SocketAddr {
    // why: a port freed on 127.0.0.1 can be taken at once by another test's listener on a busy machine (an
    // ephemeral bind elsewhere), and then "nothing listens" is false; an address of its own in 127.64/10,
    // which no other test binds, keeps the port closed until the test itself listens on it.
    let ip = std::net::Ipv4Addr::new(127, fastrand::u8(64..128), fastrand::u8(..), fastrand::u8(1..255));
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap()
}

/// Reads until EOF or error; returns what was read and whether it ended in a reset.
pub async fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (out, true),
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// A 64-bit FNV-1a hash, fed in pieces.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }
    pub fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}
