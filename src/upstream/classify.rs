//! The one place raw OS errors are inspected: a connect or session error becomes a `ConnectClass`, a closed
//! set that metrics label with and that the retry policy and the detector branch on.

use std::io;

/// How a connect attempt ended; the `result` label of `staybound_upstream_connect_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectClass {
    Ok,
    /// The host answered with RST: the address is up, the port is not (a service still starting).
    Refused,
    /// No route, or the neighbour did not answer: the address is not up anywhere.
    Unreachable,
    /// Nothing answered within the connect timeout.
    Timeout,
    Reset,
    /// The `source` address is not on this host (bind failed).
    AddrUnavailable,
    Other,
}

impl ConnectClass {
    pub const ALL: [ConnectClass; 7] = [
        ConnectClass::Ok,
        ConnectClass::Refused,
        ConnectClass::Unreachable,
        ConnectClass::Timeout,
        ConnectClass::Reset,
        ConnectClass::AddrUnavailable,
        ConnectClass::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectClass::Ok => "ok",
            ConnectClass::Refused => "refused",
            ConnectClass::Unreachable => "unreachable",
            ConnectClass::Timeout => "timeout",
            ConnectClass::Reset => "reset",
            ConnectClass::AddrUnavailable => "addr_unavailable",
            ConnectClass::Other => "other",
        }
    }

    /// Whether the logical host's address answered (on whichever node), though the connect failed.
    pub fn address_answered(self) -> bool {
        matches!(self, ConnectClass::Ok | ConnectClass::Refused | ConnectClass::Reset)
    }
}

/// Classifies an OS error from connect(), bind() or an established session.
pub fn classify(err: &io::Error) -> ConnectClass {
    use io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused => return ConnectClass::Refused,
        K::TimedOut => return ConnectClass::Timeout,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => return ConnectClass::Reset,
        K::AddrNotAvailable => return ConnectClass::AddrUnavailable,
        K::HostUnreachable | K::NetworkUnreachable => return ConnectClass::Unreachable,
        _ => {}
    }
    match err.raw_os_error() {
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN) => ConnectClass::Unreachable,
        Some(libc::ETIMEDOUT) => ConnectClass::Timeout,
        Some(libc::ECONNREFUSED) => ConnectClass::Refused,
        Some(libc::ECONNRESET | libc::EPIPE) => ConnectClass::Reset,
        Some(libc::EADDRNOTAVAIL) => ConnectClass::AddrUnavailable,
        _ => ConnectClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify(&e(libc::ECONNREFUSED)), ConnectClass::Refused);
        assert_eq!(classify(&e(libc::EHOSTUNREACH)), ConnectClass::Unreachable);
        assert_eq!(classify(&e(libc::ENETUNREACH)), ConnectClass::Unreachable);
        assert_eq!(classify(&e(libc::ETIMEDOUT)), ConnectClass::Timeout);
        assert_eq!(classify(&e(libc::ECONNRESET)), ConnectClass::Reset);
        assert_eq!(classify(&e(libc::EADDRNOTAVAIL)), ConnectClass::AddrUnavailable);
        assert_eq!(classify(&e(libc::EACCES)), ConnectClass::Other);
    }
}
