//! Fuzzes the UDP flow path's decisions:
//! * `udp::datagrams(data, stride)`: the datagrams of a coalesced (GRO) receive buffer put back together
//!   are exactly the buffer, none is longer than the stride, and only the last may be shorter;
//! * `UdpConfig::is_reply(from, peer)`: agrees with a reference built from first principles (the
//!   upstream's own address and port, or an address inside one of the `reply_from` blocks), and a block of
//!   prefix 0 takes every address of its family.
//!
//! Must never panic. Input: the arbitrary-derived `Case` below.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use staybound::config::{IpNet, UdpConfig};
use staybound::udp::datagrams;

#[derive(Debug, Arbitrary)]
struct Addr {
    v6: bool,
    bytes: [u8; 16],
    port: u16,
}

impl Addr {
    fn ip(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.bytes))
        } else {
            IpAddr::V4(Ipv4Addr::new(self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]))
        }
    }
    fn sock(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port)
    }
}

#[derive(Debug, Arbitrary)]
struct Case {
    data: Vec<u8>,
    stride: u16,
    from: Addr,
    peer: Addr,
    nets: Vec<(Addr, u8)>,
}

/// Whether `ip` is inside `net`, bit by bit.
fn inside(net: &IpNet, ip: IpAddr) -> bool {
    let (a, b, bits): (Vec<u8>, Vec<u8>, u32) = match (net.addr, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (n.octets().to_vec(), i.octets().to_vec(), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (n.octets().to_vec(), i.octets().to_vec(), 128),
        _ => return false,
    };
    (0..u32::from(net.prefix).min(bits)).all(|k| {
        let (byte, bit) = ((k / 8) as usize, 7 - (k % 8));
        (a[byte] >> bit) & 1 == (b[byte] >> bit) & 1
    })
}

fuzz_target!(|case: Case| {
    let stride = usize::from(case.stride);
    let parts: Vec<&[u8]> = datagrams(&case.data, stride).collect();
    assert_eq!(parts.concat(), case.data, "the datagrams are the buffer, in order");
    if stride > 0 && stride <= case.data.len() {
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len() <= stride);
            if i + 1 < parts.len() {
                assert_eq!(p.len(), stride, "only the last datagram may be shorter");
            }
        }
    }

    let nets: Vec<IpNet> = case
        .nets
        .iter()
        .take(16)
        .map(|(a, prefix)| {
            let max = if a.v6 { 128 } else { 32 };
            IpNet { addr: a.ip(), prefix: prefix % (max + 1) }
        })
        .collect();
    let from = case.from.sock();
    let peer = case.peer.sock();
    let want = from == peer || nets.iter().any(|n| inside(n, from.ip()));
    let is_reply = |reply_from: Vec<IpNet>| {
        UdpConfig { reply_from, flow_idle: Duration::from_secs(1), max_flows: 1, max_flows_per_source: 1 }
            .is_reply(from, peer)
    };
    for n in &nets {
        if n.prefix == 0 && n.addr.is_ipv4() == from.ip().is_ipv4() {
            assert!(is_reply(vec![*n]));
        }
    }
    assert_eq!(is_reply(nets.clone()), want, "from {from} peer {peer} nets {nets:?}");
});
