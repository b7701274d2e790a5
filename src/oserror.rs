//! The one place raw OS errors are inspected. `kind` sorts an `io::Error` into an `OsError`, a closed set the
//! rest of staybound branches on (accept loops, UDP binds and sends, sock_diag, the retry policy, the
//! detector); `ConnectClass` is its coarser view, the `result` label of a connect attempt.

use std::io;

use crate::label::label_enum;

label_enum! {
    /// How a connect attempt ended; the `result` label of `staybound_upstream_connect_attempts_total`.
    pub enum ConnectClass {
        Ok = "ok",
        /// The host answered with RST: the address is up, the port is not (a service still starting).
        Refused = "refused",
        /// No route, or the neighbour did not answer: the address is not up anywhere.
        Unreachable = "unreachable",
        /// Nothing answered within the connect timeout.
        Timeout = "timeout",
        Reset = "reset",
        /// This host has no local address or port for the attempt: the `source` address is not on it (bind
        /// failed), or every ephemeral port toward the upstream is in use (connect failed). Says nothing of
        /// the upstream.
        AddrUnavailable = "addr_unavailable",
        /// This process or host is out of descriptors, memory or buffers (EMFILE, ENFILE, ENOMEM, ENOBUFS).
        /// Says nothing of the upstream.
        Exhausted = "exhausted",
        Other = "other",
    }
}

impl ConnectClass {
    /// Whether the logical host's address answered (on whichever node), though the connect failed.
    pub(crate) fn address_answered(self) -> bool {
        matches!(self, ConnectClass::Ok | ConnectClass::Refused | ConnectClass::Reset)
    }

    /// Whether this host could not make the attempt at all (no local port, address, descriptor or memory):
    /// the attempt says nothing of the upstream.
    pub(crate) fn local(self) -> bool {
        matches!(self, ConnectClass::AddrUnavailable | ConnectClass::Exhausted)
    }
}

/// What an OS error means to staybound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OsError {
    /// ECONNREFUSED: the host answered with RST (TCP) or ICMP port unreachable (a connected UDP socket).
    Refused,
    /// No route, or the neighbour did not answer: the address is not up anywhere.
    Unreachable,
    TimedOut,
    /// ECONNRESET, EPIPE: the peer reset the session.
    Reset,
    /// ECONNABORTED: this host aborted the session (a destroyed socket, an accept of a dead connection).
    Aborted,
    /// EADDRNOTAVAIL: the local address is not on this host, or no local port is left for the destination.
    AddrUnavailable,
    /// EMFILE, ENFILE, ENOBUFS, ENOMEM: out of descriptors or memory; the same call fails again at once.
    Exhausted,
    /// EPERM, EACCES: refused by a capability check, or by a firewall rule on a packet's way out.
    NotPermitted,
    /// EOPNOTSUPP: the kernel does not have the feature.
    NotSupported,
    /// ENOENT: what was asked for no longer exists.
    NotFound,
    /// EINVAL: an argument the kernel refuses (for a send: a source address no longer on this host).
    Invalid,
    /// EMSGSIZE: a datagram larger than the path allows.
    TooLarge,
    Other,
}

/// Sorts an OS error; the only function that reads an errno.
pub fn kind(err: &io::Error) -> OsError {
    use io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused => return OsError::Refused,
        K::TimedOut => return OsError::TimedOut,
        K::ConnectionReset | K::BrokenPipe => return OsError::Reset,
        K::ConnectionAborted => return OsError::Aborted,
        K::AddrNotAvailable => return OsError::AddrUnavailable,
        K::HostUnreachable | K::NetworkUnreachable => return OsError::Unreachable,
        _ => {}
    }
    match err.raw_os_error() {
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN) => OsError::Unreachable,
        Some(libc::ETIMEDOUT) => OsError::TimedOut,
        Some(libc::ECONNREFUSED) => OsError::Refused,
        Some(libc::ECONNRESET | libc::EPIPE) => OsError::Reset,
        Some(libc::ECONNABORTED) => OsError::Aborted,
        Some(libc::EADDRNOTAVAIL) => OsError::AddrUnavailable,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => OsError::Exhausted,
        Some(libc::EPERM | libc::EACCES) => OsError::NotPermitted,
        Some(libc::EOPNOTSUPP) => OsError::NotSupported,
        Some(libc::ENOENT) => OsError::NotFound,
        Some(libc::EINVAL) => OsError::Invalid,
        Some(libc::EMSGSIZE) => OsError::TooLarge,
        _ => OsError::Other,
    }
}

/// Classifies an OS error from connect(), bind() or an established session, for the connect metrics, the
/// retry policy and the detector.
pub fn classify(err: &io::Error) -> ConnectClass {
    match kind(err) {
        OsError::Refused => ConnectClass::Refused,
        OsError::Unreachable => ConnectClass::Unreachable,
        OsError::TimedOut => ConnectClass::Timeout,
        OsError::Reset | OsError::Aborted => ConnectClass::Reset,
        OsError::AddrUnavailable => ConnectClass::AddrUnavailable,
        OsError::Exhausted => ConnectClass::Exhausted,
        OsError::NotPermitted
        | OsError::NotSupported
        | OsError::NotFound
        | OsError::Invalid
        | OsError::TooLarge
        | OsError::Other => ConnectClass::Other,
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
        assert_eq!(classify(&e(libc::ECONNABORTED)), ConnectClass::Reset);
        assert_eq!(classify(&e(libc::EACCES)), ConnectClass::Other);
        assert_eq!(classify(&e(libc::EMFILE)), ConnectClass::Exhausted);
        assert_eq!(classify(&e(libc::ENFILE)), ConnectClass::Exhausted);
        let local: Vec<_> = ConnectClass::ALL.into_iter().filter(|c| c.local()).collect();
        assert_eq!(local, [ConnectClass::AddrUnavailable, ConnectClass::Exhausted]);
    }

    #[test]
    fn every_errno_staybound_branches_on_has_its_kind() {
        let e = |n| io::Error::from_raw_os_error(n);
        let table = [
            (libc::ECONNREFUSED, OsError::Refused),
            (libc::ENETUNREACH, OsError::Unreachable),
            (libc::EHOSTUNREACH, OsError::Unreachable),
            (libc::ENETDOWN, OsError::Unreachable),
            (libc::EHOSTDOWN, OsError::Unreachable),
            (libc::ETIMEDOUT, OsError::TimedOut),
            (libc::ECONNRESET, OsError::Reset),
            (libc::EPIPE, OsError::Reset),
            (libc::ECONNABORTED, OsError::Aborted),
            (libc::EADDRNOTAVAIL, OsError::AddrUnavailable),
            (libc::EMFILE, OsError::Exhausted),
            (libc::ENFILE, OsError::Exhausted),
            (libc::ENOBUFS, OsError::Exhausted),
            (libc::ENOMEM, OsError::Exhausted),
            (libc::EPERM, OsError::NotPermitted),
            (libc::EACCES, OsError::NotPermitted),
            (libc::EOPNOTSUPP, OsError::NotSupported),
            (libc::ENOENT, OsError::NotFound),
            (libc::EINVAL, OsError::Invalid),
            (libc::EMSGSIZE, OsError::TooLarge),
            (libc::EBADF, OsError::Other),
        ];
        for (errno, want) in table {
            assert_eq!(kind(&e(errno)), want, "errno {errno}");
        }
        assert_eq!(kind(&io::Error::from(io::ErrorKind::TimedOut)), OsError::TimedOut, "tokio's timeouts");
    }
}
