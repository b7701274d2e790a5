//! The lab's network: a namespace per host and one for the switch, the bridge `br0` in the switch
//! namespace with a veth port per host, a host's link cut and restored; reaching into a namespace from
//! this process (a fresh thread that `setns`es into it, so sockets made there stay there); and removing the
//! namespaces and temp directories of test processes that died before their lab's `Drop` ran.
//!
//! Kernel settings are pinned in every lab namespace rather than inherited
//! (IPv4 `conf/all` and `conf/default` are copied from the root namespace
//! when `net.core.devconf_inherit_init_net=0`, so a host with
//! `ip_forward=1` would otherwise yield forwarding nodes): `ip_forward=0`,
//! `arp_accept=0`, `arp_ignore=0`, `arp_announce=0`, `arp_notify=0`, and
//! IPv6 is disabled on `eth0` (the lab is IPv4 only; `::1` on `lo` stays).
//! Each node's MAC is fixed (see [`Host::mac_addr`]) so logs are readable.
//!
//! Needs `ip` (iproute2).

use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::thread;
use std::time::Duration;

use super::command::{cmd, run};
use super::{DIR_PREFIX, EXEC_TIMEOUT, Host, Lab, NS_PREFIX, PREFIX_LEN, STARTUP_TIMEOUT, lock};
use crate::support::wait::wait_until;

const NETNS_DIR: &str = "/run/netns";

impl Lab {
    pub(super) fn build(&self) {
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

    pub(super) fn add_netns(&self, name: &str) -> Result<(), String> {
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
}

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

/// Names of all network namespaces currently listed by `ip netns list`.
pub fn list_netns() -> Vec<String> {
    let out = run(cmd("ip", &["netns", "list"]), EXEC_TIMEOUT);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Removes namespaces `sb-PID-N-ROLE` (and temp dirs `staybound-lab-PID-*`)
/// whose PID is no longer alive: leftovers
/// of a test process that was killed before its `Drop` ran (its children
/// were already SIGKILLed by PDEATHSIG). Live processes' labs are never
/// touched; only exact names in the lab's own format are considered.
pub(super) fn reap_stale_labs() {
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
