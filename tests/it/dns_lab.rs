//! An upstream given as a name is resolved again on every connect: when the name moves to another
//! address (DNS-based failover), new clients follow it, and a UDP flow follows it on a datagram at most a
//! second later. The name lives in the lab client namespace's own
//! hosts file (`ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts), or behind a name server the
//! test runs in the namespace. A resolver that stalls holds clients no longer than their deadline, and one
//! that stops answering is no failover: the last answer serves.

use crate::support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use support::lab::{Host, Lab};
use support::sidecar::{BIN, LISTEN, bin};
use support::wait::poll;

/// /etc/netns/NAME/, removed by exact name on drop.
struct NetnsEtc(PathBuf);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_hosts(path: &PathBuf, ip: Ipv4Addr) {
    // In place (same inode): the bind mount inside the namespace keeps seeing this file.
    std::fs::write(path, format!("127.0.0.1 localhost\n{ip} upstream.lab\n")).unwrap();
}

#[test]
fn a_name_moved_to_another_address_is_followed() {
    let Some(lab) = Lab::new("dns") else { return };
    lab.start_redis(Host::Node1);
    lab.start_redis(Host::Node2);
    let etc = NetnsEtc(PathBuf::from("/etc/netns").join(lab.ns_name(Host::Client)));
    std::fs::create_dir_all(&etc.0).unwrap();
    let hosts = etc.0.join("hosts");
    write_hosts(&hosts, Host::Node1.addr());

    let config = lab.dir().join("dns.toml");
    std::fs::write(
        &config,
        format!("[admin]\nlisten = \"127.0.0.1:9901\"\n[[service]]\nname = \"dns\"\nlisten = \"{LISTEN}\"\nupstream = \"upstream.lab:6379\"\n"),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    lab.spawn(Host::Client, &[BIN, "run", "--config", &config]);
    let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).unwrap();
    let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
    let via = || lab.redis_run_id(Host::Client, Ipv4Addr::LOCALHOST);
    assert!(poll(Duration::from_secs(10), || via().as_deref() == Some(node1.as_str())), "reaches node 1 by name");

    write_hosts(&hosts, Host::Node2.addr());
    let mut got = None;
    let followed = poll(Duration::from_secs(10), || {
        got = via();
        got.as_deref() == Some(node2.as_str())
    });
    assert!(followed, "a new client follows the name to node 2 (got {got:?})");
}

/// A UDP server in `host`'s namespace on 0.0.0.0:`port` that answers each datagram with `tag`, a colon and
/// the datagram.
fn udp_tagger(lab: &Lab, host: Host, port: u16, tag: &'static str) {
    let s = lab.in_ns(host, || std::net::UdpSocket::bind(("0.0.0.0", port))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut out = format!("{tag}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from);
        }
    });
}

#[test]
fn a_udp_flow_follows_a_name_to_its_new_address() {
    let Some(lab) = Lab::new("dnsudp") else { return };
    let etc = NetnsEtc(PathBuf::from("/etc/netns").join(lab.ns_name(Host::Client)));
    std::fs::create_dir_all(&etc.0).unwrap();
    let hosts = etc.0.join("hosts");
    write_hosts(&hosts, Host::Node1.addr());
    udp_tagger(&lab, Host::Node1, 5353, "node-1");
    udp_tagger(&lab, Host::Node2, 5353, "node-2");

    let config = lab.dir().join("dnsudp.toml");
    std::fs::write(
        &config,
        "[admin]\nlisten = \"127.0.0.1:9901\"\n[[service]]\nname = \"dgram\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:5353\"\nupstream = \"upstream.lab:5353\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    lab.spawn(Host::Client, &[BIN, "run", "--config", &config]);
    let c = lab.in_ns(Host::Client, || std::net::UdpSocket::bind("127.0.0.1:0")).unwrap();
    c.connect("127.0.0.1:5353").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let ask = |msg: &str| -> Option<String> {
        c.send(msg.as_bytes()).ok()?;
        let mut buf = [0u8; 2048];
        let n = c.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).to_string())
    };
    assert!(poll(Duration::from_secs(10), || ask("hello").as_deref() == Some("node-1:hello")), "reaches node 1");

    // The same flow keeps sending; the name moves.
    write_hosts(&hosts, Host::Node2.addr());
    let moved = std::time::Instant::now();
    let mut last = None;
    let followed = poll(Duration::from_secs(10), || {
        last = ask("again");
        last.as_deref() == Some("node-2:again")
    });
    let took = moved.elapsed();
    eprintln!("FIGURES a UDP flow followed its upstream name to the new address {took:?} after the name moved");
    assert!(followed, "the flow follows the name to node 2 (last answer {last:?})");
    assert!(took < Duration::from_secs(3), "within the 1 s lookup period and a margin: {took:?}");
}

/// Starts staybound in the client namespace with one TCP service to `upstream` and the given hold
/// settings; returns once its admin endpoint answers.
fn start_tcp(lab: &Lab, name: &str, upstream: &str, hold: &str) {
    let config = lab.dir().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("[admin]\nlisten = \"127.0.0.1:9901\"\n[[service]]\nname = \"{name}\"\nlisten = \"{LISTEN}\"\nupstream = \"{upstream}\"\n[service.hold]\n{hold}"),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    lab.spawn(Host::Client, &["env", "RUST_LOG=staybound=debug", &bin(), "run", "--config", &config]);
    let admin: std::net::SocketAddr = "127.0.0.1:9901".parse().unwrap();
    assert!(
        poll(Duration::from_secs(10), || lab.connect_tcp(Host::Client, admin, Duration::from_millis(200)).is_ok()),
        "staybound's admin endpoint answers"
    );
}

/// A redis PING through staybound's listener from the client namespace: the time it took, or why not.
fn ping_via(lab: &Lab) -> Result<Duration, String> {
    use std::io::{Read, Write};
    let t = std::time::Instant::now();
    let listen: std::net::SocketAddr = LISTEN.parse().unwrap();
    let mut s = lab.connect_tcp(Host::Client, listen, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    if buf[..n].starts_with(b"+PONG") { Ok(t.elapsed()) } else { Err(format!("reply {:?}", &buf[..n])) }
}

#[test]
fn a_name_whose_first_record_is_dead_is_proxied_to_the_next() {
    let Some(lab) = Lab::new("dnsdead") else { return };
    lab.start_redis(Host::Node1);
    let etc = NetnsEtc(PathBuf::from("/etc/netns").join(lab.ns_name(Host::Client)));
    std::fs::create_dir_all(&etc.0).unwrap();
    // 198.18.0.77 is on the lab's LAN and no host has it: a black hole (ARP unanswered), listed first.
    std::fs::write(
        etc.0.join("hosts"),
        format!("127.0.0.1 localhost\n198.18.0.77 upstream.lab\n{} upstream.lab\n", Host::Node1.addr()),
    )
    .unwrap();
    start_tcp(&lab, "dead", "upstream.lab:6379", "deadline = \"10s\"\n");
    let mut times = Vec::new();
    for _ in 0..5 {
        times.push(ping_via(&lab).expect("proxied to the live record"));
    }
    eprintln!(
        "FIGURES hosts file [dead, alive]: first request through staybound {:.3}s, then {:?}",
        times[0].as_secs_f64(),
        times[1..].iter().map(|t| format!("{:.1}ms", t.as_secs_f64() * 1000.0)).collect::<Vec<_>>()
    );
    // The dead record costs at most the first attempt's share; later connects go to the live one first.
    assert!(times[1..].iter().all(|t| *t < Duration::from_millis(500)), "{times:?}");
}

#[test]
fn a_stalled_resolver_refuses_held_clients_at_the_deadline_with_one_shared_lookup() {
    let Some(lab) = Lab::new("dnsstall") else { return };
    let etc = NetnsEtc(PathBuf::from("/etc/netns").join(lab.ns_name(Host::Client)));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(etc.0.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    std::fs::write(etc.0.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    // A name server that reads every query and never answers; it counts them.
    let dns = lab.in_ns(Host::Client, || std::net::UdpSocket::bind("127.0.0.1:53")).unwrap();
    let queries = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (dns, queries) = (dns.try_clone().unwrap(), queries.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while dns.recv_from(&mut buf).is_ok() {
                queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let deadline = Duration::from_secs(3);
    start_tcp(&lab, "stall", "stalled.lab:6379", "deadline = \"3s\"\n");
    let before = queries.load(std::sync::atomic::Ordering::Relaxed);
    let clients = 50;
    let t0 = std::time::Instant::now();
    let ended: Vec<_> = (0..clients)
        .map(|_| {
            let listen: std::net::SocketAddr = LISTEN.parse().unwrap();
            lab.connect_tcp(Host::Client, listen, Duration::from_secs(5)).expect("accepted")
        })
        .collect();
    let mut waits = Vec::new();
    for mut s in ended {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf);
        assert!(matches!(r, Ok(0) | Err(_)), "refused, not served: {r:?}");
        waits.push(t0.elapsed());
    }
    let asked = queries.load(std::sync::atomic::Ordering::Relaxed) - before;
    let last = *waits.iter().max().unwrap();
    eprintln!(
        "FIGURES a resolver that never answers: {clients} held clients refused after {:.3}s (deadline {:.0}s); the name server got {asked} queries",
        last.as_secs_f64(),
        deadline.as_secs_f64()
    );
    assert!(last <= deadline + Duration::from_secs(1), "refused at the deadline, not later: {last:?}");
    assert!(waits.iter().all(|w| *w >= deadline - Duration::from_millis(100)), "held until the deadline");
    // Queries for A and AAAA per shared lookup, a lookup per query timeout (2 s) or the detector's probe
    // timeout: a handful, not several per client (the C library's resolver sent 202 here).
    assert!(asked <= 25, "{asked} queries for {clients} clients");
}

/// A name server on 127.0.0.1:53 in `host`'s namespace. While `answering`, it answers every A query with
/// `ip` (TTL 1 s) and any other query with no records; then it reads queries and answers none. It counts
/// the queries.
fn name_server(
    lab: &Lab,
    host: Host,
    ip: Ipv4Addr,
    answering: std::sync::Arc<std::sync::atomic::AtomicBool>,
    queries: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let sock = lab.in_ns(host, || std::net::UdpSocket::bind("127.0.0.1:53")).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            queries.fetch_add(1, Relaxed);
            if !answering.load(Relaxed) || n < 12 {
                continue;
            }
            // The question: the name's labels up to the zero byte, then its type and class.
            let mut i = 12;
            while i < n && buf[i] != 0 {
                i += 1 + usize::from(buf[i]);
            }
            if i + 5 > n {
                continue;
            }
            let a = buf[i + 1..i + 3] == [0, 1];
            let mut r = Vec::with_capacity(n + 16);
            r.extend_from_slice(&buf[..2]); // the query's id
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(a), 0, 0, 0, 0]); // an answer, no error
            r.extend_from_slice(&buf[12..i + 5]);
            if a {
                // The name (a pointer to the question's), A, IN, TTL 1 s, four bytes of address.
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
                r.extend_from_slice(&ip.octets());
            }
            let _ = sock.send_to(&r, from);
        }
    });
}

#[test]
fn a_resolver_that_stops_answering_is_no_failover_and_the_last_answer_serves() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let Some(lab) = Lab::new("dnsdown") else { return };
    lab.start_redis(Host::Node1);
    lab.add_logical(Host::Node1, true);
    let etc = NetnsEtc(PathBuf::from("/etc/netns").join(lab.ns_name(Host::Client)));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(etc.0.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    std::fs::write(etc.0.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    let (answering, queries) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
    name_server(&lab, Host::Client, support::lab::LOGICAL, answering.clone(), queries.clone());
    start_tcp(
        &lab,
        "dnsdown",
        "db.lab:6379",
        "deadline = \"5s\"\n[service.probe]\nmode = \"connect\"\ninterval = \"200ms\"\nfall = 2\n",
    );
    let admin: std::net::SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let status = || -> serde_json::Value {
        let body = lab.in_ns(Host::Client, || staybound::status::fetch(admin, "/status")).unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()[0].clone()
    };
    let attempts = || -> f64 {
        let text = lab.in_ns(Host::Client, || staybound::status::fetch(admin, "/metrics")).unwrap();
        ["ok", "refused", "unreachable", "timeout", "reset", "addr_unavailable", "exhausted", "other"]
            .iter()
            .filter_map(|r| {
                let labels = [("service", "dnsdown"), ("result", *r)];
                support::proxy::metric_opt(&text, "staybound_upstream_connect_attempts_total", &labels)
            })
            .sum()
    };
    assert!(poll(Duration::from_secs(10), || status()["state"] == "up"), "up: {}", status());
    let listen: std::net::SocketAddr = LISTEN.parse().unwrap();
    let mut session = lab.connect_tcp(Host::Client, listen, Duration::from_secs(2)).unwrap();
    session.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ping = |s: &mut std::net::TcpStream| -> std::io::Result<()> {
        s.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf)?;
        assert_eq!(&buf, b"+PONG\r\n");
        Ok(())
    };
    ping(&mut session).unwrap();
    // The resolver stops answering. The answer's TTL is 1 s; after it, every probe (each 200 ms, plus the
    // lookup's own wait) asks again.
    answering.store(false, Relaxed);
    let (q0, a0) = (queries.load(Relaxed), attempts());
    assert!(
        poll(Duration::from_secs(30), || queries.load(Relaxed) >= q0 + 2 && attempts() >= a0 + 8.0),
        "the resolver was asked again and the probe tried 8 times"
    );
    let st = status();
    eprintln!(
        "FIGURES resolver silent: {} queries unanswered, {} connect attempts since; state {} epoch {}",
        queries.load(Relaxed) - q0,
        attempts() - a0,
        st["state"],
        st["epoch"]
    );
    assert_eq!(st["epoch"], 1, "a resolver that does not answer is no failover of the upstream: {st}");
    ping(&mut session).expect("the session made before is still served");
    // A new client is served too: the name's last answer serves while the resolver is silent.
    let t = std::time::Instant::now();
    let mut late = lab.connect_tcp(Host::Client, listen, Duration::from_secs(2)).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ping(&mut late).expect("a new client is served from the last answer");
    eprintln!("FIGURES a new client served in {:.0} ms while the resolver is silent", t.elapsed().as_secs_f64() * 1e3);
    drop(etc);
}
