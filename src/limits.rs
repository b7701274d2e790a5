//! The process's open-file limit (RLIMIT_NOFILE): raised to the hard limit at start, since every TCP
//! session holds two descriptors and distributions start services with a soft limit of 1024; and what
//! the limit allows in sessions.

use std::io;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept aside from sessions: the admin server's connections (64), listeners, probe sessions,
/// the neighbour watch, the runtime's own and the log.
pub(crate) const FD_RESERVE: u64 = 256;

/// The open-file limit before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub before: u64,
    pub after: u64,
}

impl Nofile {
    /// The TCP sessions the limit now allows.
    pub fn session_capacity(&self) -> u64 {
        session_capacity(self.after)
    }
}

/// TCP sessions an open-file limit allows: two descriptors each (client and upstream), after
/// [`FD_RESERVE`]. A UDP flow holds one.
pub fn session_capacity(limit: u64) -> u64 {
    limit.saturating_sub(FD_RESERVE) / 2
}

/// The soft limit to ask for: the hard limit, or when that is unlimited the kernel's per-process ceiling
/// (`fs.nr_open`, which an unlimited soft limit would exceed); never lower than now.
pub fn target(soft: u64, hard: u64, nr_open: Option<u64>) -> u64 {
    let ceiling = if hard == libc::RLIM_INFINITY { nr_open.unwrap_or(soft) } else { hard };
    soft.max(ceiling)
}

/// Raises the soft open-file limit to the hard one.
///
/// # Errors
/// getrlimit or setrlimit failures (the limit then stays as it was).
pub fn raise_nofile() -> io::Result<Nofile> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok());
    let want = target(soft, hard, nr_open);
    if want != soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).map_err(io::Error::from)?;
    }
    let (after, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(Nofile { before: soft, after })
}

/// What the operator should hear when the services' `max_connections` add up to more sessions than
/// the limit allows; `None` when they fit.
pub fn shortfall(capacity: u64, max_connections: &[usize]) -> Option<String> {
    let total: u64 = max_connections.iter().map(|&m| m as u64).sum();
    (total > capacity).then(|| {
        format!(
            "the services' max_connections add up to {total} sessions, but the open-file limit allows about \
             {capacity}: raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn) or lower max_connections"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_two_descriptors_a_session_after_the_reserve() {
        assert_eq!(session_capacity(1024), 384);
        assert_eq!(session_capacity(65_536), 32_640);
        assert_eq!(session_capacity(100), 0);
    }

    #[test]
    fn the_soft_limit_goes_to_the_hard_one() {
        assert_eq!(target(1024, 524_288, Some(1_048_576)), 524_288);
        assert_eq!(target(1024, libc::RLIM_INFINITY, Some(1_048_576)), 1_048_576);
        assert_eq!(target(1024, libc::RLIM_INFINITY, None), 1024);
        assert_eq!(target(4096, 4096, None), 4096);
    }

    #[test]
    fn a_shortfall_is_named() {
        assert_eq!(shortfall(32_640, &[10_000, 10_000]), None);
        let s = shortfall(384, &[10_000]).unwrap();
        assert!(s.contains("10000") && s.contains("384"), "{s}");
    }

    #[test]
    fn raising_keeps_or_grows_the_limit() {
        let n = raise_nofile().unwrap();
        assert!(n.after >= n.before, "{n:?}");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, n.after);
        assert!(hard == libc::RLIM_INFINITY || soft == hard, "{soft} {hard}");
    }
}
