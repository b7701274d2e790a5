//! Network-namespace failover lab for integration tests.
//!
//! A [`Lab`] builds, inside the test itself, a tiny L2 network that models an
//! HA cluster with a relocatable ("logical host") address:
//!
//! ```text
//!   sb-PID-N-client  198.18.0.10/24  eth0 --+
//!   sb-PID-N-node1   198.18.0.1/24   eth0 --+-- br0 in sb-PID-N-sw
//!   sb-PID-N-node2   198.18.0.2/24   eth0 --+
//!   LOGICAL 198.18.0.100/24 is added to eth0 of whichever node owns it.
//! ```
//!
//! What a lab owns, and removes again on [`Drop`], by exact name only:
//! * four network namespaces named `sb-{pid}-{counter}-{role}` (role is
//!   `sw`, `client`, `node1`, `node2`); nothing at all is created in the root
//!   namespace (the bridge and every veth pair live in the lab namespaces);
//! * every process started through [`Lab::spawn`] (including redis), which is
//!   sent SIGTERM, then SIGKILL after a bounded wait; each child also gets
//!   `PR_SET_PDEATHSIG=SIGKILL`, so it dies with the test process even when
//!   `Drop` never runs (test killed, `panic = abort`);
//! * a per-lab temp directory ([`Lab::dir`]) with every child's stdout/stderr,
//!   redis data/pid/log files and `lab.log`, a time-stamped journal of every
//!   command the lab ran. It is removed on drop unless `STAYBOUND_KEEP_LAB`
//!   is set; if the test is panicking, the tail of every log is printed first.
//!
//! All addresses come from 198.18.0.0/15 (RFC 2544 benchmarking range) and
//! nothing outside loopback and the lab namespaces is ever a target.
//!
//! Kernel settings are pinned in every lab namespace rather than inherited
//! (IPv4 `conf/all` and `conf/default` are copied from the root namespace
//! when `net.core.devconf_inherit_init_net=0`, so a host with
//! `ip_forward=1` would otherwise yield forwarding nodes): `ip_forward=0`,
//! `arp_accept=0`, `arp_ignore=0`, `arp_announce=0`, `arp_notify=0`, and
//! IPv6 is disabled on `eth0` (the lab is IPv4 only; `::1` on `lo` stays).
//! Each node's MAC is fixed (see [`Host::mac_addr`]) so logs are readable.
//!
//! ARP facts the lab relies on (Linux, `arp_accept=0`): a gratuitous ARP
//! only *updates* an existing neighbour entry, it never creates one; a
//! gratuitous ARP *request* (sender IP == target IP) overrides the entry
//! even inside the 1 s `locktime` window, while an unsolicited ARP *reply*
//! (`arping -P`) does not count as gratuitous and is ignored inside it; the
//! updated entry is left `STALE` with the new MAC.
//!
//! If a test process dies before its `Drop` runs, the next [`Lab::new`] (in
//! any process) removes namespaces `sb-PID-*` and temp dirs
//! `staybound-lab-PID-*` whose PID is no longer alive.
//!
//! Tests reach into a namespace in-process with [`Lab::in_ns`] (a thread
//! that `setns`es into it), [`Lab::connect_tcp`] and [`Lab::listen_tcp`];
//! or run programs there with [`Lab::exec`] and [`Lab::spawn`].
//!
//! When not root, or `ip` is missing, or namespaces cannot be created,
//! [`Lab::new`] prints `SKIP (needs root + netns): ...` to stderr and returns
//! `None`, unless `STAYBOUND_REQUIRE_NETNS=1`, in which case it panics.
//!
//! Needs `ip` (iproute2); [`Lab::start_redis`] needs `redis-server` and
//! `redis-cli`; a gratuitous ARP needs `arping` (Debian package `arping`, by
//! Thomas Habets, or `iputils-arping`; `STAYBOUND_ARPING` overrides the path).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// The relocatable ("logical host") address clients talk to.
pub const LOGICAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// Prefix length of every address on the lab LAN.
pub const PREFIX_LEN: u8 = 24;
/// Port of the redis servers started by [`Lab::start_redis`].
pub const REDIS_PORT: u16 = 6379;
/// Default upper bound for one command run by [`Lab::exec`] / [`Lab::try_exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one `redis-cli` run ([`Lab::redis_cli`]); a cut-off peer
/// would otherwise block it for minutes of SYN retries.
pub const REDIS_CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of every namespace a lab creates.
pub const NS_PREFIX: &str = "sb-";

/// Set to `1` to turn a skipped lab into a panic (CI sets it).
pub const ENV_REQUIRE: &str = "STAYBOUND_REQUIRE_NETNS";
/// Set (to anything) to keep the lab directory after drop.
pub const ENV_KEEP: &str = "STAYBOUND_KEEP_LAB";
/// Optional path of the `arping` binary to use.
pub const ENV_ARPING: &str = "STAYBOUND_ARPING";

const NETNS_DIR: &str = "/run/netns";
const DIR_PREFIX: &str = "staybound-lab-";
/// Signal numbers for [`Lab::signal`].
pub const SIGTERM: i32 = libc::SIGTERM;
/// See [`SIGTERM`].
pub const SIGKILL: i32 = libc::SIGKILL;
/// Freezes a process (a hung server: the kernel still completes TCP
/// handshakes into its backlog, but nothing is answered). See [`SIGTERM`].
pub const SIGSTOP: i32 = libc::SIGSTOP;
/// Resumes a process stopped with [`SIGSTOP`].
pub const SIGCONT: i32 = libc::SIGCONT;
const KILL_GRACE: Duration = Duration::from_secs(5);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_POLLS: u32 = 100_000;

/// One machine of the lab (the switch namespace is internal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// Where the legacy client and staybound run (198.18.0.10).
    Client,
    /// First cluster node (198.18.0.1); owns [`LOGICAL`] when told to.
    Node1,
    /// Second cluster node (198.18.0.2).
    Node2,
}

impl Host {
    /// Every host, in a fixed order.
    pub const ALL: [Host; 3] = [Host::Client, Host::Node1, Host::Node2];

    /// Short role name used in namespace, interface and log file names.
    pub fn role(self) -> &'static str {
        match self {
            Host::Client => "client",
            Host::Node1 => "node1",
            Host::Node2 => "node2",
        }
    }

    /// Stationary address on `eth0`.
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Host::Client => Ipv4Addr::new(198, 18, 0, 10),
            Host::Node1 => Ipv4Addr::new(198, 18, 0, 1),
            Host::Node2 => Ipv4Addr::new(198, 18, 0, 2),
        }
    }

    /// The fixed, locally administered MAC the lab gives this host's `eth0`.
    pub fn mac_addr(self) -> &'static str {
        match self {
            Host::Client => "02:5b:00:00:00:10",
            Host::Node1 => "02:5b:00:00:00:01",
            Host::Node2 => "02:5b:00:00:00:02",
        }
    }

    fn idx(self) -> usize {
        match self {
            Host::Client => 0,
            Host::Node1 => 1,
            Host::Node2 => 2,
        }
    }

    /// Name of this host's bridge port (veth peer) inside the switch namespace.
    fn port(self) -> String {
        format!("p-{}", self.role())
    }
}

/// A parsed neighbour (ARP) entry, see [`Lab::neigh_entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neigh {
    /// Link-layer address, `None` for e.g. `INCOMPLETE`/`FAILED` entries.
    pub lladdr: Option<String>,
    /// NUD state as `ip` prints it: `REACHABLE`, `STALE`, `DELAY`, ...
    pub state: String,
}

/// Poll `f` until it returns true; panics mentioning `what` after `timeout`.
///
/// Bounded in time and in number of polls; the poll interval backs off from
/// 1 ms to 50 ms, so short waits stay short.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    if let Err(e) = poll_until(timeout, &mut f) {
        panic!("timed out after {timeout:?} ({e} polls) waiting until {what}");
    }
}

/// Like [`wait_until`] but returns `false` on timeout instead of panicking.
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    poll_until(timeout, &mut f).is_ok()
}

fn poll_until(timeout: Duration, f: &mut dyn FnMut() -> bool) -> Result<(), u32> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    for n in 0..MAX_POLLS {
        if f() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(n + 1);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Err(MAX_POLLS)
}

/// Names of all network namespaces currently listed by `ip netns list`.
/// Runs `f` on a fresh thread whose network namespace is the one named `ns`, and returns its result.
pub fn in_named_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new(NETNS_DIR).join(ns);
    let nsfd = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    thread::scope(|s| {
        let h = s.spawn(move || {
            // SAFETY: setns on a valid, open namespace fd; it affects only this new thread, which ends
            // when `f` returns.
            let rc = unsafe { libc::setns(nsfd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            drop(nsfd);
            f()
        });
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Opens a TCP connection from inside the namespace named `ns`.
pub fn connect_in_ns(ns: &str, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_named_ns(ns, || TcpStream::connect_timeout(&to, timeout))
}

pub fn list_netns() -> Vec<String> {
    let out = run(cmd("ip", &["netns", "list"]), EXEC_TIMEOUT);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

struct Tracked {
    pid: u32,
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Tracked {
    /// Reaps the child if it has exited; never signals a reaped pid.
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }
}

/// A spawn request for the lab's spawner thread.
struct SpawnReq {
    argv: Vec<String>,
    stdout: File,
    stderr: File,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// A running lab; see the module docs. Dropping it tears everything down.
///
/// `Lab` is `Sync`: share `&Lab` with scoped threads, e.g. to move the
/// logical address while a client keeps talking.
pub struct Lab {
    tag: String,
    prefix: String,
    switch: String,
    ns: [String; 3],
    dir: PathBuf,
    started: Instant,
    created: Mutex<Vec<String>>,
    children: Mutex<Vec<Tracked>>,
    redis: Mutex<HashMap<Host, u32>>,
    seq: AtomicU32,
    journal: Mutex<Option<File>>,
    spawner: Mutex<Option<mpsc::Sender<SpawnReq>>>,
    spawner_thread: Mutex<Option<thread::JoinHandle<()>>>,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static REAP_ONCE: Once = Once::new();

impl Lab {
    /// Builds a fresh lab; `tag` (e.g. the test name) goes into the temp dir
    /// name. Returns `None` (after a loud `SKIP` line on stderr) when the
    /// environment cannot host it, or panics instead if
    /// `STAYBOUND_REQUIRE_NETNS=1`. Panics if a setup step fails.
    pub fn new(tag: &str) -> Option<Lab> {
        if let Err(reason) = preflight() {
            return skip(&reason);
        }
        REAP_ONCE.call_once(reap_stale_labs);

        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{pid}-{n}");
        let clean_tag: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(40).collect();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{pid}-{n}-{clean_tag}"));
        if dir.exists() {
            // Left by an earlier process that had our pid; the name is ours.
            let _ = fs::remove_dir_all(&dir);
        }
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let journal = File::create(dir.join("lab.log")).ok();

        let (tx, rx) = mpsc::channel::<SpawnReq>();
        let spawner_thread = thread::Builder::new()
            .name(format!("{prefix}-spawner"))
            .spawn(move || spawner_loop(rx))
            .expect("spawn lab spawner thread");

        let lab = Lab {
            tag: tag.to_owned(),
            switch: format!("{prefix}-sw"),
            ns: Host::ALL.map(|h| format!("{prefix}-{}", h.role())),
            prefix,
            dir,
            started: Instant::now(),
            created: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            redis: Mutex::new(HashMap::new()),
            seq: AtomicU32::new(0),
            journal: Mutex::new(journal),
            spawner: Mutex::new(Some(tx)),
            spawner_thread: Mutex::new(Some(spawner_thread)),
        };
        // From here on, a panic drops `lab`, which removes what was created.
        if let Err(reason) = lab.add_netns(&lab.switch) {
            // The very first namespace: failing here is an environment issue
            // (e.g. no CAP_SYS_ADMIN in a container), not a lab bug.
            return skip(&reason);
        }
        lab.build();
        lab.note(&format!("lab {} ({}) ready in {:?}", lab.prefix, lab.tag, lab.started.elapsed()));
        Some(lab)
    }

    fn build(&self) {
        let sw = self.switch.clone();
        self.pin_sysctls(&sw);
        self.ip(&format!("-n {sw} link set lo up"));
        self.ip(&format!("-n {sw} link add br0 type bridge stp_state 0"));
        self.ip(&format!("-n {sw} link set br0 up"));
        for host in Host::ALL {
            let ns = self.ns_name(host).to_owned();
            if let Err(e) = self.add_netns(&ns) {
                panic!("{e}");
            }
            self.pin_sysctls(&ns);
            self.ip(&format!("-n {ns} link set lo up"));
            let port = host.port();
            self.ip(&format!("-n {sw} link add {port} type veth peer name eth0 netns {ns}"));
            self.ip(&format!("-n {sw} link set {port} master br0 up"));
            self.ip(&format!("-n {ns} link set eth0 address {}", host.mac_addr()));
            self.ip(&format!("-n {ns} addr add {}/{PREFIX_LEN} dev eth0", host.addr()));
            self.ip(&format!("-n {ns} link set eth0 up"));
        }
        for host in Host::ALL {
            let fwd = self.exec(host, &["sysctl", "-n", "net.ipv4.ip_forward"]);
            let fwd = String::from_utf8_lossy(&fwd.stdout);
            assert_eq!(fwd.trim(), "0", "{} must not forward", self.ns_name(host));
            self.wait_link_ready(host);
        }
    }

    /// Pins the kernel settings the lab's semantics depend on (see module docs).
    fn pin_sysctls(&self, ns: &str) {
        let mut c = cmd("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0"]);
        for scope in ["all", "default"] {
            for key in ["arp_accept", "arp_ignore", "arp_announce", "arp_notify"] {
                c.arg(format!("net.ipv4.conf.{scope}.{key}=0"));
            }
        }
        // Disable IPv6 on interfaces created from now on (eth0, ports); keep ::1.
        c.arg("net.ipv6.conf.default.disable_ipv6=1");
        self.checked(c, EXEC_TIMEOUT);
    }

    fn add_netns(&self, name: &str) -> Result<(), String> {
        if Path::new(NETNS_DIR).join(name).exists() {
            // Our pid+counter are unique among live processes, so this was
            // left by a dead process that had our pid: remove it by name.
            eprintln!("lab: removing stale namespace {name}");
            self.ip(&format!("netns del {name}"));
        }
        let out = self.run_logged(cmd("ip", &["netns", "add", name]), EXEC_TIMEOUT);
        if !out.status.success() {
            return Err(format!("`ip netns add {name}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        lock(&self.created).push(name.to_owned());
        Ok(())
    }

    /// The prefix shared by all of this lab's namespaces (`sb-{pid}-{n}`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The tag given to [`Lab::new`].
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Network namespace name of `host`, for `ip netns exec NAME ...`.
    pub fn ns_name(&self, host: Host) -> &str {
        &self.ns[host.idx()]
    }

    /// Name of the internal switch namespace holding `br0`.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// Per-lab temp directory holding logs (`*.stdout`, `*.stderr`,
    /// `lab.log`) and redis files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `args` inside `host` (`ip netns exec NS args...`), bounded by
    /// [`EXEC_TIMEOUT`]; panics with stdout/stderr unless it exits 0.
    /// Use for setup steps.
    pub fn exec(&self, host: Host, args: &[&str]) -> Output {
        self.checked(self.ns_cmd(host, args), EXEC_TIMEOUT)
    }

    /// Like [`Lab::exec`] but returns the output whatever the exit status.
    /// On timeout the command is SIGKILLed, its status shows signal 9 and
    /// stderr ends with a `[lab] timed out` line.
    pub fn try_exec(&self, host: Host, args: &[&str]) -> Output {
        self.try_exec_timeout(host, args, EXEC_TIMEOUT)
    }

    /// [`Lab::try_exec`] with an explicit time bound.
    pub fn try_exec_timeout(&self, host: Host, args: &[&str], timeout: Duration) -> Output {
        self.run_logged(self.ns_cmd(host, args), timeout)
    }

    fn ns_cmd(&self, host: Host, args: &[&str]) -> Command {
        assert!(!args.is_empty(), "empty command");
        let mut c = cmd("ip", &["netns", "exec", self.ns_name(host)]);
        c.args(args);
        c
    }

    /// Runs `ip` (use `-n NS` to target a namespace) with `line` split on
    /// whitespace (no argument the lab passes contains spaces).
    fn ip(&self, line: &str) -> Output {
        let args: Vec<&str> = line.split_whitespace().collect();
        self.checked(cmd("ip", &args), EXEC_TIMEOUT)
    }

    fn checked(&self, c: Command, timeout: Duration) -> Output {
        let shown = show(&c);
        let out = self.run_logged(c, timeout);
        if !out.status.success() {
            panic!(
                "lab {}: `{shown}` failed ({})\nstdout: {}\nstderr: {}",
                self.prefix,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        out
    }

    fn run_logged(&self, c: Command, timeout: Duration) -> Output {
        let shown = show(&c);
        let t = Instant::now();
        let out = run(c, timeout);
        self.note(&format!("{shown} -> {} in {:?}", out.status, t.elapsed()));
        out
    }

    /// Appends a time-stamped line to `lab.log` in [`Lab::dir`]; tests may
    /// use it to mark phases ("killing node1 now").
    pub fn note(&self, msg: &str) {
        if let Some(f) = lock(&self.journal).as_mut() {
            let _ = writeln!(f, "[+{:>9.3}s] {msg}", self.started.elapsed().as_secs_f64());
        }
    }

    /// Starts `args` inside `host` in the background and returns its pid
    /// (the pid of the program itself: `ip netns exec` execs it). stdout and
    /// stderr go to `NN-ROLE-PROGRAM.stdout|.stderr` in [`Lab::dir`]. The
    /// child is tracked and killed on drop. To set environment variables,
    /// start with `env`, e.g. `&["env", "RUST_LOG=debug", bin, ...]`.
    pub fn spawn(&self, host: Host, args: &[&str]) -> u32 {
        assert!(!args.is_empty(), "spawn: empty command");
        // Label logs by the program, skipping an `env K=V ...` prefix.
        let prog = args
            .iter()
            .find(|a| **a != "env" && !a.contains('='))
            .and_then(|a| Path::new(a).file_name())
            .and_then(|f| f.to_str())
            .unwrap_or("prog");
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{n:02}-{}-{prog}", host.role());
        let out_path = self.dir.join(format!("{name}.stdout"));
        let err_path = self.dir.join(format!("{name}.stderr"));
        let stdout = File::create(&out_path).unwrap_or_else(|e| panic!("{}: {e}", out_path.display()));
        let stderr = File::create(&err_path).unwrap_or_else(|e| panic!("{}: {e}", err_path.display()));
        let mut argv: Vec<String> =
            ["ip", "netns", "exec", self.ns_name(host)].iter().map(|s| (*s).to_owned()).collect();
        argv.extend(args.iter().map(|s| (*s).to_owned()));
        let (reply, rx) = mpsc::channel();
        let req = SpawnReq { argv: argv.clone(), stdout, stderr, reply };
        lock(&self.spawner).as_ref().expect("lab is shutting down").send(req).expect("lab spawner thread is gone");
        let child = rx
            .recv_timeout(EXEC_TIMEOUT)
            .expect("lab spawner thread did not answer")
            .unwrap_or_else(|e| panic!("spawn `{}`: {e}", argv.join(" ")));
        let pid = child.id();
        self.note(&format!("spawned pid {pid} [{name}]: {}", argv.join(" ")));
        lock(&self.children).push(Tracked { pid, name, child, status: None });
        pid
    }

    /// Whether tracked child `pid` is still running (reaps it if it exited).
    pub fn is_running(&self, pid: u32) -> bool {
        let mut children = lock(&self.children);
        let t = find(&mut children, pid);
        t.poll_exit().is_none()
    }

    /// Exit status of tracked child `pid` if it has exited.
    pub fn exit_status(&self, pid: u32) -> Option<ExitStatus> {
        let mut children = lock(&self.children);
        find(&mut children, pid).poll_exit()
    }

    /// Waits (bounded) for tracked child `pid` to exit on its own.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> ExitStatus {
        wait_until(&format!("pid {pid} exits"), timeout, || !self.is_running(pid));
        self.exit_status(pid).expect("exited")
    }

    /// Stops tracked child `pid`: SIGTERM, then SIGKILL if it has not
    /// exited within 5 s. Returns its exit status (already-exited children
    /// just report theirs). Panics if `pid` was not started by this lab.
    pub fn kill(&self, pid: u32) -> ExitStatus {
        self.signal(pid, SIGTERM);
        self.signal(pid, SIGCONT);
        if !poll(KILL_GRACE, || !self.is_running(pid)) {
            self.note(&format!("pid {pid} ignored SIGTERM for {KILL_GRACE:?}; SIGKILL"));
            self.signal(pid, SIGKILL);
        }
        self.wait_exit(pid, KILL_GRACE)
    }

    /// SIGKILLs tracked child `pid` at once (a crash) and reaps it.
    pub fn kill_hard(&self, pid: u32) -> ExitStatus {
        self.signal(pid, SIGKILL);
        self.wait_exit(pid, KILL_GRACE)
    }

    /// Sends `sig` to tracked child `pid` if it is still running (never to a
    /// reaped pid, so never to a recycled one).
    pub fn signal(&self, pid: u32, sig: i32) {
        let mut children = lock(&self.children);
        let t = find(&mut children, pid);
        if t.poll_exit().is_none() {
            self.note(&format!("signal {sig} -> pid {pid} [{}]", t.name));
            // SAFETY: kill(2) takes no pointers; `pid` is a child of ours that has not been reaped, so it
            // names that child and no recycled process.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// Paths of the stdout and stderr files of tracked child `pid`.
    pub fn log_paths(&self, pid: u32) -> (PathBuf, PathBuf) {
        let mut children = lock(&self.children);
        let name = find(&mut children, pid).name.clone();
        (self.dir.join(format!("{name}.stdout")), self.dir.join(format!("{name}.stderr")))
    }

    /// stdout followed by stderr of tracked child `pid`, as text.
    pub fn read_log(&self, pid: u32) -> String {
        let (o, e) = self.log_paths(pid);
        let o = fs::read_to_string(o).unwrap_or_default();
        let e = fs::read_to_string(e).unwrap_or_default();
        format!("{o}{e}")
    }

    /// Prints the tail (last `lines` lines) of every log in [`Lab::dir`] to
    /// stderr, e.g. before failing an assertion.
    pub fn dump_logs(&self, lines: usize) {
        eprintln!("==== lab {} ({}) logs in {} ====", self.prefix, self.tag, self.dir.display());
        let mut files = log_files(&self.dir);
        files.sort();
        for f in files {
            let text = fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            eprintln!("---- {} ({} lines) ----", f.display(), all.len());
            for l in &all[start..] {
                eprintln!("{l}");
            }
        }
    }

    /// Runs `f` on a fresh thread whose network namespace is `host`'s, and
    /// returns its result. Sockets created there stay in that namespace and
    /// can be used from any thread afterwards.
    pub fn in_ns<T: Send>(&self, host: Host, f: impl FnOnce() -> T + Send) -> T {
        in_named_ns(self.ns_name(host), f)
    }

    /// Opens a TCP connection from inside `host` (in this process).
    pub fn connect_tcp(&self, host: Host, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.in_ns(host, || TcpStream::connect_timeout(&to, timeout))
    }

    /// Binds a TCP listener inside `host` (in this process), e.g. a fake
    /// backend on a node bound to `0.0.0.0:PORT` or `LOGICAL:PORT`.
    pub fn listen_tcp(&self, host: Host, addr: SocketAddr) -> io::Result<TcpListener> {
        self.in_ns(host, || TcpListener::bind(addr))
    }

    /// Waits (bounded) until a TCP connect from `host` to `to` succeeds.
    pub fn wait_tcp(&self, host: Host, to: SocketAddr, timeout: Duration) {
        let what = format!("{to} accepts TCP from {}", host.role());
        wait_until(&what, timeout, || self.connect_tcp(host, to, Duration::from_millis(250)).is_ok());
    }

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

    /// Adds [`LOGICAL`]/24 to `host`'s eth0 (as a secondary address, so the
    /// node's own traffic keeps its stationary source address). With `garp`,
    /// then announces it with gratuitous ARP ([`Lab::gratuitous_arp`]).
    pub fn add_logical(&self, host: Host, garp: bool) {
        let cidr = format!("{LOGICAL}/{PREFIX_LEN}");
        self.ip(&format!("-n {} addr add {cidr} dev eth0", self.ns_name(host)));
        if garp {
            self.gratuitous_arp(host);
        }
    }

    /// Removes [`LOGICAL`] from `host`'s eth0.
    pub fn del_logical(&self, host: Host) {
        let cidr = format!("{LOGICAL}/{PREFIX_LEN}");
        self.ip(&format!("-n {} addr del {cidr} dev eth0", self.ns_name(host)));
    }

    /// Whether `host` currently has [`LOGICAL`] configured.
    pub fn has_logical(&self, host: Host) -> bool {
        let out = self.ip(&format!("-n {} -4 -o addr show dev eth0", self.ns_name(host)));
        let needle = format!(" {LOGICAL}/");
        String::from_utf8_lossy(&out.stdout).contains(&needle)
    }

    /// Moves [`LOGICAL`] from one node to another (delete, then add), like a
    /// package switchover; with `garp` the new owner announces it.
    pub fn move_logical(&self, from: Host, to: Host, garp: bool) {
        self.note(&format!("move logical {} -> {} (garp {garp})", from.role(), to.role()));
        self.del_logical(from);
        self.add_logical(to, garp);
    }

    /// Sends gratuitous ARP requests for [`LOGICAL`] from `host`'s eth0
    /// (sender IP = target IP = LOGICAL, broadcast), which makes every
    /// *existing* neighbour entry for LOGICAL on the LAN point at `host`'s
    /// MAC at once. With Habets' arping: `-U -S LOGICAL -i eth0 -c 3 -W 0.05
    /// LOGICAL` (~0.15 s); with iputils: `-U -s LOGICAL -I eth0 -c 1 LOGICAL`
    /// (~1 s). `-S`/`-s` matter: without it Habets' arping uses the primary
    /// (stationary) address as sender, which is not a gratuitous ARP.
    pub fn gratuitous_arp(&self, host: Host) {
        let (bin, flavour) = arping();
        let ip = LOGICAL.to_string();
        let (args, sent_marker): (Vec<&str>, &str) = match flavour {
            Arping::Habets => {
                (vec![bin, "-U", "-S", &ip, "-i", "eth0", "-c", "3", "-W", "0.05", &ip], "3 packets transmitted")
            }
            Arping::Iputils => (vec![bin, "-U", "-s", &ip, "-I", "eth0", "-c", "1", &ip], "Sent 1 probes"),
        };
        // Both exit non-zero when nobody answers, which is normal for
        // unsolicited ARP: judge by what they say they sent instead.
        let out = self.try_exec(host, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !stdout.contains(sent_marker) {
            panic!(
                "gratuitous ARP from {} failed ({}):\nstdout: {stdout}\nstderr: {}",
                host.role(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Sends, from `host`'s eth0, a gratuitous ARP for [`LOGICAL`] that names `mac` as its link-layer
    /// address: a forged or stray announcement when no host has that MAC (the switch learns it on
    /// `host`'s port, whose eth0 drops frames to it). Needs Habets' arping (`-s MAC`).
    pub fn announce_as(&self, host: Host, mac: &str) {
        let (bin, flavour) = arping();
        assert!(matches!(flavour, Arping::Habets), "a forged announcement needs Habets' arping (Debian `arping`)");
        let ip = LOGICAL.to_string();
        let out = self.try_exec(host, &[bin, "-U", "-S", &ip, "-s", mac, "-i", "eth0", "-c", "1", "-W", "0.05", &ip]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("1 packets transmitted"),
            "forged announcement from {} failed ({}):\nstdout: {stdout}\nstderr: {}",
            host.role(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cuts `host` off the LAN by setting its bridge port (the switch-side
    /// veth peer) down: like a pulled cable or dead switch port. The node
    /// keeps its addresses, routes and processes; its eth0 shows NO-CARRIER
    /// and everything it or others send across the link is silently lost
    /// (peers see timeouts, not resets).
    pub fn link_down(&self, host: Host) {
        self.ip(&format!("-n {} link set {} down", self.switch, host.port()));
        let ns = self.ns_name(host).to_owned();
        wait_until(&format!("{ns} eth0 loses carrier"), STARTUP_TIMEOUT, || {
            !self.link_text(&ns, "eth0", false).contains(",LOWER_UP")
        });
    }

    /// Reconnects `host` (undoes [`Lab::link_down`]) and waits until its
    /// eth0 has carrier and its bridge port is forwarding.
    pub fn link_up(&self, host: Host) {
        self.ip(&format!("-n {} link set {} up", self.switch, host.port()));
        self.wait_link_ready(host);
    }

    fn wait_link_ready(&self, host: Host) {
        let ns = self.ns_name(host).to_owned();
        let port = host.port();
        wait_until(&format!("{ns} eth0 up and its bridge port forwarding"), STARTUP_TIMEOUT, || {
            self.link_text(&ns, "eth0", false).contains(",LOWER_UP")
                && self.link_text(&self.switch, &port, true).contains("bridge_slave state forwarding")
        });
    }

    /// `ip -o [-d] link show dev DEV` in `ns`, as text.
    fn link_text(&self, ns: &str, dev: &str, details: bool) -> String {
        let d = if details { "-d" } else { "" };
        let out = self.ip(&format!("-n {ns} -o {d} link show dev {dev}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// MAC address of `host`'s eth0 as the kernel reports it (lowercase).
    pub fn mac(&self, host: Host) -> String {
        let out = self.ip(&format!("-n {} -o link show dev eth0", self.ns_name(host)));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words
            .find(|w| *w == "link/ether")
            .and_then(|_| words.next())
            .unwrap_or_else(|| panic!("no MAC in: {text}"))
            .to_owned()
    }

    /// Link-layer address `viewer` currently has for `ip` in its neighbour
    /// table, or `None` if there is no entry or it has no lladdr.
    pub fn neigh(&self, viewer: Host, ip: Ipv4Addr) -> Option<String> {
        self.neigh_entry(viewer, ip).and_then(|n| n.lladdr)
    }

    /// Full neighbour entry (lladdr and NUD state) `viewer` has for `ip`.
    pub fn neigh_entry(&self, viewer: Host, ip: Ipv4Addr) -> Option<Neigh> {
        let ip_s = ip.to_string();
        let out = self.ip(&format!("-n {} -4 neigh show {ip_s} dev eth0", self.ns_name(viewer)));
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(ip_s.as_str()))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let lladdr = words.iter().position(|w| *w == "lladdr").and_then(|i| words.get(i + 1)).map(|s| (*s).to_owned());
        let state = words.last().copied().unwrap_or_default().to_owned();
        Some(Neigh { lladdr, state })
    }

    /// Flushes `viewer`'s neighbour table on eth0.
    pub fn flush_neigh(&self, viewer: Host) {
        self.ip(&format!("-n {} neigh flush dev eth0", self.ns_name(viewer)));
    }

    fn teardown(&mut self) {
        let t = Instant::now();
        // 1. Children: SIGTERM all, bounded wait, SIGKILL stragglers.
        let pids: Vec<u32> = lock(&self.children).iter().map(|c| c.pid).collect();
        for &pid in &pids {
            self.signal(pid, SIGTERM);
            // A frozen (SIGSTOPped) child must run to act on SIGTERM.
            self.signal(pid, SIGCONT);
        }
        let all_exited = |lab: &Lab| lab.children_alive().is_empty();
        if !poll(KILL_GRACE, || all_exited(self)) {
            for pid in self.children_alive() {
                eprintln!("lab {}: pid {pid} ignored SIGTERM; SIGKILL", self.prefix);
                self.signal(pid, SIGKILL);
            }
            if !poll(KILL_GRACE, || all_exited(self)) {
                eprintln!("lab {}: pids {:?} would not die", self.prefix, self.children_alive());
            }
        }
        // 2. The spawner thread (no more children can be started).
        drop(lock(&self.spawner).take());
        if let Some(h) = lock(&self.spawner_thread).take() {
            let _ = h.join();
        }
        // 3. Namespaces, by exact name, only those this lab created.
        let created = std::mem::take(&mut *lock(&self.created));
        for name in created.iter().rev() {
            let out = run(cmd("ip", &["netns", "del", name]), EXEC_TIMEOUT);
            if !out.status.success() {
                eprintln!(
                    "lab {}: `ip netns del {name}` failed: {}",
                    self.prefix,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        self.note(&format!("teardown took {:?}", t.elapsed()));
    }

    fn children_alive(&self) -> Vec<u32> {
        lock(&self.children).iter_mut().filter_map(|c| c.poll_exit().is_none().then_some(c.pid)).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        self.teardown();
        if panicking {
            self.dump_logs(40);
        }
        if std::env::var_os(ENV_KEEP).is_some() {
            eprintln!("lab {}: kept {} ({ENV_KEEP} is set)", self.prefix, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawner_loop(rx: mpsc::Receiver<SpawnReq>) {
    // Children are forked from this long-lived thread because
    // PR_SET_PDEATHSIG fires when the *thread* that forked them exits.
    while let Ok(req) = rx.recv() {
        let mut c = Command::new(&req.argv[0]);
        c.args(&req.argv[1..]).stdin(Stdio::null()).stdout(req.stdout).stderr(req.stderr);
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let _ = req.reply.send(c.spawn());
    }
}

fn find(children: &mut [Tracked], pid: u32) -> &mut Tracked {
    children.iter_mut().find(|c| c.pid == pid).unwrap_or_else(|| panic!("pid {pid} was not started by this lab"))
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(log_files(&p).into_iter().filter(|f| f.extension().is_some_and(|x| x == "log")));
        } else if p.extension().is_some_and(|x| x == "log" || x == "stdout" || x == "stderr") {
            out.push(p);
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cmd(prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

fn show(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(' ') {
            let _ = write!(s, " '{a}'");
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// Runs `c` to completion with stdin closed, capturing output, killing it
/// (SIGKILL) if it outlives `timeout`.
fn run(mut c: Command, timeout: Duration) -> Output {
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let shown = show(&c);
    let mut child = match c.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Output {
                status: ExitStatus::from_raw(127 << 8),
                stdout: Vec::new(),
                stderr: format!("[lab] cannot run `{shown}`: {e}").into_bytes(),
            };
        }
    };
    // Readers report EOF on a channel: the pipes close when the command
    // exits, so completion is awaited as an event, not polled.
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let pipes: [(bool, Box<dyn Read + Send>); 2] =
        [(true, Box::new(child.stdout.take().expect("piped"))), (false, Box::new(child.stderr.take().expect("piped")))];
    for (is_out, mut pipe) in pipes {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut b = Vec::new();
            let _ = pipe.read_to_end(&mut b);
            let _ = tx.send((is_out, b));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut eofs = 0;
    while eofs < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => stdout = b,
            Ok((false, b)) => stderr = b,
            Err(_) => break,
        }
        eofs += 1;
    }
    // Pipes are closed, so the process is exiting (or it closed them
    // itself): wait for it within what is left of the deadline.
    let mut status = None;
    let finished = poll(deadline.saturating_duration_since(Instant::now()), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !finished {
        let _ = child.kill();
        status = child.wait().ok();
        // Collect what the readers got, now that the pipes are closing.
        while let Ok((is_out, b)) = rx.recv_timeout(Duration::from_secs(1)) {
            if is_out { stdout = b } else { stderr = b }
        }
        stderr.extend_from_slice(format!("\n[lab] timed out after {timeout:?}: `{shown}`\n").as_bytes());
    }
    Output { status: status.unwrap_or_else(|| ExitStatus::from_raw(SIGKILL)), stdout, stderr }
}

fn find_in_path(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Path::new(prog).is_file().then(|| PathBuf::from(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).map(|d| d.join(prog)).find(|p| p.is_file())
}

fn require_tool(prog: &str, package: &str) {
    if find_in_path(prog).is_none() {
        panic!("`{prog}` not found: install Debian package `{package}`");
    }
}

fn preflight() -> Result<(), String> {
    // SAFETY: geteuid(2) takes no arguments and always succeeds.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".to_owned());
    }
    if find_in_path("ip").is_none() {
        return Err("`ip` (iproute2) not found".to_owned());
    }
    Ok(())
}

fn skip<T>(reason: &str) -> Option<T> {
    if std::env::var(ENV_REQUIRE).is_ok_and(|v| v == "1") {
        panic!("{ENV_REQUIRE}=1 but the netns lab cannot run: {reason}");
    }
    // Written to the stderr handle directly, not with eprintln!, so that
    // libtest's output capture does not swallow it (nextest still captures
    // at the process level; CI sets STAYBOUND_REQUIRE_NETNS=1 instead).
    let bar = "*".repeat(72);
    let _ = writeln!(
        io::stderr(),
        "\n{bar}\nSKIP (needs root + netns): {reason}\n    (set {ENV_REQUIRE}=1 to make this a failure)\n{bar}"
    );
    None
}

/// Removes namespaces `sb-PID-N-ROLE` (and temp dirs `staybound-lab-PID-*`)
/// whose PID is no longer alive: leftovers
/// of a test process that was killed before its `Drop` ran (its children
/// were already SIGKILLed by PDEATHSIG). Live processes' labs are never
/// touched; only exact names in the lab's own format are considered.
fn reap_stale_labs() {
    for name in list_netns() {
        let Some(pid) = stale_owner(&name) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("lab: removing namespace {name} left by dead pid {pid}");
        let _ = run(cmd("ip", &["netns", "del", &name]), EXEC_TIMEOUT);
    }
    // Their temp dirs, `staybound-lab-PID-N-TAG`, likewise.
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(DIR_PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() && e.path().is_dir() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Owner pid of a namespace name in the lab's exact format, else `None`.
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let n = parts.next()?;
    let role = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let known = ["sw", "client", "node1", "node2"].contains(&role);
    (digits(pid) && digits(n) && known).then(|| pid.parse().ok()).flatten()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arping {
    Habets,
    Iputils,
}

/// Path and flavour of the `arping` to use (detected once per process).
fn arping() -> (&'static str, Arping) {
    static FOUND: OnceLock<(String, Arping)> = OnceLock::new();
    let (bin, flavour) = FOUND.get_or_init(|| {
        let bin = std::env::var(ENV_ARPING).unwrap_or_else(|_| "arping".to_owned());
        let path = find_in_path(&bin)
            .unwrap_or_else(|| panic!("`{bin}` not found: install Debian package `arping` (or iputils-arping)"));
        let path = path.to_string_lossy().into_owned();
        let out = run(cmd(&path, &["--help"]), EXEC_TIMEOUT);
        let v = run(cmd(&path, &["-V"]), EXEC_TIMEOUT);
        let text = format!(
            "{}{}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        let flavour = if text.contains("Habets") {
            Arping::Habets
        } else if text.contains("iputils") {
            Arping::Iputils
        } else {
            panic!("unknown arping at {path}:\n{text}");
        };
        (path, flavour)
    });
    (bin.as_str(), *flavour)
}
