//! Upgrade without a failover (SIGUSR2): under a loop of new connections and with idle sessions open, the old
//! process hands its listening sockets to a new one; no connect is refused or reset, no idle session ends, and
//! the old process exits once its last session has ended.
//!
//! `STAYBOUND_UPGRADE_IDLE` (default 500) idle sessions and `STAYBOUND_UPGRADE_RATE` (default 300) new
//! connections a second; the figures in the README come from `STAYBOUND_UPGRADE_IDLE=5000
//! STAYBOUND_UPGRADE_RATE=1000 cargo test --test it upgrade:: -- --nocapture`.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::process::Running;
use support::wait::wait_until as wait;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// An echo upstream on a runtime of its own (thousands of idle sessions, no thread each).
fn echo() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });
    addr
}

/// Kills a process on drop (the new staybound, which the harness did not start).
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

/// What the loop of new connections saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    other: AtomicU64,
}

/// One new connection: connect, one byte each way, close.
fn one_connection(to: SocketAddr, t: &Tally) {
    let mut s = match TcpStream::connect(to) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            t.refused.fetch_add(1, Ordering::Relaxed);
            eprintln!("connect refused: {e}");
            return;
        }
        Err(e) => {
            t.other.fetch_add(1, Ordering::Relaxed);
            eprintln!("connect failed: {e}");
            return;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    match s.write_all(b"x").and_then(|()| s.read(&mut b)) {
        Ok(1) => {
            t.ok.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {
            t.reset.fetch_add(1, Ordering::Relaxed);
            eprintln!("a new connection was closed before its echo");
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => {
            t.reset.fetch_add(1, Ordering::Relaxed);
            eprintln!("a new connection was reset: {e}");
        }
        Err(e) => {
            t.other.fetch_add(1, Ordering::Relaxed);
            eprintln!("a new connection failed: {e}");
        }
    }
}

#[test]
fn an_upgrade_refuses_no_connect_and_ends_no_session() {
    let (idle_n, rate) = (env("STAYBOUND_UPGRADE_IDLE", 500) as usize, env("STAYBOUND_UPGRADE_RATE", 300));
    let up = echo();
    let sb = Running::start(&format!(
        "shutdown_grace = \"120s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"up\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\nmax_connections = 19000\n[service.probe]\nmode = \"connect\"\n"
    ));
    let listen = sb.listens()["up"][0];

    let mut idle: Vec<TcpStream> = Vec::with_capacity(idle_n);
    for i in 0..idle_n {
        let mut s = TcpStream::connect(listen).unwrap_or_else(|e| panic!("idle session {i}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"i").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        idle.push(s);
    }
    wait("every idle session is active", Duration::from_secs(30), || {
        sb.metric("staybound_client_connections_active", &[("service", "up")]) == idle_n as f64
    });

    // The loop of new connections: 4 threads, each on its own schedule of rate/4 a second.
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            let period = Duration::from_secs_f64(4.0 / rate as f64);
            std::thread::spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    one_connection(listen, &tally);
                    next += period;
                    // why: pacing the load, not synchronising with anything.
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
            })
        })
        .collect();
    wait("the loop runs", Duration::from_secs(10), || tally.ok.load(Ordering::Relaxed) >= rate / 4);

    let before = tally.ok.load(Ordering::Relaxed);
    let started = Instant::now();
    sb.signal("USR2");
    let new_pid = sb.wait_log("SIGUSR2: upgrade: the new process is started", Duration::from_secs(10))["new_pid"]
        .as_u64()
        .unwrap() as u32;
    let _new = KillOnDrop(Some(new_pid));
    sb.wait_log(
        "upgrade: the new process accepts; this one stops accepting and serves its sessions until they end",
        Duration::from_secs(30),
    );
    let handed = started.elapsed();
    // New connections for a while after the old process stopped accepting: they reach the new one.
    let mark = tally.ok.load(Ordering::Relaxed);
    wait("a second of connections after the handover", Duration::from_secs(30), || {
        tally.ok.load(Ordering::Relaxed) >= mark + rate
    });
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let during = tally.ok.load(Ordering::Relaxed) - before;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(sb.metric("staybound_upgrades_total", &[("result", "ok")]), 1.0, "the new process counts it");

    // Every idle session still works: it is served by the old process.
    let mut ended = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if s.write_all(b"j").and_then(|()| s.read_exact(&mut b)).is_err() {
            ended += 1;
        }
    }
    let (refused, reset, other) = (
        tally.refused.load(Ordering::Relaxed),
        tally.reset.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    eprintln!(
        "FIGURES upgrade with {idle_n} idle sessions and a target of {rate} new connections/s: {during} connections in {secs:.1} s from SIGUSR2 ({:.0}/s), handover done {handed:?} after SIGUSR2; refused {refused}, reset {reset}, other errors {other}; idle sessions ended by the upgrade: {ended}",
        during as f64 / secs
    );
    assert_eq!((refused, reset, other), (0, 0, 0), "no new connection fails");
    assert_eq!(ended, 0, "no idle session ends");

    // The old process waits for its last session, then exits.
    let mut sb = sb;
    assert!(sb.child.try_wait().unwrap().is_none(), "the old process serves its sessions");
    let closing = Instant::now();
    drop(idle);
    let mut status = None;
    wait("the old process exits once its sessions ended", Duration::from_secs(30), || {
        status = sb.child.try_wait().unwrap();
        status.is_some()
    });
    eprintln!("FIGURES the old process exited {:?} after its last sessions were closed", closing.elapsed());
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let mut fresh = TcpStream::connect(listen).unwrap();
    fresh.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    fresh.write_all(b"k").unwrap();
    let mut b = [0u8; 1];
    fresh.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"k", "the new process serves alone");
}

/// A UDP upstream that echoes every datagram.
fn udp_echo() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    addr
}

fn ask_udp(c: &std::net::UdpSocket, msg: &[u8]) -> Vec<u8> {
    c.send(msg).unwrap();
    let mut buf = [0u8; 2048];
    let n = c.recv(&mut buf).unwrap();
    buf[..n].to_vec()
}

#[test]
fn an_upgrade_hands_over_udp_listeners_and_the_admin_endpoint() {
    let (up, dgram_up) = (echo(), udp_echo());
    let sb = Running::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"connect\"\n[[service]]\nname = \"d\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{dgram_up}\"\n"
    ));
    let dgram = sb.listens()["d"][0];
    let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    c.connect(dgram).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ask_udp(&c, b"before"), b"before");

    sb.signal("USR2");
    let new_pid = sb.wait_log("SIGUSR2: upgrade: the new process is started", Duration::from_secs(10))["new_pid"]
        .as_u64()
        .unwrap() as u32;
    let _new = KillOnDrop(Some(new_pid));
    let mut sb = sb;
    wait("the old process, with no session, exits", Duration::from_secs(30), || sb.child.try_wait().unwrap().is_some());
    assert_eq!(ask_udp(&c, b"after"), b"after", "the same client, the same address, the new process");
    assert_eq!(sb.listens()["d"], vec![dgram], "the admin endpoint is the new process's, at the same address");
    assert_eq!(sb.metric("staybound_upgrades_total", &[("result", "ok")]), 1.0);
}

#[test]
fn a_new_process_that_cannot_start_leaves_the_old_one_running() {
    let up = echo();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"connect\"\n"
    );
    let sb = Running::start(&text);
    let listen = sb.listens()["t"][0];
    std::fs::write(&sb.config, "[[service]]\nname = 42\n").unwrap();
    sb.signal("USR2");
    wait("the failed upgrade is counted", Duration::from_secs(30), || {
        sb.metric("staybound_upgrades_total", &[("result", "error")]) == 1.0
    });
    sb.wait_log("upgrade failed: this process keeps running", Duration::from_secs(5));
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"z").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"z", "the old process still serves");
}
