//! redis servers on the lab's hosts (`redis-server` on 0.0.0.0:6379, its data, pid and log files in the
//! lab's directory), and `redis-cli` run from a host and bounded in time, which also tells which node
//! answers at an address. Needs Debian's `redis-server` and `redis-tools`.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{ExitStatus, Output};
use std::time::Duration;

use super::command::require_tool;
use super::{Host, LOGICAL, Lab, STARTUP_TIMEOUT, lock};
use crate::support::wait::poll;

/// Port of the redis servers started by [`Lab::start_redis`].
pub const REDIS_PORT: u16 = 6379;
/// Upper bound for one `redis-cli` run ([`Lab::redis_cli`]); a cut-off peer
/// would otherwise block it for minutes of SYN retries.
pub const REDIS_CLI_TIMEOUT: Duration = Duration::from_secs(10);

impl Lab {
    /// Starts `redis-server` on `host`, bound to 0.0.0.0:6379, with data,
    /// pid and log files under `dir()/redis-ROLE/`, and waits (bounded)
    /// until it accepts on the host's stationary address. Returns its pid.
    pub fn start_redis(&self, host: Host) -> u32 {
        self.start_redis_with(host, &[])
    }

    /// [`Lab::start_redis`] with more `redis-server` arguments (such as `--requirepass`).
    pub fn start_redis_with(&self, host: Host, extra: &[&str]) -> u32 {
        require_tool("redis-server", "redis-server");
        assert!(!lock(&self.redis).contains_key(&host), "redis already running on {}", host.role());
        let rdir = self.dir.join(format!("redis-{}", host.role()));
        fs::create_dir_all(&rdir).unwrap_or_else(|e| panic!("{}: {e}", rdir.display()));
        let rdir_s = rdir.to_str().expect("utf-8 temp dir").to_owned();
        let pidfile = format!("{rdir_s}/redis.pid");
        let logfile = format!("{rdir_s}/redis.log");
        let fixed = format!(
            "redis-server --port {REDIS_PORT} --bind 0.0.0.0 --appendonly no --protected-mode no --daemonize no"
        );
        let mut args: Vec<&str> = fixed.split_whitespace().collect();
        args.extend(["--save", "", "--dir", &rdir_s, "--pidfile", &pidfile, "--logfile", &logfile]);
        args.extend_from_slice(extra);
        let pid = self.spawn(host, &args);
        lock(&self.redis).insert(host, pid);
        let to = SocketAddr::V4(SocketAddrV4::new(host.addr(), REDIS_PORT));
        let ready = poll(STARTUP_TIMEOUT, || {
            !self.is_running(pid) || self.connect_tcp(host, to, Duration::from_millis(250)).is_ok()
        });
        if !ready || !self.is_running(pid) {
            let log = fs::read_to_string(&logfile).unwrap_or_default();
            panic!(
                "redis on {} did not come up on {to} (running: {}):\n{}{log}",
                host.role(),
                self.is_running(pid),
                self.read_log(pid)
            );
        }
        self.note(&format!("redis on {} ready (pid {pid})", host.role()));
        pid
    }

    /// Stops the redis started on `host` (SIGTERM, bounded wait, SIGKILL).
    pub fn stop_redis(&self, host: Host) -> ExitStatus {
        let pid = lock(&self.redis).remove(&host).unwrap_or_else(|| panic!("no redis running on {}", host.role()));
        self.kill(pid)
    }

    /// Pid of the redis started on `host`, if any.
    pub fn redis_pid(&self, host: Host) -> Option<u32> {
        lock(&self.redis).get(&host).copied()
    }

    /// `redis-cli -h 198.18.0.100 -p 6379 ARGS...` run inside `from`,
    /// bounded by [`REDIS_CLI_TIMEOUT`]. Never panics on failure: check
    /// `status`/`stdout` (note redis-cli exits 0 on `(error)` replies).
    pub fn redis_cli(&self, from: Host, args: &[&str]) -> Output {
        self.redis_cli_at(from, LOGICAL, args)
    }

    /// [`Lab::redis_cli`] against any address, e.g. a node's stationary one.
    pub fn redis_cli_at(&self, from: Host, ip: Ipv4Addr, args: &[&str]) -> Output {
        require_tool("redis-cli", "redis-tools");
        let ip = ip.to_string();
        let port = REDIS_PORT.to_string();
        let mut argv = vec!["redis-cli", "-h", &ip, "-p", &port];
        argv.extend_from_slice(args);
        self.try_exec_timeout(from, &argv, REDIS_CLI_TIMEOUT)
    }

    /// `run_id` (from `INFO server`) of the redis that answers at `ip` when
    /// asked from `from`, or `None` if none answers: tells which node served.
    pub fn redis_run_id(&self, from: Host, ip: Ipv4Addr) -> Option<String> {
        let out = self.redis_cli_at(from, ip, &["INFO", "server"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find_map(|l| l.strip_prefix("run_id:")).map(|id| id.trim().to_owned())
    }
}
