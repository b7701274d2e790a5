//! An upstream given as a name is resolved again on every connect: when the name moves to another
//! address (DNS-based failover), new clients follow it, and a UDP flow follows it on a datagram at most a
//! second later. The name lives in the lab client namespace's own
//! hosts file (`ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts).

mod support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use support::lab::{Host, Lab, poll};
use support::sidecar::{BIN, LISTEN};

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
