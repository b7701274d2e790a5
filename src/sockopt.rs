//! Every socket option staybound sets or reads, on both legs of a TCP session (the accepted client socket and
//! the upstream socket), on listeners, and on UDP listen and upstream sockets, each with the reason it is set.
//! Options the kernel may refuse in some environments are applied best-effort with a warning; the ones a
//! session depends on fail.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use std::os::fd::{AsFd, AsRawFd};

use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use crate::config::KeepaliveConfig;

/// The socket mark of staybound's own upstream and probe sockets: the interception rules (`intercept`) let
/// their connections through.
pub const MARK: u32 = 0x5342;

/// Receive buffer asked of the kernel for a UDP listen socket (capped by `net.core.rmem_max`).
const UDP_LISTEN_RCVBUF: usize = 4 << 20;

/// A new non-blocking TCP socket for an upstream connect, bound to `source` when given, keep-alive set.
///
/// # Errors
/// Socket creation or option errors; a `source` that is not on this host fails with EADDRNOTAVAIL unless
/// `freebind`.
pub fn tcp_upstream_socket(
    peer: SocketAddr,
    source: Option<IpAddr>,
    freebind: bool,
    keepalive: &KeepaliveConfig,
) -> io::Result<TcpSocket> {
    // why: SOCK_NONBLOCK at creation saves a syscall per connect.
    let socket = Socket::new(Domain::for_address(peer), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if let Some(ip) = source {
        // why: the upstream (and a cluster that filters by client address) must see the relocatable
        // address, not this host's stationary one: bind() before connect().
        // why: IP_BIND_ADDRESS_NO_PORT lets connect() pick the port per 4-tuple, so one source address
        // can carry more than 28 000 sessions to different peers.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
        if freebind {
            set_freebind(&socket, ip)?;
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    set_keepalive(&SockRef::from(&socket), keepalive.idle, keepalive)?;
    if !keepalive.user_timeout.is_zero() {
        // why: a session with unacknowledged data to a node that vanished fails after this, not after the
        // kernel's ~15 minutes of retransmissions.
        socket.set_tcp_user_timeout(Some(keepalive.user_timeout))?;
    }
    // why: relayed bytes are already batched by the client; Nagle would only add latency.
    socket.set_tcp_nodelay(true)?;
    Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(socket)))
}

/// Marks an upstream or probe socket of an intercept service as staybound's own, so the interception rules
/// let its connection through instead of sending it back to staybound's listener (see `intercept`).
/// Best-effort: setting a mark needs `CAP_NET_ADMIN`; without it the rules must exempt staybound's user
/// (`staybound setup --exempt-uid`), which is said once in the log.
pub(crate) fn mark_own(socket: &TcpSocket) {
    static REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = SockRef::from(socket).set_mark(MARK)
        && !REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(error = %e, "cannot mark upstream sockets as staybound's own (SO_MARK needs CAP_NET_ADMIN): the interception rules must exempt staybound's user (staybound setup --exempt-uid), or its upstream connections come back to it");
    }
}

/// TCP keep-alive with the given idle time and the interval and count of `keepalive`.
pub(crate) fn set_keepalive(sock: &SockRef<'_>, idle: Duration, keepalive: &KeepaliveConfig) -> io::Result<()> {
    // why: an idle session never learns that the logical host moved unless something is sent; a
    // keep-alive probe draws the new node's RST.
    let ka = TcpKeepalive::new().with_time(idle).with_interval(keepalive.interval).with_retries(keepalive.count);
    sock.set_tcp_keepalive(&ka)
}

/// Gives a live upstream socket new keep-alive settings (idle, interval, count and TCP_USER_TIMEOUT), as
/// `tcp_upstream_socket` sets them on a new one.
pub(crate) fn retune(stream: &TcpStream, keepalive: &KeepaliveConfig) -> io::Result<()> {
    let sock = SockRef::from(stream);
    set_keepalive(&sock, keepalive.idle, keepalive)?;
    let user_timeout = (!keepalive.user_timeout.is_zero()).then_some(keepalive.user_timeout);
    sock.set_tcp_user_timeout(user_timeout)
}

/// Options for an accepted client socket; best effort, since the session works without them.
pub fn tune_client(stream: &TcpStream, keepalive: &KeepaliveConfig) {
    let sock = SockRef::from(stream);
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY on a client socket");
    }
    // why: "off" is set too, not left alone: an accepted socket inherits its listener's options, which a
    // reload may have turned off since the listener was tuned.
    let set = match keepalive.client_idle {
        // why: a client that crashed or was cut off would otherwise hold its session and upstream forever.
        Some(idle) => set_keepalive(&sock, idle, keepalive),
        None => sock.set_keepalive(false),
    };
    if let Err(e) = set {
        tracing::warn!(error = %e, "could not set keep-alive on a client socket");
    }
    // why: keep-alive probes wait while data is unacknowledged; a client that vanished with bytes in flight
    // to it would pin its session for the kernel's ~15 minutes of retransmissions.
    let user_timeout = (!keepalive.user_timeout.is_zero()).then_some(keepalive.user_timeout);
    if let Err(e) = sock.set_tcp_user_timeout(user_timeout) {
        tracing::warn!(error = %e, "could not set TCP_USER_TIMEOUT on a client socket");
    }
}

/// Sets on a listening socket the options `tune_client` sets on each accepted one: sockets it accepts
/// inherit them (Linux clones the listening socket at accept). Best effort, like `tune_client`: what the
/// listener has is read back by `tuned_as`.
fn tune_listener(sock: &SockRef<'_>, keepalive: &KeepaliveConfig) {
    let _ = sock.set_tcp_nodelay(true);
    if let Some(idle) = keepalive.client_idle {
        let _ = set_keepalive(sock, idle, keepalive);
    }
    if !keepalive.user_timeout.is_zero() {
        let _ = sock.set_tcp_user_timeout(Some(keepalive.user_timeout));
    }
}

/// Whether the sockets `listener` accepts have the client options of `keepalive` already (inherited from
/// it), so `tune_client` need not set them one by one.
pub(crate) fn tuned_as(listener: &TcpListener, keepalive: &KeepaliveConfig) -> bool {
    let Ok(got) = read_back(&SockRef::from(listener)) else { return false };
    let user_timeout = (!keepalive.user_timeout.is_zero()).then_some(keepalive.user_timeout);
    let keepalive_ok = match keepalive.client_idle {
        Some(idle) => {
            got.keepalive && got.idle == idle && got.interval == keepalive.interval && got.count == keepalive.count
        }
        None => !got.keepalive,
    };
    got.nodelay && keepalive_ok && got.user_timeout == user_timeout
}

/// Ends a session's socket with RST instead of FIN when the stream is dropped.
pub(crate) fn reset_on_close(stream: &TcpStream) {
    // why: SO_LINGER 0 makes close() send RST; a legacy client blocked in read() gets ECONNRESET at once,
    // the same error it would have seen talking to the moved host directly.
    if let Err(e) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "could not set SO_LINGER 0");
    }
}

/// Lets `socket` bind `ip` before the address is on this host (IP_FREEBIND / IPV6_FREEBIND): the
/// relocatable address may arrive after staybound starts, and arrives again at each failback.
///
/// # Errors
/// The option cannot be set.
pub(crate) fn set_freebind(socket: &Socket, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(_) => socket.set_freebind_v4(true),
        IpAddr::V6(_) => socket.set_freebind_v6(true),
    }
}

/// A listening TCP socket with the given backlog, with the client options of `keepalive` set before it
/// listens (see `tune_listener`).
///
/// # Errors
/// Bind or listen failures (address in use, address not on this host without `freebind`).
pub(crate) fn tcp_listener(
    addr: SocketAddr,
    backlog: u32,
    freebind: bool,
    keepalive: &KeepaliveConfig,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    // why: a restart must not wait for TIME_WAIT sessions of the previous process.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if freebind {
        set_freebind(&socket, addr.ip())?;
    }
    socket.bind(&addr.into())?;
    tune_listener(&SockRef::from(&socket), keepalive);
    // why: after a failover every held client comes back at once; a small backlog would drop SYNs.
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(std::net::TcpListener::from(socket))
}

/// Applies a reload's `backlog` and `freebind` to a listening socket that stays bound: listen() again on a
/// listening socket only changes its backlog (Linux applies it at once, queued connections stay), and
/// IP_FREEBIND is set or cleared (it matters to a bind, so the socket reads back what the config says and a
/// successor process binding anew gets the same).
///
/// # Errors
/// The option or the listen() call fails.
pub(crate) fn retune_listener(sock: &SockRef<'_>, ip: IpAddr, backlog: Option<u32>, freebind: bool) -> io::Result<()> {
    match ip {
        IpAddr::V4(_) => sock.set_freebind_v4(freebind)?,
        IpAddr::V6(_) => sock.set_freebind_v6(freebind)?,
    }
    if let Some(backlog) = backlog {
        sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    }
    Ok(())
}

/// A new UDP upstream socket for `peer`: bound to `source` (with IP_FREEBIND when `freebind`), else to the
/// wildcard of the peer's family; not connected. Must run inside a tokio runtime.
///
/// # Errors
/// Socket errors; a `source` that is not on this host fails with EADDRNOTAVAIL unless `freebind`.
pub(crate) fn udp_upstream_socket(peer: SocketAddr, source: Option<IpAddr>, freebind: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    let bind_ip = match source {
        Some(ip) => {
            if freebind {
                set_freebind(&socket, ip)?;
            }
            ip
        }
        None if peer.is_ipv4() => IpAddr::from([0u8; 4]),
        None => {
            socket.set_only_v6(true)?;
            IpAddr::from([0u16; 8])
        }
    };
    // why: the upstream (and a cluster that filters by client address) must see the relocatable address, not
    // this host's stationary one. Not connected: a reply from a node's stationary address must still arrive.
    socket.bind(&SocketAddr::new(bind_ip, 0).into())?;
    UdpSocket::from_std(std::net::UdpSocket::from(socket))
}

/// A bound UDP listen socket (with IP_FREEBIND when `freebind`), non-blocking, not yet set up for
/// IP_PKTINFO (see `udp::pktinfo`).
///
/// # Errors
/// Socket creation, option and bind errors; an address not on this host fails with EADDRNOTAVAIL unless
/// `freebind`.
pub(crate) fn udp_listen_socket(addr: SocketAddr, freebind: bool) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    if addr.is_ipv6() {
        // why: `[::]` takes only IPv6; IPv4 clients are served by an explicit `0.0.0.0` listener, so every
        // local address we answer from is of the socket's own family (no v4-mapped sources).
        socket.set_only_v6(true)?;
    }
    if freebind {
        set_freebind(&socket, addr.ip())?;
    }
    if let Err(e) = socket.set_recv_buffer_size(UDP_LISTEN_RCVBUF) {
        // why: a burst of client datagrams waits here while the relay catches up.
        tracing::debug!(error = %e, "could not enlarge SO_RCVBUF of a UDP listen socket");
    }
    socket.bind(&addr.into())?;
    Ok(std::net::UdpSocket::from(socket))
}

/// Turns UDP_GRO off on a listen socket, so every receive is one datagram.
///
/// # Errors
/// The kernel refused (an old kernel without UDP_GRO).
pub(crate) fn udp_gro_off(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::UdpGroSegment, &false).map_err(io::Error::from)
}

/// quinn-udp sets what QUIC wants and a generic relay must not have: path-MTU "probe" mode with DF set
/// (IP_MTU_DISCOVER / IPV6_MTU_DISCOVER = PROBE, IPV6_DONTFRAG = 1), so a reply larger than the path MTU
/// fails with EMSGSIZE instead of being fragmented. Put the kernel's defaults back.
pub(crate) fn undo_quic_defaults(sock: &UdpSocket, v6: bool) -> io::Result<()> {
    if v6 {
        set_int_option(sock, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_WANT)?;
        // The IPv4-level option quinn-udp also sets on IPv6 sockets concerns only v4-mapped traffic, which
        // `only_v6` rules out.
        nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::Ipv6DontFrag, &false).map_err(io::Error::from)
    } else {
        // The IPv4 default follows net.ipv4.ip_no_pmtu_disc (see the kernel's `inet_create`).
        let no_pmtu_disc = std::fs::read_to_string("/proc/sys/net/ipv4/ip_no_pmtu_disc")
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|v| v != 0);
        let default = if no_pmtu_disc { libc::IP_PMTUDISC_DONT } else { libc::IP_PMTUDISC_WANT };
        set_int_option(sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, default)
    }
}

/// `setsockopt(fd, level, name, &value, sizeof(int))`: for the integer options neither socket2 nor nix exposes
/// (IP_MTU_DISCOVER, IPV6_MTU_DISCOVER).
#[allow(unsafe_code)]
fn set_int_option(sock: &impl AsFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let fd = sock.as_fd();
    // SAFETY: `fd` is a live socket borrowed from `sock` for the whole call (`BorrowedFd` cannot outlive it).
    // The option value is a `c_int` on our stack, passed by pointer with its exact size, and the kernel only
    // reads `optlen` bytes from it; nothing is retained after the call returns.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The original destination of an accepted connection (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST), `None` when
/// the connection has no NAT record.
pub(crate) fn original_dst(stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).ok().map(|a| {
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            SocketAddr::from((ip, u16::from_be(a.sin_port)))
        }),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst).ok().map(|a| {
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            SocketAddr::from((ip, u16::from_be(a.sin6_port)))
        }),
    }
}

/// The kernel's count of keep-alive and data state for a live socket, read back for tests and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBack {
    pub keepalive: bool,
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    pub user_timeout: Option<Duration>,
    pub nodelay: bool,
}

/// Reads the options back with getsockopt.
///
/// # Errors
/// getsockopt failures.
pub fn read_back(sock: &SockRef<'_>) -> io::Result<ReadBack> {
    Ok(ReadBack {
        keepalive: sock.keepalive()?,
        idle: sock.tcp_keepalive_time()?,
        interval: sock.tcp_keepalive_interval()?,
        count: sock.tcp_keepalive_retries()?,
        user_timeout: sock.tcp_user_timeout()?,
        nodelay: sock.tcp_nodelay()?,
    })
}

/// Milliseconds since the last ACK from the peer (`tcpi_last_ack_recv`), to date the last good sign of a
/// probe connection.
#[allow(unsafe_code)]
pub(crate) fn last_ack_age(stream: &TcpStream) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    // SAFETY: TCP_INFO fills at most `len` bytes of a `tcp_info` that we own, zero-initialised (all of its
    // fields are plain integers, so zero is a valid value); `len` is its exact size and the kernel writes
    // back how much it filled. `fd` is a live socket borrowed from `stream` for the duration of the call.
    // Neither socket2 nor nix exposes TCP_INFO.
    let info = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len);
        if rc != 0 {
            return None;
        }
        info
    };
    Some(Duration::from_millis(u64::from(info.tcpi_last_ack_recv)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Client options of every kind: keep-alive after 7 s, every 2 s, 4 probes; a 2.5 s user timeout.
    fn client_keepalive() -> KeepaliveConfig {
        KeepaliveConfig {
            idle: Duration::from_secs(1),
            interval: Duration::from_secs(2),
            count: 4,
            user_timeout: Duration::from_millis(2500),
            client_idle: Some(Duration::from_secs(7)),
        }
    }

    /// What a client socket tuned with `client_keepalive` reads back.
    fn tuned_client() -> ReadBack {
        ReadBack {
            keepalive: true,
            idle: Duration::from_secs(7),
            interval: Duration::from_secs(2),
            count: 4,
            user_timeout: Some(Duration::from_millis(2500)),
            nodelay: true,
        }
    }

    #[tokio::test]
    async fn accepted_client_sockets_get_keepalive_and_the_user_timeout() {
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = TcpListener::from_std(plain.into_std().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let ka = client_keepalive();
        tune_client(&accepted, &ka);
        let got = read_back(&SockRef::from(&accepted)).unwrap();
        assert_eq!(got, tuned_client());
        let _other = std::net::TcpStream::connect(addr).unwrap();
        let (plain, _) = listener.accept().await.unwrap();
        tune_client(&plain, &KeepaliveConfig { user_timeout: Duration::ZERO, client_idle: None, ..ka });
        let got = read_back(&SockRef::from(&plain)).unwrap();
        assert_eq!((got.keepalive, got.user_timeout), (false, None), "\"0s\" and \"off\" leave them unset");
    }

    /// The kernel decides: sockets accepted from a listener tuned at bind carry its options with no call of
    /// their own, and `tuned_as` says so; a listener bound elsewhere (an older process's) is not taken as
    /// tuned.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_options_of_a_tuned_listener() {
        let ka = client_keepalive();
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false, &ka).unwrap();
        assert!(tuned_as(&listener, &ka));
        let other = KeepaliveConfig { client_idle: Some(Duration::from_secs(8)), ..ka.clone() };
        assert!(!tuned_as(&listener, &other), "another client_idle is not what the listener has");
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let got = read_back(&SockRef::from(&accepted)).unwrap();
        assert_eq!(got, tuned_client());
        let off = KeepaliveConfig { user_timeout: Duration::ZERO, client_idle: None, ..ka };
        let bare = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false, &off).unwrap();
        assert!(tuned_as(&bare, &off), "\"off\" and \"0s\": nothing to set but no-delay");
        let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(!tuned_as(&elsewhere, &off), "no no-delay on a listener bound without it");
    }
}
