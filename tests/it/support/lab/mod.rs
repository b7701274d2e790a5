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
//! This module owns a lab's life: the hosts and their names, building the lab and tearing it down. The
//! rest is split by what it touches:
//! * `netns`: the namespaces, the bridge and its veth ports, the kernel settings pinned in each, a host's
//!   link cut and restored, reaching into a namespace from this process, and the leftovers of dead test
//!   processes;
//! * `command`: commands run to completion in a host, bounded in time;
//! * `children`: processes started in the background in a host, signalled and reaped;
//! * `redis`: redis servers on the hosts, and `redis-cli` against them;
//! * `arp`: the logical address on the nodes, its gratuitous ARP, and the hosts' neighbour tables;
//! * `logs`: the journal (`lab.log`), the children's output, and the tails printed when a test fails.

mod arp;
mod children;
mod command;
mod logs;
mod netns;
mod redis;

pub use children::{SIGCONT, SIGKILL, SIGSTOP, SIGTERM};
pub use command::EXEC_TIMEOUT;
pub use netns::{connect_in_ns, in_named_ns, list_netns};
pub use redis::REDIS_PORT;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::wait::poll;
use children::{KILL_GRACE, SpawnReq, Tracked, spawner_loop};
use command::{cmd, find_in_path, run};
use netns::reap_stale_labs;

/// The relocatable ("logical host") address clients talk to.
pub const LOGICAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// Prefix length of every address on the lab LAN.
pub const PREFIX_LEN: u8 = 24;
/// Prefix of every namespace a lab creates.
pub const NS_PREFIX: &str = "sb-";

/// Set to `1` to turn a skipped lab into a panic (CI sets it).
pub const ENV_REQUIRE: &str = "STAYBOUND_REQUIRE_NETNS";
/// Set (to anything) to keep the lab directory after drop.
pub const ENV_KEEP: &str = "STAYBOUND_KEEP_LAB";

const DIR_PREFIX: &str = "staybound-lab-";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

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

    /// The prefix shared by all of this lab's namespaces (`sb-{pid}-{n}`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Network namespace name of `host`, for `ip netns exec NAME ...`.
    pub fn ns_name(&self, host: Host) -> &str {
        &self.ns[host.idx()]
    }

    /// Per-lab temp directory holding logs (`*.stdout`, `*.stderr`,
    /// `lab.log`) and redis files.
    pub fn dir(&self) -> &Path {
        &self.dir
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
