//! staybound as a sidecar in the lab's client namespace, legacy clients blocked on it, and what its admin
//! endpoint says. Shared by the failover, ride-out and fault tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::lab::{Host, LOGICAL, Lab, REDIS_PORT};
use super::wait::wait_until;
use staybound::config::Config;
use staybound::failover::bounds::{Bounds, bounds};

pub const BIN: &str = env!("CARGO_BIN_EXE_staybound");

/// The staybound binary a lab scenario runs: `BIN`, or `STAYBOUND_BIN` to run the same scenario on another
/// build (an older one, for the figures "before").
pub fn bin() -> String {
    std::env::var("STAYBOUND_BIN").unwrap_or_else(|_| BIN.to_owned())
}
pub const LISTEN: &str = "127.0.0.1:6379";
pub const ADMIN: &str = "127.0.0.1:9901";

/// A staybound process in the client namespace, with one service `redis` in front of the logical host.
pub struct Sidecar<'a> {
    pub lab: &'a Lab,
    pub pid: u32,
    pub config: Config,
}

impl<'a> Sidecar<'a> {
    /// Starts staybound with `service_extra` appended to the `redis` service (tables such as `[service.probe]`).
    pub fn start(lab: &'a Lab, service_extra: &str) -> Sidecar<'a> {
        Sidecar::start_with(lab, &format!("listen = \"{LISTEN}\"\n"), service_extra)
    }

    /// [`Sidecar::start`] with the logical host's `port` as upstream (the service is still named `redis`,
    /// and listens on [`LISTEN`]). The config file is written in the lab's directory, so relative paths in
    /// it (a password file) are taken from there.
    pub fn start_to(lab: &'a Lab, port: u16, service_extra: &str) -> Sidecar<'a> {
        Sidecar::start_full(lab, &[], &format!("listen = \"{LISTEN}\"\n"), port, service_extra)
    }

    /// Starts staybound with the `redis` service's top-level keys `service_keys` (such as its `listen`, or
    /// `guard = true`) and then `service_extra`.
    pub fn start_with(lab: &'a Lab, service_keys: &str, service_extra: &str) -> Sidecar<'a> {
        Sidecar::start_as(lab, &[], service_keys, service_extra)
    }

    /// As `start_with`, with `wrapper` (such as `setpriv` and its arguments) in front of staybound's command.
    pub fn start_as(lab: &'a Lab, wrapper: &[&str], service_keys: &str, service_extra: &str) -> Sidecar<'a> {
        Sidecar::start_full(lab, wrapper, service_keys, REDIS_PORT, service_extra)
    }

    fn start_full(lab: &'a Lab, wrapper: &[&str], service_keys: &str, port: u16, service_extra: &str) -> Sidecar<'a> {
        let text = format!(
            "shutdown_grace = \"1s\"\n[admin]\nlisten = \"{ADMIN}\"\n[[service]]\nname = \"redis\"\n{service_keys}upstream = \"{LOGICAL}:{port}\"\n{service_extra}"
        );
        let path = lab.dir().join("staybound.toml");
        std::fs::write(&path, &text).unwrap();
        let config = Config::from_toml_str(&text, &path).unwrap_or_else(|e| panic!("{e}"));
        let path_s = path.to_str().unwrap().to_string();
        let bin = bin();
        let mut argv = wrapper.to_vec();
        argv.extend(["env", "RUST_LOG=staybound=debug", &bin, "--log-format", "json", "run", "--config", &path_s]);
        let pid = lab.spawn(Host::Client, &argv);
        let sc = Sidecar { lab, pid, config };
        // The admin endpoint answers before the services are registered: wait for them in /status.
        wait_until("staybound's services are registered", Duration::from_secs(10), || {
            sc.try_get("/status").is_ok_and(|body| body.trim() != "[]")
        });
        sc
    }

    fn try_get(&self, path: &str) -> Result<String, String> {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        self.lab.in_ns(Host::Client, || staybound::status::fetch(admin, path))
    }

    pub fn get(&self, path: &str) -> String {
        self.try_get(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The `redis` service's object in `/status`.
    pub fn status(&self) -> serde_json::Value {
        let body = self.get("/status");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status: {e}: {body}"));
        doc.as_array().and_then(|a| a.first()).cloned().unwrap_or_else(|| panic!("one service in /status: {body}"))
    }

    pub fn state(&self) -> String {
        self.status()["state"].as_str().unwrap_or("?").to_string()
    }

    pub fn epoch(&self) -> u64 {
        self.status()["epoch"].as_u64().unwrap_or(0)
    }

    pub fn wait_state(&self, state: &str, timeout: Duration) {
        wait_until(&format!("staybound reports {state}"), timeout, || self.state() == state);
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::proxy::metric_in(&self.get("/metrics"), name, labels)
    }

    /// A series that an older build (`STAYBOUND_BIN`) may not have: NaN when it is absent.
    pub fn metric_or_nan(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::proxy::metric_opt(&self.get("/metrics"), name, labels).unwrap_or(f64::NAN)
    }

    /// The worst cases `staybound check` computes for this config.
    pub fn bounds(&self) -> Bounds {
        bounds(&self.config.services[0])
    }

    pub fn listen(&self) -> SocketAddr {
        LISTEN.parse().unwrap()
    }
}

/// A legacy client blocked in `BLPOP key 0`: it waits forever unless its connection breaks.
pub struct Blocked {
    rx: mpsc::Receiver<(Instant, String)>,
}

impl Blocked {
    /// Connects from `host` to `to`, checks the session with PING, then blocks in BLPOP on a thread.
    pub fn start(lab: &Lab, host: Host, to: SocketAddr) -> Blocked {
        let mut s: TcpStream =
            lab.connect_tcp(host, to, Duration::from_secs(3)).unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"+PONG\r\n", "the session works before it blocks");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"*3\r\n$5\r\nBLPOP\r\n$7\r\nsomekey\r\n$1\r\n0\r\n").unwrap();
        let (tx, rx) = mpsc::channel();
        // why: it keeps blocking after each 30 s read timeout (reported as "still blocked after 30s"), so
        // a scenario of ten minutes sees the session end whenever it does; it stops when the receiver goes.
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                let what = match s.read(&mut buf) {
                    Ok(0) => "eof".to_string(),
                    Ok(n) => format!("data {:?}", String::from_utf8_lossy(&buf[..n])),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".to_string(),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        if tx.send((Instant::now(), "still blocked after 30s".to_string())).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(e) => format!("error {e}"),
                };
                let _ = tx.send((Instant::now(), what));
                return;
            }
        });
        Blocked { rx }
    }

    /// When and how the blocked call ended, if it did within `timeout`.
    pub fn ended(&self, timeout: Duration) -> Option<(Instant, String)> {
        self.rx.recv_timeout(timeout).ok()
    }
}

/// Runs a scenario `runs` times (env STAYBOUND_LAB_RUNS, default 1) and prints each figure.
pub fn runs() -> usize {
    std::env::var("STAYBOUND_LAB_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Allowance over a computed bound for a loaded machine (env STAYBOUND_LAB_MARGIN_MS, default 400).
pub fn margin() -> Duration {
    Duration::from_millis(std::env::var("STAYBOUND_LAB_MARGIN_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(400))
}

/// Waits until at least `n` clients are blocked on `node`'s redis (sessions a move cut off may linger
/// there) and every byte sent to the logical host is acknowledged: nothing left in flight that a
/// retransmission would carry to another node.
pub fn wait_blocked(lab: &Lab, node: Host, n: usize) {
    wait_until(&format!("{n} client(s) blocked on {}", node.role()), Duration::from_secs(5), || {
        let out = lab.redis_cli_at(Host::Client, node.addr(), &["INFO", "clients"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let blocked =
            text.lines().find_map(|l| l.strip_prefix("blocked_clients:")).and_then(|v| v.trim().parse::<usize>().ok());
        blocked.is_some_and(|b| b >= n)
    });
    wait_until("every byte sent to the logical host is acknowledged", Duration::from_secs(5), || {
        let out = lab.exec(Host::Client, &["ss", "-Htn", "state", "established", "dst", &LOGICAL.to_string()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines().count() >= n && text.lines().all(|l| l.split_whitespace().nth(1) == Some("0"))
    });
}

/// A lab with redis on both nodes and the logical address on node 1, announced.
pub fn two_nodes(tag: &str) -> Option<Lab> {
    let lab = Lab::new(tag)?;
    lab.start_redis(Host::Node1);
    lab.start_redis(Host::Node2);
    lab.add_logical(Host::Node1, true);
    Some(lab)
}

/// Moves the logical address `n` times, announced, from node 1 to node 2 and back, each time under a new
/// client blocked on `dial` (staybound's listener, or the logical host itself for transparent mode): how
/// long after each move its blocked session ended, in the order of the moves. Each move's new epoch is up
/// before the next one; a line per move goes to stderr, `label` first.
pub fn announced_moves(lab: &Lab, sc: &Sidecar<'_>, dial: SocketAddr, n: usize, label: &str) -> Vec<Duration> {
    let mut times = Vec::new();
    let (mut from, mut to) = (Host::Node1, Host::Node2);
    for i in 0..n {
        let epoch = sc.epoch();
        let client = Blocked::start(lab, Host::Client, dial);
        wait_blocked(lab, from, 1);
        let t0 = Instant::now();
        lab.move_logical(from, to, true);
        let (t1, how) = client.ended(Duration::from_secs(10)).expect("the blocked session ended");
        let took = t1.duration_since(t0);
        eprintln!(
            "{label} {i}: {} -> {}: client dialling {dial} {how} after {:.1} ms",
            from.role(),
            to.role(),
            took.as_secs_f64() * 1000.0
        );
        times.push(took);
        wait_until("the new epoch is up", Duration::from_secs(5), || sc.epoch() > epoch && sc.state() == "up");
        std::mem::swap(&mut from, &mut to);
    }
    times
}

/// Asserts what the transparent labs hold announced moves to: a median within 200 ms, and every move
/// within 200 ms and half the margin.
pub fn assert_announced_within_200ms(mut times: Vec<Duration>) {
    times.sort();
    let limit = Duration::from_millis(200) + margin() / 2;
    assert!(times[times.len() / 2] <= Duration::from_millis(200), "median {:?}", times[times.len() / 2]);
    assert!(times.iter().all(|t| *t <= limit), "every move within {limit:?}: {times:?}");
}

/// Sends staybound (`pid`, in the lab) SIGUSR2 and returns the pid of the new process it starts, read from
/// its log (the new process writes to the same one).
pub fn upgrade(lab: &Lab, pid: u32) -> i32 {
    const SIGUSR2: i32 = 12;
    lab.signal(pid, SIGUSR2);
    let mut new_pid = None;
    wait_until("the old process started the new one", Duration::from_secs(10), || {
        let log = lab.read_log(pid);
        new_pid = log.lines().filter(|l| l.contains("SIGUSR2: upgrade: the new process is started")).find_map(|l| {
            l.split("\"new_pid\":").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<i32>().ok()
        });
        new_pid.is_some()
    });
    new_pid.unwrap_or_default()
}
