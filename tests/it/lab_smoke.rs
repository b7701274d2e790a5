//! Smoke tests of the network-namespace lab itself (no staybound code):
//! they prove the lab can model a logical-host failover before staybound's
//! own failover tests rely on it. Each test skips loudly without root.

use crate::support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use support::lab::*;
use support::wait::wait_until;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `run_id` of the redis answering at `ip`, asked from the client.
fn run_id(lab: &Lab, ip: Ipv4Addr) -> String {
    lab.redis_run_id(Host::Client, ip).unwrap_or_else(|| panic!("no redis answers at {ip}"))
}

fn assert_no_namespaces(prefix: &str) {
    let left: Vec<String> = list_netns().into_iter().filter(|n| n.starts_with(&format!("{prefix}-"))).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn failover_with_gratuitous_arp_moves_client_to_node2() {
    let t = Instant::now();
    let Some(lab) = Lab::new("smoke-failover") else {
        return;
    };
    eprintln!("lab {} built in {:?}", lab.prefix(), t.elapsed());
    let prefix = lab.prefix().to_owned();
    assert_eq!(lab.mac(Host::Node1), Host::Node1.mac_addr());
    assert_eq!(lab.mac(Host::Node2), Host::Node2.mac_addr());

    lab.start_redis(Host::Node1);
    lab.start_redis(Host::Node2);
    let id1 = run_id(&lab, Host::Node1.addr());
    let id2 = run_id(&lab, Host::Node2.addr());
    assert_ne!(id1, id2, "two redis instances must differ");

    lab.add_logical(Host::Node1, true);
    assert!(lab.has_logical(Host::Node1) && !lab.has_logical(Host::Node2));
    let set = lab.redis_cli(Host::Client, &["SET", "k", "v"]);
    assert_eq!(stdout(&set), "OK", "{set:?}");
    assert_eq!(run_id(&lab, LOGICAL), id1);
    let before = lab.neigh_entry(Host::Client, LOGICAL).expect("client resolved LOGICAL");
    eprintln!("client neigh before move: {before:?}");
    assert_eq!(before.lladdr.as_deref(), Some(Host::Node1.mac_addr()));

    let t = Instant::now();
    lab.move_logical(Host::Node1, Host::Node2, true);
    eprintln!("move_logical with garp took {:?}", t.elapsed());
    wait_until("client's neighbour entry for LOGICAL shows node2", Duration::from_secs(2), || {
        lab.neigh(Host::Client, LOGICAL).as_deref() == Some(Host::Node2.mac_addr())
    });
    eprintln!("client neigh after move: {:?}", lab.neigh_entry(Host::Client, LOGICAL));
    assert_eq!(run_id(&lab, LOGICAL), id2);
    // Node2 is a separate, empty redis: the key written via node1 is absent.
    assert_eq!(stdout(&lab.redis_cli(Host::Client, &["GET", "k"])), "");

    lab.stop_redis(Host::Node1);
    let refused = lab.redis_cli_at(Host::Client, Host::Node1.addr(), &["PING"]);
    assert!(!refused.status.success() || !stdout(&refused).contains("PONG"));

    let t = Instant::now();
    drop(lab);
    eprintln!("lab torn down in {:?}", t.elapsed());
    assert_no_namespaces(&prefix);
}

#[test]
fn without_gratuitous_arp_client_keeps_stale_mac() {
    let Some(lab) = Lab::new("smoke-no-garp") else {
        return;
    };
    let node1 = SocketAddr::V4(SocketAddrV4::new(LOGICAL, 7000));
    lab.add_logical(Host::Node1, false);
    let listener = lab.listen_tcp(Host::Node1, node1).expect("listen on LOGICAL in node1");
    let conn = lab.connect_tcp(Host::Client, node1, Duration::from_secs(2));
    assert!(conn.is_ok(), "{conn:?}");
    drop(listener);
    assert_eq!(lab.neigh(Host::Client, LOGICAL).as_deref(), Some(Host::Node1.mac_addr()));

    lab.move_logical(Host::Node1, Host::Node2, false);
    // Nobody told the client: it still points at node1's MAC.
    assert_eq!(lab.neigh(Host::Client, LOGICAL).as_deref(), Some(Host::Node1.mac_addr()));
    // A late announcement fixes it at once, even inside the 1 s locktime.
    lab.gratuitous_arp(Host::Node2);
    wait_until("client entry shows node2 after late garp", Duration::from_secs(2), || {
        lab.neigh(Host::Client, LOGICAL).as_deref() == Some(Host::Node2.mac_addr())
    });
    let entry = lab.neigh_entry(Host::Client, LOGICAL).unwrap();
    assert_eq!(entry.state, "STALE", "a garp request leaves the entry STALE");
}

#[test]
fn gratuitous_arp_does_not_create_a_neighbour_entry() {
    let Some(lab) = Lab::new("smoke-garp-no-entry") else {
        return;
    };
    lab.add_logical(Host::Node1, true);
    // arp_accept=0: an unsolicited ARP only updates existing entries.
    assert_eq!(lab.neigh_entry(Host::Client, LOGICAL), None);
}

#[test]
fn two_labs_coexist_and_are_isolated() {
    let (Some(a), Some(b)) = (Lab::new("smoke-two-a"), Lab::new("smoke-two-b")) else {
        return;
    };
    assert_ne!(a.prefix(), b.prefix());
    for h in Host::ALL {
        assert_ne!(a.ns_name(h), b.ns_name(h));
    }
    // Same addresses in both labs, but a listener in lab A is only
    // reachable from lab A.
    let to = SocketAddr::V4(SocketAddrV4::new(Host::Node1.addr(), 7001));
    let listener = a.listen_tcp(Host::Node1, to).expect("listen in lab A");
    let mut c = a.connect_tcp(Host::Client, to, Duration::from_secs(2)).expect("A client -> A node1");
    let (mut s, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), Host::Client.addr());
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    let err =
        b.connect_tcp(Host::Client, to, Duration::from_secs(2)).expect_err("lab B must not reach lab A's listener");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let (pa, pb) = (a.prefix().to_owned(), b.prefix().to_owned());
    drop((a, b));
    assert_no_namespaces(&pa);
    assert_no_namespaces(&pb);
}

#[test]
fn link_down_blackholes_and_link_up_restores() {
    let Some(lab) = Lab::new("smoke-link") else {
        return;
    };
    let to = SocketAddr::V4(SocketAddrV4::new(Host::Node1.addr(), 7002));
    let _listener = lab.listen_tcp(Host::Node1, to).expect("listen");
    lab.connect_tcp(Host::Client, to, Duration::from_secs(2)).expect("connect while up");
    lab.link_down(Host::Node1);
    let err = lab.connect_tcp(Host::Client, to, Duration::from_millis(300)).expect_err("node1 is cut off");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "silence, not a reset: {err}");
    lab.link_up(Host::Node1);
    lab.wait_tcp(Host::Client, to, Duration::from_secs(5));
}

#[test]
fn spawned_children_are_tracked_logged_and_reaped() {
    let Some(lab) = Lab::new("smoke-spawn") else {
        return;
    };
    let pid = lab.spawn(Host::Node2, &["sh", "-c", "echo hello; exec sleep 600"]);
    assert!(lab.is_running(pid));
    wait_until("child wrote its greeting", Duration::from_secs(5), || lab.read_log(pid).contains("hello"));
    let status = lab.kill(pid);
    assert!(!status.success());
    assert!(!lab.is_running(pid));
    let quick = lab.spawn(Host::Client, &["env", "X=1", "sh", "-c", "exit 3"]);
    assert_eq!(lab.wait_exit(quick, Duration::from_secs(5)).code(), Some(3));
    // A frozen child must not stall teardown for the SIGKILL grace period.
    let frozen = lab.spawn(Host::Node1, &["sleep", "600"]);
    lab.signal(frozen, SIGSTOP);
    let t = Instant::now();
    drop(lab);
    assert!(t.elapsed() < Duration::from_secs(2), "teardown took {:?}", t.elapsed());
}
