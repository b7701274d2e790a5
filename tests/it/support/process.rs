//! staybound as a child process on loopback, its admin and listen addresses read from its JSON log.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_staybound");

/// A running staybound; killed on drop.
pub struct Running {
    pub child: Child,
    pub admin: SocketAddr,
    pub config: PathBuf,
    /// Every JSON log line so far.
    pub log: Arc<Mutex<Vec<serde_json::Value>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts `staybound run` (`sidecar::bin()`: `STAYBOUND_BIN` runs another build) on `text`; returns once
    /// the admin endpoint and every listener are up.
    pub fn start(text: &str) -> Running {
        Running::start_wrapped(&[], text)
    }

    /// As [`Running::start`], with `wrapper` (such as `prlimit` and its arguments) in front of staybound.
    pub fn start_wrapped(wrapper: &[&str], text: &str) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s.toml");
        std::fs::write(&config, text).unwrap();
        let bin = super::sidecar::bin();
        let (program, args) = match wrapper.split_first() {
            Some((first, rest)) => (first.to_string(), rest.iter().map(|a| a.to_string()).chain([bin]).collect()),
            None => (bin, Vec::new()),
        };
        let mut child = Command::new(program)
            .args(args)
            .args(["--log-format", "json", "--log-level", "debug", "run", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        let mut r = Running { child, admin: "0.0.0.0:0".parse().unwrap(), config, log, _dir: dir };
        r.admin = r.wait_log("admin endpoint listening", Duration::from_secs(10))["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        r.wait_log("staybound running", Duration::from_secs(10));
        r
    }

    /// Waits for a log line whose message is `message`; returns it.
    pub fn wait_log(&self, message: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.log.lock().unwrap().iter().find(|v| v["message"] == message) {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line {message:?} within {timeout:?}: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn get(&self, path: &str) -> String {
        staybound::status::fetch(self.admin, path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Listen addresses by service name, from `/status`.
    pub fn listens(&self) -> HashMap<String, Vec<SocketAddr>> {
        let doc: serde_json::Value = serde_json::from_str(&self.get("/status")).unwrap();
        doc.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let addrs =
                    s["listen"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().parse().unwrap()).collect();
                (s["name"].as_str().unwrap().to_string(), addrs)
            })
            .collect()
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::proxy::metric_in(&self.get("/metrics"), name, labels)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }
}

/// An echo upstream on a thread; returns its address.
pub fn echo() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    echo_on(l);
    addr
}

/// Echoes every connection `l` accepts, on threads.
pub fn echo_on(l: std::net::TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
}

/// One `[[service]]` on a port-0 listener with a `connect` probe; `extra` goes before its
/// `[service.probe]` table (keys or tables).
pub fn svc(name: &str, up: SocketAddr, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{extra}[service.probe]\nmode = \"connect\"\n"
    )
}

/// Writes `msg` and reads the same bytes back.
pub fn round_trip(s: &mut std::net::TcpStream, msg: &[u8]) {
    use std::io::{Read, Write};
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}
