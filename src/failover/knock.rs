//! Asks the node behind the upstream address whether it still holds the probe session, without waiting
//! for the session's next keep-alive: a bare SYN from the session's own address and port, sent on a raw
//! socket.
//!
//! The node that holds the session answers a SYN on it with a challenge ACK (RFC 5961 4.2), which the
//! session takes as a fresh ACK. Any other node has no such session: it answers with a SYN-ACK (or a RST),
//! the local kernel answers that with a challenge ACK of its own, and the other node's reset to that
//! carries exactly the sequence number the session expects, so the session is reset. Either way the
//! detector learns within a round trip or three which node the address now reaches, which is what a
//! neighbour change needs confirmed before it ends anything.
//!
//! Needs `CAP_NET_RAW`; without it the detector waits for the keep-alive instead.

use std::io;
use std::net::{IpAddr, SocketAddr};

use etherparse::TcpHeader;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::oserror::{self, OsError};

/// The receive window advertised in the knock; any value does.
const WINDOW: u16 = 1024;

/// The TCP header of a bare SYN from `local` to `peer` with sequence number `seq`, checksummed for the
/// IP pseudo-header of those addresses. `None` when the two are of different families.
pub(crate) fn syn_segment(local: SocketAddr, peer: SocketAddr, seq: u32) -> Option<Vec<u8>> {
    let mut h = TcpHeader::new(local.port(), peer.port(), seq, WINDOW);
    h.syn = true;
    h.checksum = match (local.ip(), peer.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), &[]).ok()?,
        (IpAddr::V6(s), IpAddr::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), &[]).ok()?,
        _ => return None,
    };
    Some(h.to_bytes().to_vec())
}

/// Why a knock was not sent.
#[derive(Debug)]
pub(crate) enum KnockError {
    /// No raw socket for this process: it lacks `CAP_NET_RAW`. It will not have it later either.
    NotPermitted(io::Error),
    /// This knock failed; the next may not. A firewall that drops the packet on its way out makes the send
    /// fail with EPERM too, which says nothing of the capability.
    Failed(io::Error),
}

/// Sends one knock on the session from `local` to `peer`.
pub(crate) fn knock(local: SocketAddr, peer: SocketAddr) -> Result<(), KnockError> {
    let segment = syn_segment(local, peer, fastrand::u32(..)).ok_or_else(|| {
        KnockError::Failed(io::Error::new(io::ErrorKind::InvalidInput, "addresses of different families"))
    })?;
    let domain = if peer.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    // why: a raw TCP socket receives a copy of every TCP segment the host gets while it is open; it lives
    // for one send and is closed when this returns.
    let raw = Socket::new(domain, Type::RAW, Some(Protocol::TCP)).map_err(|e| match oserror::kind(&e) {
        OsError::NotPermitted => KnockError::NotPermitted(e),
        _ => KnockError::Failed(e),
    })?;
    // The kernel writes the IP header; binding picks the session's own source address for it.
    raw.bind(&SockAddr::from(SocketAddr::new(local.ip(), 0))).map_err(KnockError::Failed)?;
    raw.send_to(&segment, &SockAddr::from(SocketAddr::new(peer.ip(), 0))).map_err(KnockError::Failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(local: SocketAddr, peer: SocketAddr) {
        let bytes = syn_segment(local, peer, 0xdead_beef).unwrap();
        let (h, rest) = TcpHeader::from_slice(&bytes).unwrap();
        assert!(rest.is_empty());
        assert!(h.syn && !h.ack && !h.rst && !h.fin);
        assert_eq!((h.source_port, h.destination_port, h.sequence_number), (local.port(), peer.port(), 0xdead_beef));
        let sum = match (local.ip(), peer.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), &[]).unwrap(),
            (IpAddr::V6(s), IpAddr::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), &[]).unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(h.checksum, sum);
        assert_ne!(h.checksum, 0);
    }

    #[test]
    fn a_knock_is_a_bare_checksummed_syn_of_the_session() {
        check("198.18.0.1:40000".parse().unwrap(), "198.18.0.10:6379".parse().unwrap());
        check("[2001:2::1]:40000".parse().unwrap(), "[2001:2::a]:6379".parse().unwrap());
        assert!(syn_segment("198.18.0.1:1".parse().unwrap(), "[2001:2::a]:1".parse().unwrap(), 0).is_none());
    }

    /// On loopback (the raw socket needs CAP_NET_RAW): a knock on a live session draws the peer's
    /// challenge ACK and the session survives: a byte sent after it still arrives.
    #[test]
    fn a_knock_on_a_live_session_keeps_it() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        match knock(client.local_addr().unwrap(), client.peer_addr().unwrap()) {
            Err(KnockError::NotPermitted(_)) => {
                eprintln!("SKIP: no CAP_NET_RAW for the knock test");
                return;
            }
            r => r.unwrap(),
        }
        // The challenge ACK travels before the byte on the same path; a reset would fail the read.
        server.write_all(b"x").unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        let r = (&client).read(&mut buf);
        assert!(matches!(r, Ok(1)) && buf == *b"x", "session alive: {r:?}");
    }
}
