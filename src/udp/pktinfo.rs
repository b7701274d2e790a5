//! The client-facing socket of one UDP listen address. It tells, for every datagram, which local address the
//! client sent it to, and sends the reply from exactly that address (IP_PKTINFO / IPV6_PKTINFO), so a client
//! of a wildcard listener is answered from the relocatable address it used, not from the host's stationary
//! one (its socket options are set in `sockopt`). Flows and their upstream sockets live in `flow`.
//!
//! Why quinn-udp rather than nix `recvmsg`/`sendmsg` with `ControlMessageOwned::Ipv4PacketInfo`: both are
//! free of `unsafe` on our side for the cmsgs, but nix's `sendmsg` allocates a `Vec` for the control buffer on
//! every call (one allocation per reply on the hot path), and the IPv6 path and the cmsg sizing would be ours
//! to write. quinn-udp encodes and decodes both families into stack buffers, receives in batches (recvmmsg),
//! and is run by quinn and Firefox. Its QUIC defaults are undone here (see `ClientSocket::bind`).

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::sockopt;

/// The largest UDP payload (IPv6 jumbograms aside); every receive buffer holds one.
pub(crate) const MAX_DATAGRAM: usize = 65_535;

/// A bound listen socket that knows where each datagram was sent to.
#[derive(Debug)]
pub struct ClientSocket {
    sock: UdpSocket,
    state: UdpSocketState,
    local: SocketAddr,
    /// Datagrams one receive buffer may hold: 1, unless GRO could not be turned off.
    gro_segments: usize,
}

impl ClientSocket {
    /// Binds `addr` (with IP_FREEBIND when `freebind`) and sets the socket up to report and to choose the
    /// local address of each datagram. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// Socket creation, option and bind errors; an address not on this host fails with EADDRNOTAVAIL unless
    /// `freebind`.
    pub fn bind(addr: SocketAddr, freebind: bool) -> io::Result<ClientSocket> {
        ClientSocket::set_up(sockopt::udp_listen_socket(addr, freebind)?)
    }

    /// Takes a listen socket bound by another process (an upgrade's predecessor) and sets it up as `bind`
    /// does. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// Option errors.
    pub fn inherited(sock: std::net::UdpSocket) -> io::Result<ClientSocket> {
        sock.set_nonblocking(true)?;
        ClientSocket::set_up(sock)
    }

    fn set_up(sock: std::net::UdpSocket) -> io::Result<ClientSocket> {
        let addr = sock.local_addr()?;
        let sock = UdpSocket::from_std(sock)?;
        // Sets IP_PKTINFO / IPV6_RECVPKTINFO (what we want), and QUIC's defaults undone below.
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        sockopt::undo_quic_defaults(&sock, addr.is_ipv6())?;
        // why: with UDP_GRO on, one receive may return up to 64 coalesced datagrams, which needs a 4 MiB
        // buffer per socket; off, every receive is one datagram. If it cannot be turned off, it was never on
        // (old kernel) or we split by `stride` with a buffer sized for it.
        let gro_segments = match sockopt::udp_gro_off(&sock) {
            Ok(()) => 1,
            Err(_) => state.gro_segments().max(1),
        };
        let local = sock.local_addr()?;
        Ok(ClientSocket { sock, state, local, gro_segments })
    }

    /// The socket itself, for socket options (a reload's `freebind`) and a handover to another process.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The bound address (port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether it listens on 0.0.0.0 or `::`, so that replies must name their source address.
    pub(crate) fn is_wildcard(&self) -> bool {
        self.local.ip().is_unspecified()
    }

    /// How many datagrams one receive buffer may hold (see `RecvMeta::stride`).
    pub(crate) fn gro_segments(&self) -> usize {
        self.gro_segments
    }

    /// Waits until a datagram may be waiting.
    pub async fn readable(&self) -> io::Result<()> {
        self.sock.readable().await
    }

    /// Waits until a send may succeed.
    pub(crate) async fn writable(&self) -> io::Result<()> {
        self.sock.writable().await
    }

    /// Receives up to `bufs.len()` datagrams (or GRO batches) without waiting; `meta[i]` describes `bufs[i]`.
    ///
    /// # Errors
    /// `WouldBlock` when nothing is queued; socket errors.
    pub fn try_recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.sock.try_io(Interest::READABLE, || self.state.recv(UdpSockRef::from(&self.sock), bufs, meta))
    }

    /// Sends one datagram to `to` from `from` (the local address the client used; `None` lets the kernel
    /// choose, which is right for a listener bound to one address), without waiting.
    ///
    /// # Errors
    /// `WouldBlock` when the send buffer is full; EINVAL when `from` is no longer on this host; others.
    pub(crate) fn try_send(&self, to: SocketAddr, from: Option<IpAddr>, data: &[u8]) -> io::Result<()> {
        let transmit = Transmit { destination: to, ecn: None, contents: data, segment_size: None, src_ip: from };
        self.sock.try_io(Interest::WRITABLE, || self.state.try_send(UdpSockRef::from(&self.sock), &transmit))
    }

    /// The source address a reply to a datagram sent to `dst` must carry.
    pub(crate) fn reply_source(&self, dst: Option<IpAddr>) -> Option<IpAddr> {
        match dst {
            // why: a datagram to a multicast group is answered from a unicast address the kernel picks.
            Some(ip) if self.is_wildcard() && !ip.is_multicast() && !is_v4_broadcast(ip) => Some(ip),
            _ => None,
        }
    }
}

fn is_v4_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quic_defaults_are_undone_and_pktinfo_stays() -> Result<(), Box<dyn std::error::Error>> {
        use nix::sys::socket::{getsockopt, sockopt};
        let s = ClientSocket::bind("127.0.0.1:0".parse()?, false)?;
        assert!(getsockopt(&s.sock, sockopt::Ipv4PacketInfo)?, "IP_PKTINFO is on");
        assert!(!getsockopt(&s.sock, sockopt::UdpGroSegment)?, "UDP_GRO is off");
        assert_eq!(s.gro_segments(), 1);
        // (No IPv6 loopback here is no failure.)
        if let Ok(v6) = ClientSocket::bind("[::1]:0".parse()?, false) {
            assert!(!getsockopt(&v6.sock, sockopt::Ipv6DontFrag)?, "IPV6_DONTFRAG is off");
        }
        Ok(())
    }
}
