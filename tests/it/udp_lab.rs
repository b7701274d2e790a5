//! UDP in the namespace lab: each node runs a naive echo bound to INADDR_ANY, so its replies leave from the
//! node's stationary address, not the logical one. A client with a connected socket gets every reply through
//! staybound (which counts the stationary addresses through `reply_from`) before and after the logical address
//! moves to node 2, and none going direct. Also: a client on another host gets large replies whole and from
//! the address it used; a listen address and a source address that are not on the host yet are bound when
//! they appear; a source address that leaves the host is no failover.

use crate::support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use support::lab::{Host, LOGICAL, Lab};
use support::proxy::metric_in;
use support::wait::wait_until;

const PORT: u16 = 7000;
const ADMIN: &str = "127.0.0.1:9901";

/// A naive UDP echo on a node: bound to 0.0.0.0, it answers `"{node} {peer ip} {payload}"`, from whatever
/// source the kernel picks (the node's stationary address).
struct NodeEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NodeEcho {
    fn start(lab: &Lab, node: Host) -> NodeEcho {
        let sock = lab
            .in_ns(node, || UdpSocket::bind(("0.0.0.0", PORT)))
            .unwrap_or_else(|e| panic!("echo on {}: {e}", node.role()));
        // why: lets the thread see `stop`; it is not how the test waits for anything.
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                let mut reply = format!("{} {} ", node.role(), peer.ip()).into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
            }
        });
        NodeEcho { stop, thread: Some(thread) }
    }
}

impl Drop for NodeEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// staybound in the client namespace with one UDP service `echo` in front of the logical host.
struct Staybound<'a> {
    lab: &'a Lab,
    pid: u32,
}

impl<'a> Staybound<'a> {
    fn start(lab: &'a Lab, service: &str) -> Staybound<'a> {
        let text = format!(
            "shutdown_grace = \"1s\"\n[admin]\nlisten = \"{ADMIN}\"\n[[service]]\nname = \"echo\"\nprotocol = \"udp\"\nupstream = \"{LOGICAL}:{PORT}\"\n{service}"
        );
        let path = lab.dir().join("staybound.toml");
        std::fs::write(&path, &text).unwrap();
        let path = path.to_str().unwrap().to_string();
        let pid = lab.spawn(
            Host::Client,
            &[
                "env",
                "RUST_LOG=staybound=debug",
                &support::sidecar::bin(),
                "--log-format",
                "json",
                "run",
                "--config",
                &path,
            ],
        );
        let sb = Staybound { lab, pid };
        wait_until("staybound's admin endpoint answers", Duration::from_secs(10), || sb.try_get("/healthz").is_ok());
        sb
    }

    fn try_get(&self, path: &str) -> Result<String, String> {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        self.lab.in_ns(Host::Client, || staybound::status::fetch(admin, path))
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.try_get("/metrics").unwrap_or_else(|e| panic!("{e}"));
        let mut all = vec![("service", "echo")];
        all.extend_from_slice(labels);
        metric_in(&text, name, &all)
    }

    fn status(&self) -> serde_json::Value {
        let body = self.try_get("/status").unwrap_or_else(|e| panic!("{e}"));
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        doc[0].clone()
    }
}

/// A UDP socket in `host`, connected to `to`: the kernel drops any datagram from another source.
fn connected(lab: &Lab, host: Host, to: SocketAddr) -> UdpSocket {
    lab.in_ns(host, || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(to)?;
        Ok::<_, std::io::Error>(s)
    })
    .unwrap_or_else(|e| panic!("client socket to {to}: {e}"))
}

/// Sends `n` requests one after the other, each waiting up to `wait` for its reply; returns how many were
/// answered and by which nodes.
fn exchange(sock: &UdpSocket, n: usize, wait: Duration, tag: &str) -> (usize, Vec<String>) {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut answered = 0;
    let mut nodes = Vec::new();
    let mut buf = vec![0u8; 65536];
    for i in 0..n {
        let req = format!("{tag} {i}");
        if sock.send(req.as_bytes()).is_err() {
            continue;
        }
        // A stale reply to an earlier, timed-out request is skipped; the wait is per request.
        while let Ok(len) = sock.recv(&mut buf) {
            let reply = String::from_utf8_lossy(&buf[..len]).to_string();
            if reply.ends_with(&req) {
                answered += 1;
                nodes.push(reply.split(' ').next().unwrap_or("?").to_string());
                break;
            }
        }
    }
    nodes.dedup();
    (answered, nodes)
}

#[test]
fn a_connected_udp_client_gets_every_reply_before_and_after_the_move_only_through_staybound() {
    let Some(lab) = Lab::new("udp-move") else { return };
    let _echo1 = NodeEcho::start(&lab, Host::Node1);
    let _echo2 = NodeEcho::start(&lab, Host::Node2);
    lab.add_logical(Host::Node1, true);
    let sb = Staybound::start(
        &lab,
        &format!(
            "listen = \"0.0.0.0:{PORT}\"\n[service.probe]\nmode = \"send-expect\"\nsend = \"ping\"\nexpect = \"ping\"\nidentity = \"^(node[0-9]) \"\ninterval = \"200ms\"\n[service.udp]\nreply_from = [\"198.18.0.0/24\"]\n"
        ),
    );
    assert_eq!(sb.metric("staybound_udp_listener_bound", &[]), 1.0);
    wait_until("the UDP probe names node1", Duration::from_secs(5), || sb.status()["identity"] == "node1");

    let via = connected(&lab, Host::Client, SocketAddr::from((Host::Client.addr(), PORT)));
    let direct = connected(&lab, Host::Client, SocketAddr::from((LOGICAL, PORT)));
    let (via_before, nodes_before) = exchange(&via, 10, Duration::from_secs(2), "before");
    let (direct_before, _) = exchange(&direct, 10, Duration::from_millis(300), "direct-before");

    // A client on another host, with a reply larger than eth0's MTU: it must leave from the address the
    // client used (198.18.0.10) and be fragmented, not refused (quinn-udp's PMTU "probe" mode is undone).
    let far = connected(&lab, Host::Node2, SocketAddr::from((Host::Client.addr(), PORT)));
    far.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let big = vec![b'x'; 8000];
    far.send(&big).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = far.recv(&mut buf).expect("an 8000-byte reply across eth0 (MTU 1500), from 198.18.0.10");
    assert!(n > 8000 && buf[..n].ends_with(&big), "the whole datagram came back ({n} bytes)");

    lab.move_logical(Host::Node1, Host::Node2, true);
    let (via_after, nodes_after) = exchange(&via, 10, Duration::from_secs(2), "after");
    let (direct_after, _) = exchange(&direct, 10, Duration::from_millis(300), "direct-after");
    wait_until("the UDP probe saw the move (identity node2, epoch 2)", Duration::from_secs(5), || {
        let st = sb.status();
        st["identity"] == "node2" && st["epoch"].as_u64() >= Some(2)
    });
    let st = sb.status();
    let relayed = sb.metric("staybound_udp_datagrams_total", &[("direction", "client")]);
    let unknown = sb.metric("staybound_udp_dropped_total", &[("reason", "unknown_source")]);
    eprintln!(
        "UDP LAB through staybound: {via_before}/10 before (from {nodes_before:?}), {via_after}/10 after the move (from \
         {nodes_after:?}); direct to {LOGICAL}: {direct_before}/10 before, {direct_after}/10 after; staybound relayed \
         {relayed} replies, unknown_source {unknown}; /status: state {} epoch {} identity {} cause {}",
        st["state"], st["epoch"], st["identity"], st["last_failover"]["cause"]
    );
    assert_eq!((via_before, via_after), (10, 10), "every reply through staybound");
    assert_eq!((nodes_before, nodes_after), (vec!["node1".to_string()], vec!["node2".to_string()]));
    assert_eq!((direct_before, direct_after), (0, 0), "a connected client going direct drops every reply");
    assert_eq!(unknown, 0.0);
}

#[test]
fn listen_and_source_addresses_that_arrive_later_are_bound_when_they_do() {
    let Some(lab) = Lab::new("udp-late") else { return };
    let _echo = NodeEcho::start(&lab, Host::Node1);
    lab.add_logical(Host::Node1, true);
    let listen = Ipv4Addr::new(198, 18, 0, 50);
    let source = Ipv4Addr::new(198, 18, 0, 51);
    let sb = Staybound::start(
        &lab,
        &format!(
            "listen = \"{listen}:{PORT}\"\nsource = \"{source}\"\n[service.udp]\nreply_from = [\"198.18.0.0/24\"]\n"
        ),
    );
    assert_eq!(sb.metric("staybound_udp_listener_bound", &[]), 0.0, "nothing bound yet");
    let ready = sb.try_get("/readyz");
    assert!(ready.as_ref().is_err_and(|e| e.contains("not every listener is bound")), "{ready:?}");

    lab.exec(Host::Client, &["ip", "addr", "add", &format!("{listen}/24"), "dev", "eth0"]);
    wait_until("the listen address is bound once it appears", Duration::from_secs(10), || {
        sb.metric("staybound_udp_listener_bound", &[]) == 1.0
    });
    let client = connected(&lab, Host::Client, SocketAddr::V4(SocketAddrV4::new(listen, PORT)));
    client.send(b"early").unwrap();
    wait_until("a datagram that cannot leave from the source is counted", Duration::from_secs(5), || {
        sb.metric("staybound_udp_dropped_total", &[("reason", "no_flow")]) >= 1.0
    });

    lab.exec(Host::Client, &["ip", "addr", "add", &format!("{source}/24"), "dev", "eth0"]);
    // The source is tried again after a backoff of at most 5 s; until then datagrams are dropped, counted.
    let mut answered = (0, Vec::new());
    wait_until("flows are made once the source address appears", Duration::from_secs(10), || {
        answered = exchange(&client, 1, Duration::from_millis(300), "late");
        answered.0 == 1
    });
    let (n, _) = exchange(&client, 10, Duration::from_secs(2), "steady");
    let st = sb.status();
    let no_flow = sb.metric("staybound_udp_dropped_total", &[("reason", "no_flow")]);
    eprintln!(
        "UDP LAB late addresses: {n}/10 once both appeared; no_flow drops before {no_flow}; /status listen {}",
        st["listen"]
    );
    assert_eq!(n, 10);
    assert!(sb.try_get("/readyz").is_ok(), "ready once every listener is bound");
    // The echo names the peer it saw: the flow left from the source address.
    let mut buf = [0u8; 256];
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    client.send(b"who").unwrap();
    let len = client.recv(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..len]), format!("node1 {source} who"));
}

#[test]
fn a_source_address_that_leaves_the_host_is_no_failover() {
    let Some(lab) = Lab::new("udp-gone") else { return };
    let _echo = NodeEcho::start(&lab, Host::Node1);
    lab.add_logical(Host::Node1, true);
    let source = Ipv4Addr::new(198, 18, 0, 52);
    lab.exec(Host::Client, &["ip", "addr", "add", &format!("{source}/24"), "dev", "eth0"]);
    let sb = Staybound::start(
        &lab,
        &format!(
            "listen = \"127.0.0.1:{PORT}\"\nsource = \"{source}\"\n[service.udp]\nreply_from = [\"198.18.0.0/24\"]\n[service.probe]\nmode = \"send-expect\"\nsend = \"ping\"\nexpect = \"node1\"\ninterval = \"200ms\"\nfall = 2\n"
        ),
    );
    wait_until("the service is up", Duration::from_secs(5), || sb.status()["state"] == "up");
    // The source address leaves the host (its package moved elsewhere, or an operator took it away):
    // every probe's socket fails to bind to it (EADDRNOTAVAIL). The upstream did not move.
    lab.exec(Host::Client, &["ip", "addr", "del", &format!("{source}/24"), "dev", "eth0"]);
    // why: EADDRNOTAVAIL is errno 99, shown as "os error 99" (or "code: 99" in a build that logged it by Debug).
    let unsent = || {
        let log = lab.read_log(sb.pid);
        log.lines().filter(|l| l.contains("UDP probe") && (l.contains("os error 99") || l.contains("code: 99"))).count()
    };
    wait_until("four probes could not bind to the source", Duration::from_secs(10), || unsent() >= 4);
    let st = sb.status();
    eprintln!("UDP LAB source gone: {} probes not sent; state {} epoch {}", unsent(), st["state"], st["epoch"]);
    assert_eq!(st["epoch"], 1, "a source address gone from this host is no failover of the upstream: {st}");
    // It comes back: the probe reaches the host as before.
    lab.exec(Host::Client, &["ip", "addr", "add", &format!("{source}/24"), "dev", "eth0"]);
    let client = connected(&lab, Host::Client, SocketAddr::from(([127, 0, 0, 1], PORT)));
    let mut answered = (0, Vec::new());
    wait_until("flows are made again", Duration::from_secs(10), || {
        answered = exchange(&client, 1, Duration::from_millis(300), "back");
        answered.0 == 1
    });
    assert_eq!(sb.status()["epoch"], 1);
}
