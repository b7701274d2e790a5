//! A closed-loop legacy client: SET then GET on one connection at about 200 requests a second, with a
//! per-request timeout and one reconnect allowed per request (a client with minimal retries). It records
//! every success so the longest stall can be measured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::lab::{Host, Lab};

/// What the client saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub ok: u64,
    pub lost: u64,
    pub successes: Vec<Instant>,
}

impl Stats {
    /// The longest gap between two successes.
    pub fn longest_stall(&self) -> Duration {
        self.successes.windows(2).map(|w| w[1].duration_since(w[0])).max().unwrap_or_default()
    }
}

pub struct LoadClient {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    handle: JoinHandle<Stats>,
}

/// Pace between requests.
const PACE: Duration = Duration::from_millis(5);

impl LoadClient {
    pub fn start(lab: &Lab, host: Host, to: SocketAddr, timeout: Duration, tag: &'static str) -> LoadClient {
        LoadClient::start_for(lab, host, to, timeout, tag, Duration::from_secs(120))
    }

    /// As `start`, running at most `limit`.
    pub fn start_for(
        lab: &Lab,
        host: Host,
        to: SocketAddr,
        timeout: Duration,
        tag: &'static str,
        limit: Duration,
    ) -> LoadClient {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let ok = Arc::new(AtomicU64::new(0));
        let ok2 = ok.clone();
        // Connections are made inside the namespace (a socket keeps its namespace); the loop runs here.
        let connect = {
            let ns = lab.ns_name(host).to_string();
            move || connect_in(&ns, to, timeout)
        };
        let handle = std::thread::spawn(move || {
            let mut stats = Stats::default();
            let mut conn: Option<TcpStream> = None;
            let mut i: u64 = 0;
            let deadline = Instant::now() + limit;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                i += 1;
                let mut done = request(&mut conn, &connect, tag, i, timeout);
                if !done {
                    conn = None;
                    done = request(&mut conn, &connect, tag, i, timeout);
                }
                if done {
                    stats.ok += 1;
                    ok2.fetch_add(1, Ordering::Relaxed);
                    stats.successes.push(Instant::now());
                } else {
                    stats.lost += 1;
                    conn = None;
                }
                // why: pacing of the request rate, not synchronisation.
                std::thread::sleep(PACE);
            }
            stats
        });
        LoadClient { stop, ok, handle }
    }

    /// Requests answered so far, while it runs.
    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn finish(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load client thread")
    }
}

fn connect_in(ns: &str, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    super::lab::connect_in_ns(ns, to, timeout)
}

/// One SET then GET, connecting first if needed; false on any failure within `timeout`.
fn request(
    conn: &mut Option<TcpStream>,
    connect: &impl Fn() -> std::io::Result<TcpStream>,
    tag: &str,
    i: u64,
    timeout: Duration,
) -> bool {
    let start = Instant::now();
    if conn.is_none() {
        match connect() {
            Ok(s) => *conn = Some(s),
            Err(_) => return false,
        }
    }
    let Some(s) = conn.as_mut() else { return false };
    let key = format!("{tag}:{i}");
    let val = format!("v{i}");
    let set = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{val}\r\n", key.len(), val.len());
    let get = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    let want_get = format!("${}\r\n{val}\r\n", val.len());
    for (cmd, want) in [(set.as_bytes(), b"+OK\r\n".as_slice()), (get.as_bytes(), want_get.as_bytes())] {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() || s.write_all(cmd).is_err() {
            return false;
        }
        let mut got = Vec::with_capacity(want.len());
        let mut buf = [0u8; 256];
        while got.len() < want.len() {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        if got != want {
            return false;
        }
    }
    true
}

/// A 2 s switchover from `from` to `to` (whose service is stopped) ridden by a closed-loop client dialling
/// `dial`: `from`'s service stops, the address moves, `to`'s service starts 2 s later.
pub fn switchover(lab: &Lab, dial: SocketAddr, from: Host, to: Host, tag: &'static str) -> Stats {
    let load = LoadClient::start(lab, Host::Client, dial, Duration::from_secs(5), tag);
    super::wait::wait_until("the closed-loop client runs", Duration::from_secs(5), || load.ok_so_far() >= 100);
    let t0 = Instant::now();
    lab.stop_redis(from);
    lab.move_logical(from, to, true);
    // why: the scenario: the new node's service starts 2 s after its address.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(t0.elapsed()));
    lab.start_redis(to);
    let before = load.ok_so_far();
    super::wait::wait_until("the closed-loop client is served by the new node", Duration::from_secs(10), || {
        load.ok_so_far() >= before + 100
    });
    load.finish()
}
