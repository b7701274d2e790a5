//! End-to-end test of the neighbour-table watch in network namespaces (needs root and `ip netns`).
//!
//! Topology, all inside namespaces named `sbn-{pid}-*` (nothing is created in the root namespace):
//! a bridge `br0` in `sw`, with veths created from inside `sw` to `cli` (the client, which runs the
//! watcher), `n1` and `n2` (two cluster nodes). The logical host 198.18.0.100 (and 2001:2::100,
//! the IPv6 benchmarking range of RFC 5180) moves between `n1` and `n2`, announced by a gratuitous
//! ARP (`arping -U -S`) or an unsolicited NA (kernel, `ndisc_notify=1`).
//!
//! The watcher runs in this same test binary, re-executed under `ip netns exec sbn-{pid}-cli` with
//! `SBN_NEIGH_WATCH` set: it prints `CHANGE ...` lines on stdout and takes commands on stdin.
//!
//! Without root or `ip netns` the test prints `SKIP (needs root + netns): ...` and passes, unless
//! `STAYBOUND_REQUIRE_NETNS=1`, in which case it fails.
#![cfg(feature = "netlink")]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use staybound::failover::neighbor::{NeighborWatch, is_directly_connected};

const CHILD_ENV: &str = "SBN_NEIGH_WATCH";
const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:2::100";
const NODES: [&str; 2] = ["n1", "n2"];
const MOVES: usize = 10;

fn mac_of(host: &str) -> &'static str {
    match host {
        "cli" => "02:5b:00:00:00:01",
        "n1" => "02:5b:00:00:00:02",
        "n2" => "02:5b:00:00:00:03",
        _ => unreachable!(),
    }
}

fn fmt_mac(a: &[u8]) -> String {
    a.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// CLOCK_MONOTONIC in seconds: comparable across processes (and with arping's send timestamps).
fn monotonic() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9
}

/// Prints past libtest's output capture, so it shows even when the test passes.
fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "\n{msg}");
}

// ---------------------------------------------------------------------------------------------
// The watcher side: runs inside the client namespace.

#[test]
#[ignore = "helper: run inside the client namespace by `neighbor_watch_end_to_end`"]
fn neighbor_watch_child() {
    let Ok(ips) = std::env::var(CHILD_ENV) else { return };
    println!(); // end libtest's "test neighbor_watch_child ... " line
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let ips: Vec<IpAddr> = ips.split(',').map(|s| s.parse().expect("ip")).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let watch = match NeighborWatch::start(ips.clone()).await {
            Ok(w) => w,
            Err(e) => {
                println!("START-ERROR {e}");
                return;
            }
        };
        for ip in &ips {
            println!("SEED {ip} {}", watch.known(*ip).map(fmt_mac).unwrap_or_else(|| "-".into()));
        }
        let (tx, mut changes) = tokio::sync::mpsc::channel(16);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(watch.run(tx, async {
            let _ = stopped.await;
        }));
        let (cmd_tx, mut cmds) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if cmd_tx.send(line).is_err() {
                    break;
                }
            }
        });
        println!("READY");
        loop {
            tokio::select! {
                c = changes.recv() => match c {
                    Some(c) => {
                        println!("CHANGE {} {} {} mono={:.9}", c.ip, fmt_mac(&c.old), fmt_mac(&c.new), monotonic());
                    }
                    None => break,
                },
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { break };
                    let (verb, arg) = cmd.split_once(' ').unwrap_or((&cmd, ""));
                    let ip: IpAddr = arg.parse().expect("command ip");
                    match verb {
                        // Traffic to the address creates / refreshes its neighbour entry.
                        "touch" => {
                            let sock = UdpSocket::bind(if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
                                .expect("bind");
                            sock.send_to(b"staybound", (ip, 9)).expect("send");
                            println!("OK");
                        }
                        "direct" => println!("DIRECT {ip} {:?}", is_directly_connected(ip).await),
                        _ => panic!("unknown command {cmd}"),
                    }
                }
            }
        }
        drop(stop);
        println!("END {:?}", task.await.expect("join"));
    });
}

// ---------------------------------------------------------------------------------------------
// The lab: namespaces, links and the watcher process. Everything is removed on drop.

struct Lab {
    prefix: String,
    created: Vec<String>,
}

impl Lab {
    /// Creates the four namespaces, or says why it can't.
    fn new() -> Result<Self, String> {
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).map_err(|e| e.to_string())?;
        if uid != 0 {
            return Err(format!("running as uid {uid}, not root"));
        }
        for tool in ["ip", "arping"] {
            let found = Command::new(tool).arg("-V").output().or_else(|_| Command::new(tool).arg("--help").output());
            if found.is_err() {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        let mut lab = Lab { prefix: format!("sbn-{}", std::process::id()), created: Vec::new() };
        for n in ["sw", "cli", "n1", "n2"] {
            let name = lab.ns(n);
            let out = Command::new("ip").args(["netns", "add", &name]).output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("`ip netns add {name}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            lab.created.push(name);
        }
        Ok(lab)
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// `ip -n <ns> args...`, which must succeed.
    fn ip(&self, n: &str, args: &str) {
        let ns = self.ns(n);
        let mut full = vec!["-n", &ns];
        full.extend(args.split_whitespace());
        run("ip", &full);
    }

    /// `ip netns exec <ns> cmd...`, returning stdout; must succeed.
    fn exec(&self, n: &str, cmd: &str) -> String {
        let ns = self.ns(n);
        let mut full = vec!["netns", "exec", &ns];
        full.extend(cmd.split_whitespace());
        run("ip", &full)
    }

    fn build(&self) {
        self.ip("sw", "link add br0 type bridge mcast_snooping 0");
        self.ip("sw", "link set br0 up");
        for h in ["cli", "n1", "n2"] {
            self.ip(h, "link set lo up");
            // The veth is created from inside the switch namespace; its peer goes straight to `h`.
            self.ip("sw", &format!("link add p-{h} type veth peer name eth0 netns {}", self.ns(h)));
            self.ip("sw", &format!("link set p-{h} master br0 up"));
            self.ip(h, &format!("link set eth0 address {}", mac_of(h)));
            self.ip(h, "link set eth0 up");
        }
        for (h, last) in [("cli", 1), ("n1", 11), ("n2", 12)] {
            self.ip(h, &format!("addr add 198.18.0.{last}/24 dev eth0"));
            self.ip(h, &format!("addr add 2001:2::{last}/64 dev eth0 nodad"));
        }
        // Client: fail an unanswered entry fast (DELAY 1 s, one 100 ms unicast probe).
        self.exec(
            "cli",
            "sysctl -q -w net.ipv4.neigh.eth0.delay_first_probe_time=1 net.ipv4.neigh.eth0.ucast_solicit=1 \
             net.ipv4.neigh.eth0.retrans_time_ms=100",
        );
        // Nodes: announce a new IPv6 address with an unsolicited NA once DAD (50 ms) completes.
        for n in NODES {
            self.exec(n, "sysctl -q -w net.ipv6.conf.eth0.ndisc_notify=1 net.ipv6.neigh.eth0.retrans_time_ms=50");
        }
    }

    fn spawn_watcher(&self, ips: &[&str]) -> Watcher {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("cli")])
            .arg(exe)
            .args(["--ignored", "--exact", &child_test_name(), "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, ips.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn watcher");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log").push(line);
            }
        });
        let stdin = child.stdin.take();
        Watcher { child, stdin, lines, log }
    }

    /// Sends one gratuitous ARP request (sender IP = target IP, broadcast) for `ip` from node `n`,
    /// returning arping's own CLOCK_MONOTONIC timestamp of the send.
    ///
    /// Habets arping 2.x: `-U` alone keeps the interface's primary address as sender IP, which
    /// is not a gratuitous ARP; `-S ip` makes it one. `-w 0` exits without waiting for replies.
    fn garp(&self, n: &str, ip: &str) -> f64 {
        let ns = self.ns(n);
        // arping exits 1 as nobody answers an unsolicited ARP; the packet is sent all the same.
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "arping", "-vv", "-U", "-S", ip, "-c", "1", "-w", "0", "-i", "eth0", ip])
            .output()
            .expect("arping");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("arping: sending packet at time "))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("arping sent nothing: {text}{}", String::from_utf8_lossy(&out.stderr)))
    }

    fn neigh(&self, ip: &str) -> String {
        self.ip_out("cli", &format!("neigh show {ip} dev eth0"))
    }

    fn ip_out(&self, n: &str, args: &str) -> String {
        let ns = self.ns(n);
        let mut full = vec!["-n", &ns];
        full.extend(args.split_whitespace());
        run("ip", &full).trim().to_string()
    }

    /// Polls the client's entry for `ip` until `pred` holds.
    fn wait_neigh(&self, ip: &str, what: &str, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let s = self.neigh(ip);
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < end, "client's neighbour entry for {ip} never became {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.created.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(out.status.success(), "{prog} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Watcher {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, String)>,
    log: Arc<Mutex<Vec<String>>>,
}

const TAGS: [&str; 8] = ["START-ERROR", "SEED", "READY", "CHANGE", "OK", "DIRECT", "END", "test result"];

impl Watcher {
    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin.as_mut().expect("stdin"), "{cmd}").expect("write command");
    }

    /// The next line of the watcher's protocol (libtest's own chatter skipped).
    fn next(&self, timeout: Duration) -> Option<(Instant, String)> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) if TAGS.iter().any(|tag| l.starts_with(tag)) => return Some((t, l)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn expect(&self, want: &str, timeout: Duration) -> Instant {
        match self.next(timeout) {
            Some((t, l)) if l == want => t,
            other => panic!("expected {want:?}, got {other:?}\nwatcher log:\n{}", self.log_text()),
        }
    }

    fn expect_quiet(&self, d: Duration, why: &str) {
        if let Some(l) = self.next(d) {
            panic!("{why}: expected nothing, got {l:?}\nwatcher log:\n{}", self.log_text());
        }
    }

    fn cmd(&mut self, cmd: &str, reply: &str) {
        self.send(cmd);
        self.expect(reply, Duration::from_secs(5));
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Number of raw neighbour notifications the watcher logged for `ip` so far.
    fn events_for(&self, ip: &str) -> usize {
        let needle = format!("ip={ip} ");
        self.log.lock().expect("log").iter().filter(|l| l.contains("neighbour event") && l.contains(&needle)).count()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Kill only the process started here (`ip netns exec` execs the test binary in place).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The watcher's test name as libtest knows it, for `--exact`: its path in the test binary without the
/// crate's name (`neighbor_netns::neighbor_watch_child`), taken from this module's path so it follows a move.
fn child_test_name() -> String {
    match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::neighbor_watch_child"),
        None => "neighbor_watch_child".to_owned(),
    }
}

fn lab_or_skip() -> Option<Lab> {
    match Lab::new() {
        Ok(lab) => Some(lab),
        Err(why) => {
            if std::env::var("STAYBOUND_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
                panic!("STAYBOUND_REQUIRE_NETNS=1 but the namespace test cannot run: {why}");
            }
            loud(&format!("SKIP (needs root + netns): neighbor_watch_end_to_end: {why}"));
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn neighbor_watch_end_to_end() {
    let Some(lab) = lab_or_skip() else { return };
    lab.build();
    let sec = Duration::from_secs(1);
    let mut w = lab.spawn_watcher(&[VIP4, VIP6]);
    w.expect(&format!("SEED {VIP4} -"), 10 * sec);
    w.expect(&format!("SEED {VIP6} -"), sec);
    w.expect("READY", sec);

    // The sign's precondition: a directly connected, ARP/NDP-capable destination.
    w.cmd(&format!("direct {VIP4}"), &format!("DIRECT {VIP4} Ok(true)"));
    w.cmd(&format!("direct {VIP6}"), &format!("DIRECT {VIP6} Ok(true)"));
    w.cmd("direct 198.18.0.1", "DIRECT 198.18.0.1 Ok(false)"); // the client's own address
    w.cmd("direct 198.19.0.1", "DIRECT 198.19.0.1 Ok(false)"); // no route
    w.cmd("direct 127.0.0.1", "DIRECT 127.0.0.1 Ok(false)"); // loopback
    lab.ip("cli", "route add 198.19.1.0/24 via 198.18.0.11");
    w.cmd("direct 198.19.1.1", "DIRECT 198.19.1.1 Ok(false)"); // behind a gateway
    lab.ip("cli", "route add prohibit 198.19.2.0/24");
    w.cmd("direct 198.19.2.1", "DIRECT 198.19.2.1 Ok(false)"); // prohibited

    // With arp_accept=0, a gratuitous ARP does not create a missing entry.
    lab.ip("n1", &format!("addr add {VIP4}/24 dev eth0"));
    lab.garp("n1", VIP4);
    w.expect_quiet(Duration::from_millis(200), "GARP with no entry");
    assert_eq!(lab.neigh(VIP4), "", "arp_accept=0: a gratuitous ARP must not create an entry");

    // Traffic creates it: the first address seen is a seed, not a change.
    w.cmd(&format!("touch {VIP4}"), "OK");
    lab.wait_neigh(VIP4, "REACHABLE via n1", |s| s.contains(mac_of("n1")), 3 * sec);
    w.expect_quiet(Duration::from_millis(200), "first sighting");

    // Moves, each announced by a gratuitous ARP from the new node.
    let mut latencies = Vec::new(); // just before spawning arping -> report read by this process
    let mut wire = Vec::new(); // arping's send timestamp -> watcher's report (CLOCK_MONOTONIC)
    let mut at = "n1";
    for i in 0..MOVES {
        let to = if at == "n1" { "n2" } else { "n1" };
        lab.ip(at, &format!("addr del {VIP4}/24 dev eth0"));
        lab.ip(to, &format!("addr add {VIP4}/24 dev eth0"));
        let t0 = Instant::now();
        let sent = lab.garp(to, VIP4);
        let (t, line) = w.next(2 * sec).unwrap_or_else(|| panic!("move {i}: no report\n{}", w.log_text()));
        let want = format!("CHANGE {VIP4} {} {} mono=", mac_of(at), mac_of(to));
        let reported: f64 = line
            .strip_prefix(&want)
            .unwrap_or_else(|| panic!("move {i}: expected {want:?}, got {line:?}"))
            .parse()
            .expect("mono");
        latencies.push(t.duration_since(t0));
        wire.push(Duration::from_secs_f64(reported - sent));
        let state = lab.neigh(VIP4);
        assert!(state.contains(mac_of(to)) && state.contains("STALE"), "after GARP: {state}");

        // The same address announced again is not a change.
        lab.garp(to, VIP4);
        w.expect_quiet(Duration::from_millis(150), "repeated GARP with the same MAC");
        at = to;
    }

    // The address goes away (the node died): the entry fails. FAILED carries no address and is
    // not a change; the GARP of the takeover node is then reported against the last known one.
    // The entry is STALE after the last GARP: traffic sends it DELAY -> PROBE -> FAILED.
    lab.ip(at, &format!("addr del {VIP4}/24 dev eth0"));
    w.cmd(&format!("touch {VIP4}"), "OK");
    let failed = lab.wait_neigh(VIP4, "FAILED", |s| s.contains("FAILED"), 5 * sec);
    w.expect_quiet(Duration::from_millis(200), "entry went FAILED");
    let to = if at == "n1" { "n2" } else { "n1" };
    lab.ip(to, &format!("addr add {VIP4}/24 dev eth0"));
    lab.garp(to, VIP4);
    let (_, line) = w.next(2 * sec).expect("change after FAILED");
    assert!(line.starts_with(&format!("CHANGE {VIP4} {} {} ", mac_of(at), mac_of(to))), "{line}");
    let after_failed = lab.neigh(VIP4);

    // Traffic walks the entry STALE -> DELAY -> PROBE -> REACHABLE with the same address:
    // notifications, but no change.
    let before = w.events_for(VIP4);
    w.cmd(&format!("touch {VIP4}"), "OK");
    lab.wait_neigh(VIP4, "REACHABLE", |s| s.contains("REACHABLE"), 5 * sec);
    w.expect_quiet(Duration::from_millis(200), "same-address state changes");
    let same_addr_events = w.events_for(VIP4) - before;
    assert!(same_addr_events >= 2, "expected same-address notifications, saw {same_addr_events}");

    // IPv6: the new node's kernel sends an unsolicited NA (override) after DAD.
    lab.ip("n1", &format!("addr add {VIP6}/64 dev eth0 nodad"));
    w.cmd(&format!("touch {VIP6}"), "OK");
    lab.wait_neigh(VIP6, "REACHABLE via n1", |s| s.contains(mac_of("n1")), 3 * sec);
    w.expect_quiet(Duration::from_millis(200), "first IPv6 sighting");
    lab.ip("n1", &format!("addr del {VIP6}/64 dev eth0"));
    let t6 = Instant::now();
    lab.ip("n2", &format!("addr add {VIP6}/64 dev eth0"));
    let (t, line) = w.next(5 * sec).unwrap_or_else(|| panic!("no IPv6 report\n{}", w.log_text()));
    assert!(line.starts_with(&format!("CHANGE {VIP6} {} {} ", mac_of("n1"), mac_of("n2"))), "{line}");
    let v6_latency = t.duration_since(t6);

    // Clean stop on cancel.
    drop(w.stdin.take());
    w.expect("END Ok(())", 5 * sec);

    let wire_in_order = wire.iter().map(|d| format!("{:.3}", d.as_secs_f64() * 1e3)).collect::<Vec<_>>().join(" ");
    latencies.sort();
    wire.sort();
    let ms = |d: &Duration| format!("{:.3}ms", d.as_secs_f64() * 1e3);
    loud(&format!(
        "neighbor watch: GARP sent->watcher report over {MOVES} moves (in order, ms: {wire_in_order}): \
         min {} median {} max {} [{}]; \
         including arping's start-up (just before spawn->report read): min {} median {} max {} \
         [{}]; same-address notifications ignored: {same_addr_events}; FAILED entry before takeover: {failed:?}, \
         after: {after_failed:?}; IPv6 address add (DAD 50 ms + NA)->report: {}",
        ms(&wire[0]),
        ms(&wire[MOVES / 2]),
        ms(&wire[MOVES - 1]),
        wire.iter().map(ms).collect::<Vec<_>>().join(" "),
        ms(&latencies[0]),
        ms(&latencies[MOVES / 2]),
        ms(&latencies[MOVES - 1]),
        latencies.iter().map(ms).collect::<Vec<_>>().join(" "),
        ms(&v6_latency),
    ));
    // Generous bounds (a loaded CI machine); the typical figures are printed above.
    assert!(wire[MOVES - 1] < Duration::from_millis(100), "GARP->report took up to {:?}", wire[MOVES - 1]);
    assert!(latencies[MOVES - 1] < Duration::from_millis(1000), "detection took up to {:?}", latencies[MOVES - 1]);
}
