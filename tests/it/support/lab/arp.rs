//! The logical address and the neighbour (ARP) tables: which node has [`LOGICAL`], moving it between
//! nodes, announcing it with a gratuitous ARP (or a forged one), a host's MAC, and what a host's
//! neighbour entry for an address says.
//!
//! ARP facts the lab relies on (Linux, `arp_accept=0`): a gratuitous ARP
//! only *updates* an existing neighbour entry, it never creates one; a
//! gratuitous ARP *request* (sender IP == target IP) overrides the entry
//! even inside the 1 s `locktime` window, while an unsolicited ARP *reply*
//! (`arping -P`) does not count as gratuitous and is ignored inside it; the
//! updated entry is left `STALE` with the new MAC.
//!
//! A gratuitous ARP needs `arping` (Debian package `arping`, by Thomas Habets, or `iputils-arping`;
//! `STAYBOUND_ARPING` overrides the path).

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use super::command::{cmd, find_in_path, run};
use super::{EXEC_TIMEOUT, Host, LOGICAL, Lab, PREFIX_LEN};

/// Optional path of the `arping` binary to use.
pub const ENV_ARPING: &str = "STAYBOUND_ARPING";

/// A parsed neighbour (ARP) entry, see [`Lab::neigh_entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neigh {
    /// Link-layer address, `None` for e.g. `INCOMPLETE`/`FAILED` entries.
    pub lladdr: Option<String>,
    /// NUD state as `ip` prints it: `REACHABLE`, `STALE`, `DELAY`, ...
    pub state: String,
}

impl Lab {
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
