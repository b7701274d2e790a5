//! A takeover at scale, in the namespace lab: 5 000 clients are held through a takeover of about 2 s (the
//! logical address leaves node 1, the detector says the host is down, every client connects and sends a
//! PING, and the address comes up on node 2 with a gratuitous ARP), then released. Measured: how long after
//! the address came up every client had its PONG, the longest wait of a client, the peak of new
//! connections per second at node 2 (its kernel's `PassiveOpens`, sampled every 2 ms), its listen-queue
//! overflows (shown: they depend on how fast node 2's redis drains its queue on a busy machine), and
//! staybound's CPU time. Asserted is what staybound controls: every client is served, and no second at node
//! 2 holds more new connections than the release rate, default or configured (the detector's own probe
//! connects aside). How soon all are served is shown (within 1 s of the address coming up on a quiet
//! machine; longer when other work shares the cores); unpaced, the peak is shown.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::support::lab::{Host, Lab};
use crate::support::sidecar::{Sidecar, runs};
use crate::support::wait::wait_until;

/// Clients in the herd.
const CLIENTS: usize = 5000;
/// How long the address is away, at least.
const TAKEOVER: Duration = Duration::from_secs(2);
/// Connects of the detector itself (its probe connection, staggered recovery attempts) that may land in
/// the same second as the paced herd.
const PROBE_CONNECTS: u64 = 20;

/// What one run measured.
struct Herd {
    served: usize,
    /// From the address coming up on node 2 to the last client's PONG.
    all_served: Duration,
    /// From the address coming up to node 2's first new connection (the detector finding it back).
    first_accept: Duration,
    /// The longest a client waited, from its PING to its PONG.
    longest_wait: Duration,
    /// The most new connections node 2 accepted in any 100 ms, times ten.
    peak_per_s_100ms: u64,
    /// The most new connections node 2 accepted in any one second.
    max_in_1s: u64,
    /// Node 2's listen-queue overflows and drops during the release.
    overflows: u64,
    drops: u64,
    /// staybound's CPU time (user + system) from the address coming up to the last PONG.
    cpu: Duration,
    takeover: Duration,
    /// staybound's connect attempts during the release, by result (its metric), in label order.
    attempts: Vec<(String, f64)>,
}

/// A counter of `/proc/PID/net/{snmp,netstat}`: the value under `name` in the `section` rows.
fn net_counter(pid: u32, file: &str, section: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with(section));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else { return 0 };
    let i = names.split_whitespace().position(|n| n == name);
    i.and_then(|i| values.split_whitespace().nth(i)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// User plus system CPU time of `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3 (state, not a number).
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    // why: USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// One herd through a takeover; `release_rate` `None` leaves the key out (the default).
fn herd(tag: &str, release_rate: Option<u32>) -> Option<Herd> {
    let lab = Lab::new(tag)?;
    lab.start_redis(Host::Node1);
    let node2 = lab.start_redis(Host::Node2);
    lab.add_logical(Host::Node1, true);
    let sc = Sidecar::start(
        &lab,
        &format!(
            "max_connections = 20000\n[service.hold]\ndeadline = \"60s\"\n{}",
            release_rate.map_or(String::new(), |r| format!("release_rate = {r}\n"))
        ),
    );
    sc.wait_state("up", Duration::from_secs(5));

    let t0 = Instant::now();
    lab.del_logical(Host::Node1);
    wait_until("the detector says the host is down", Duration::from_secs(10), || sc.state() == "down");
    let listen = sc.listen();
    let clients: Vec<(TcpStream, Instant)> = lab.in_ns(Host::Client, || {
        (0..CLIENTS)
            .map(|_| {
                let mut c = TcpStream::connect_timeout(&listen, Duration::from_secs(5)).expect("connect to staybound");
                c.write_all(b"PING\r\n").expect("send PING");
                (c, Instant::now())
            })
            .collect()
    });
    let held = |sc: &Sidecar<'_>| sc.metric("staybound_held_clients", &[("service", "redis")]);
    wait_until("every client is held", Duration::from_secs(30), || held(&sc) >= CLIENTS as f64);

    // Each client waits for its PONG on a runtime of its own, started before the address comes back.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(c, sent)| {
            c.set_nonblocking(true).unwrap();
            rt.spawn(async move {
                let mut c = tokio::net::TcpStream::from_std(c).unwrap();
                let mut buf = [0u8; 7];
                let read = tokio::time::timeout(Duration::from_secs(60), c.read_exact(&mut buf)).await;
                matches!(read, Ok(Ok(_)) if &buf == b"+PONG\r\n").then(|| (Instant::now(), sent))
            })
        })
        .collect();

    // Node 2's accepted connections, sampled every 2 ms until the herd is through.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                samples.push((Instant::now(), net_counter(node2, "snmp", "Tcp:", "PassiveOpens")));
                std::thread::sleep(Duration::from_millis(2));
            }
            samples
        })
    };
    let overflows0 = net_counter(node2, "netstat", "TcpExt:", "ListenOverflows");
    let drops0 = net_counter(node2, "netstat", "TcpExt:", "ListenDrops");
    std::thread::sleep(TAKEOVER.saturating_sub(t0.elapsed()));
    const RESULTS: [&str; 4] = ["ok", "refused", "unreachable", "timeout"];
    let attempts = |sc: &Sidecar<'_>| {
        RESULTS.map(|r| {
            sc.metric_or_nan("staybound_upstream_connect_attempts_total", &[("service", "redis"), ("result", r)])
        })
    };
    let attempts0 = attempts(&sc);
    let cpu0 = cpu_time(sc.pid);
    let up = Instant::now();
    lab.add_logical(Host::Node2, true);
    let results: Vec<Option<(Instant, Instant)>> = rt.block_on(async { futures_join(readers).await });
    let cpu = cpu_time(sc.pid).saturating_sub(cpu0);
    done.store(true, Ordering::Relaxed);
    let attempts1 = attempts(&sc);
    let attempts =
        RESULTS.iter().zip(attempts1.iter().zip(attempts0)).map(|(r, (a, b))| (r.to_string(), a - b)).collect();
    let samples = sampler.join().unwrap();

    let served: Vec<(Instant, Instant)> = results.into_iter().flatten().collect();
    let last = served.iter().map(|(at, _)| *at).max().unwrap_or(up);
    let longest_wait = served.iter().map(|(at, sent)| at.duration_since(*sent)).max().unwrap_or_default();
    let in_window = |w: Duration| {
        let mut best = 0;
        let mut j = 0;
        for i in 0..samples.len() {
            while samples[i].0.duration_since(samples[j].0) > w {
                j += 1;
            }
            best = best.max(samples[i].1 - samples[j].1);
        }
        best
    };
    let base = samples.iter().take_while(|(t, _)| *t < up).last().map_or(0, |(_, c)| *c);
    let first_accept =
        samples.iter().find(|(t, c)| *t >= up && *c > base).map_or(Duration::ZERO, |(t, _)| t.duration_since(up));
    Some(Herd {
        first_accept,
        served: served.len(),
        all_served: last.duration_since(up),
        longest_wait,
        peak_per_s_100ms: in_window(Duration::from_millis(100)) * 10,
        max_in_1s: in_window(Duration::from_secs(1)),
        overflows: net_counter(node2, "netstat", "TcpExt:", "ListenOverflows") - overflows0,
        drops: net_counter(node2, "netstat", "TcpExt:", "ListenDrops") - drops0,
        cpu,
        takeover: up.duration_since(t0),
        attempts,
    })
}

/// Awaits every reader in turn.
async fn futures_join(
    readers: Vec<tokio::task::JoinHandle<Option<(Instant, Instant)>>>,
) -> Vec<Option<(Instant, Instant)>> {
    let mut out = Vec::with_capacity(readers.len());
    for r in readers {
        out.push(r.await.ok().flatten());
    }
    out
}

fn show(label: &str, h: &Herd) {
    eprintln!(
        "FIGURES herd of {CLIENTS}, {label}: takeover {:.2}s | served {} | first connection at node 2 after {:.3}s, all served {:.3}s after the address came up | longest wait {:.2}s | node 2: peak {} new connections/s (100 ms windows), at most {} in any 1 s, {} listen overflows, {} drops | staybound CPU {:.2}s | its connect attempts {:?}",
        h.takeover.as_secs_f64(),
        h.served,
        h.first_accept.as_secs_f64(),
        h.all_served.as_secs_f64(),
        h.longest_wait.as_secs_f64(),
        h.peak_per_s_100ms,
        h.max_in_1s,
        h.overflows,
        h.drops,
        h.cpu.as_secs_f64(),
        h.attempts
    );
}

#[test]
fn with_the_default_release_every_client_is_served_at_the_default_rate() {
    for _ in 0..runs() {
        let Some(h) = herd("herd-default", None) else { return };
        show("release_rate left out (10 000/s)", &h);
        assert_eq!(h.served, CLIENTS, "every client got its PONG");
        // why: how long serving 5 000 clients takes is shown, not asserted: 0.90 and 0.93 s on a quiet
        // machine (README), 1.78 s while two builds shared its two cores. Node 2's listen overflows are
        // shown too: whether its redis drains a queue of 511 in time depends on how busy the machine is.
        // What staybound controls is the rate, asserted below.
        let bound = 1 + 10_000 + 50 + PROBE_CONNECTS;
        assert!(h.max_in_1s <= bound, "{} new connections in one second (bound {bound})", h.max_in_1s);
    }
}

#[test]
fn with_a_configured_rate_no_second_at_the_new_node_holds_more_connections_than_the_rate() {
    for _ in 0..runs() {
        let Some(h) = herd("herd-paced", Some(2000)) else { return };
        show("release_rate 2 000/s", &h);
        assert_eq!(h.served, CLIENTS, "every client got its PONG");
        // The pacer's bound (`pace`): 1 + rate × (1 s + 5 ms), and the detector's own connects.
        let bound = 1 + 2000 + 10 + PROBE_CONNECTS;
        assert!(h.max_in_1s <= bound, "{} new connections in one second (bound {bound})", h.max_in_1s);
    }
}

#[test]
fn unpaced_every_client_is_served_and_the_peak_is_shown() {
    for _ in 0..runs() {
        let Some(h) = herd("herd-unpaced", Some(0)) else { return };
        show("release_rate 0 (all at once)", &h);
        assert_eq!(h.served, CLIENTS, "every client got its PONG");
    }
}
