//! An upstream given as a name is resolved again on every connect: when the name moves to another
//! address (DNS-based failover), new clients follow it. The name lives in the lab client namespace's own
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
