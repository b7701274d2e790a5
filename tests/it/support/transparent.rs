//! The scenarios transparent mode is held to, whichever way the client is redirected (nftables rules or the
//! connect hook): an unmodified client in the client namespace dials the logical host's address itself.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::lab::{Host, LOGICAL, Lab, REDIS_PORT};
use super::loadclient::switchover;
use super::sidecar::{Blocked, Sidecar, margin, wait_blocked};
use super::wait::wait_until;

/// The relocatable address staybound binds as `source` (a second address of the client host).
pub const SOURCE: &str = "198.18.0.20";

pub fn logical() -> SocketAddr {
    SocketAddr::from((LOGICAL, REDIS_PORT))
}

pub fn with_source(lab: &Lab) {
    lab.exec(Host::Client, &["ip", "addr", "add", &format!("{SOURCE}/24"), "dev", "eth0"]);
}

/// Clients of the `redis` service that came through staybound.
pub fn proxied(sc: &Sidecar<'_>) -> f64 {
    sc.metric("staybound_client_connections_total", &[("service", "redis"), ("outcome", "proxied")])
}

/// The addresses node `host`'s redis sees its clients at (the `redis-cli` that asks, at the client's
/// stationary address, left out).
pub fn client_addrs(lab: &Lab, host: Host) -> Vec<String> {
    let out = lab.redis_cli_at(Host::Client, host.addr(), &["CLIENT", "LIST"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("addr=")).map(str::to_string))
        .collect()
}

/// A client blocked in BLPOP on the logical host, through staybound (`sc`, up) and seen by node 1 at the
/// `source` address, learns of a silent move within the bound `check` computes; a new client then reaches
/// node 2 through staybound.
pub fn silent_move(lab: &Lab, sc: &Sidecar<'_>, label: &str, run: usize) {
    let blocked = Blocked::start(lab, Host::Client, logical());
    wait_blocked(lab, Host::Node1, 1);
    let seen = client_addrs(lab, Host::Node1);
    assert!(
        seen.iter().all(|a| a.starts_with(&format!("{SOURCE}:"))),
        "node 1 sees every client (the redirected one and the probe) at the source address: {seen:?}"
    );
    assert_eq!(proxied(sc), 1.0, "the client came through staybound");
    let t0 = Instant::now();
    lab.move_logical(Host::Node1, Host::Node2, true);
    let (t1, how) = blocked.ended(Duration::from_secs(10)).expect("the redirected client learned within 10 s");
    let after = t1.duration_since(t0);
    let bound = sc.bounds().silent_move.0;
    eprintln!(
        "FIGURES {label} silent move run {run}: client dialling {} {how} after {:.3}s (bound {:.1}s)",
        logical(),
        after.as_secs_f64(),
        bound.as_secs_f64()
    );
    assert!(after <= bound + margin(), "noticed after {after:?}, bound {bound:?}");
    assert_eq!(sc.metric("staybound_intercept_refused_total", &[("service", "redis")]), 0.0);
    sc.wait_state("up", Duration::from_secs(5));
    let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
    wait_until("a new client reaches node 2", Duration::from_secs(5), || {
        lab.redis_run_id(Host::Client, LOGICAL).as_deref() == Some(node2.as_str())
    });
    assert!(proxied(sc) >= 2.0, "through staybound");
}

/// A closed-loop client with a 5 s timeout through a 2 s switchover: first straight to the logical host
/// (node 1 to node 2), then through staybound as `start` starts it (back to node 1), which loses nothing.
pub fn switchover_loses_nothing<'a>(
    lab: &'a Lab,
    start: impl FnOnce(&'a Lab) -> Sidecar<'a>,
    label: &'static str,
    run: usize,
) -> Sidecar<'a> {
    lab.stop_redis(Host::Node2);
    let direct = switchover(lab, logical(), Host::Node1, Host::Node2, "direct");
    let sc = start(lab);
    sc.wait_state("up", Duration::from_secs(5));
    let stats = switchover(lab, logical(), Host::Node2, Host::Node1, label);
    eprintln!(
        "FIGURES 2 s switchover run {run}: {label} {} answered, {} lost, longest stall {:.2}s; direct {} answered, \
         {} lost, longest stall {:.2}s",
        stats.ok,
        stats.lost,
        stats.longest_stall().as_secs_f64(),
        direct.ok,
        direct.lost,
        direct.longest_stall().as_secs_f64()
    );
    assert_eq!(stats.lost, 0, "no request lost through the switchover");
    assert!(proxied(&sc) >= 1.0, "the client came through staybound");
    let seen = client_addrs(lab, Host::Node1);
    assert!(seen.iter().all(|a| a.starts_with(&format!("{SOURCE}:"))), "{seen:?}");
    sc
}
