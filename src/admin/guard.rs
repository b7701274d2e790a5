//! The admin server's decisions, without I/O: which `Host` and `Origin` a request may carry, whether it
//! bears the hook's token, whether a service's hook failover comes too soon after the last one, and which
//! connection gives way when the connection budget is full.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::config::AdminToken;

/// The `Host` values (lower case) that name the admin endpoint, for a connection accepted on `local`:
/// the address the client connected to, and, on loopback, `localhost` and both loopback addresses too.
pub(crate) fn allowed_hosts(local: SocketAddr) -> Vec<String> {
    let port = local.port();
    let authority = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    let mut hosts = vec![authority(local.ip())];
    // why: a client of a dual-stack wildcard socket connected to an IPv4 address names it as IPv4.
    if let IpAddr::V6(v6) = local.ip()
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        hosts.push(authority(IpAddr::V4(v4)));
    }
    let loopback = match local.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        IpAddr::V4(v4) => v4.is_loopback(),
    };
    if loopback {
        for alias in [
            format!("localhost:{port}"),
            authority(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            authority(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ] {
            if !hosts.contains(&alias) {
                hosts.push(alias);
            }
        }
    }
    hosts
}

/// A request's `Host` is acceptable when absent (no browser sends a request without one) or one of
/// `allowed`: a browser led to this port by DNS rebinding names the attacker's host.
pub(crate) fn host_ok(host: Option<&str>, allowed: &[String]) -> bool {
    host.is_none_or(|h| allowed.iter().any(|a| a.eq_ignore_ascii_case(h.trim())))
}

/// A request's `Origin` is acceptable when absent (tools send none) or `http://` and an allowed host: any
/// other origin is a web page making its visitor's browser post to this endpoint.
pub(crate) fn origin_ok(origin: Option<&str>, allowed: &[String]) -> bool {
    origin.is_none_or(|o| {
        let o = o.trim();
        o.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
            && allowed.iter().any(|a| a.eq_ignore_ascii_case(&o[7..]))
    })
}

/// Whether an `Authorization` header carries the token; always when no token is configured. The token is
/// compared in constant time (its length aside).
pub(crate) fn authorized(header: Option<&[u8]>, token: Option<&AdminToken>) -> bool {
    let Some(token) = token else { return true };
    let Some(header) = header else { return false };
    let Some((scheme, rest)) = header.split_at_checked(7) else { return false };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given = rest.trim_ascii();
    bool::from(given.ct_eq(token.expose()))
}

/// When each service last failed over through the hook.
#[derive(Debug, Default)]
pub(crate) struct HookRate {
    last: HashMap<String, Instant>,
}

impl HookRate {
    /// Admits a hook failover of `service` at `now` when none was admitted within `rate`; otherwise
    /// returns how long until one would be.
    pub(crate) fn admit(&mut self, service: &str, now: Instant, rate: Duration) -> Result<(), Duration> {
        if let Some(last) = self.last.get(service) {
            let since = now.saturating_duration_since(*last);
            if since < rate {
                return Err(rate - since);
            }
        }
        self.last.insert(service.to_string(), now);
        Ok(())
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX).max(1)
}

/// What to do with a newly accepted connection when `open` connections (oldest first; `true` when a
/// request of it is being answered) are open and at most `cap` may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Take,
    /// Close the connection at this index first: the oldest one that has not sent a whole request yet (an
    /// idle or slow client), so a stuck or hostile client cannot lock out the next scrape or hook.
    Evict(usize),
    /// Close the new connection: every open one is being answered.
    Refuse,
}

pub(crate) fn admit(answering: &[bool], cap: usize) -> Admit {
    if answering.len() < cap {
        return Admit::Take;
    }
    match answering.iter().position(|busy| !busy) {
        Some(i) => Admit::Evict(i),
        None => Admit::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_the_endpoint_and_loopback_aliases() {
        let hosts = allowed_hosts("127.0.0.1:9901".parse().unwrap());
        assert_eq!(hosts, ["127.0.0.1:9901", "localhost:9901", "[::1]:9901"]);
        assert!(host_ok(Some("LOCALHOST:9901"), &hosts));
        assert!(host_ok(None, &hosts));
        assert!(!host_ok(Some("evil.example:9901"), &hosts));
        assert!(!host_ok(Some("localhost:9902"), &hosts));
        assert!(!host_ok(Some("localhost"), &hosts));
        let hosts = allowed_hosts("10.1.2.3:9901".parse().unwrap());
        assert_eq!(hosts, ["10.1.2.3:9901"]);
        assert!(!host_ok(Some("localhost:9901"), &hosts), "no loopback alias beyond loopback");
        let hosts = allowed_hosts("[::ffff:10.1.2.3]:9901".parse().unwrap());
        assert!(host_ok(Some("10.1.2.3:9901"), &hosts), "{hosts:?}");
        assert_eq!(allowed_hosts("[::1]:80".parse().unwrap()), ["[::1]:80", "localhost:80", "127.0.0.1:80"]);
    }

    #[test]
    fn origins_must_be_the_endpoint_itself() {
        let hosts = allowed_hosts("127.0.0.1:9901".parse().unwrap());
        assert!(origin_ok(None, &hosts));
        assert!(origin_ok(Some("http://127.0.0.1:9901"), &hosts));
        assert!(origin_ok(Some("HTTP://localhost:9901"), &hosts));
        for bad in ["http://example.invalid", "null", "https://127.0.0.1:9901", "http://127.0.0.1:9902", "", "http:/"] {
            assert!(!origin_ok(Some(bad), &hosts), "{bad}");
        }
    }

    #[test]
    fn the_token_is_required_only_when_set() {
        let token = AdminToken::new("0123456789abcdef".into());
        assert!(authorized(None, None));
        assert!(authorized(Some(b"Bearer whatever"), None));
        assert!(authorized(Some(b"Bearer 0123456789abcdef"), Some(&token)));
        assert!(authorized(Some(b"bearer  0123456789abcdef "), Some(&token)));
        for bad in
            [&b"Bearer 0123456789abcdeF"[..], b"Bearer 0123456789abcde", b"Basic 0123456789abcdef", b"Bearer", b""]
        {
            assert!(!authorized(Some(bad), Some(&token)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!authorized(None, Some(&token)));
    }

    #[test]
    fn one_hook_failover_per_service_per_rate() {
        let (mut r, t0, rate) = (HookRate::default(), Instant::now(), Duration::from_secs(1));
        assert_eq!(r.admit("a", t0, rate), Ok(()));
        assert_eq!(r.admit("a", t0 + Duration::from_millis(300), rate), Err(Duration::from_millis(700)));
        assert_eq!(r.admit("b", t0 + Duration::from_millis(300), rate), Ok(()), "per service");
        assert_eq!(r.admit("a", t0 + rate, rate), Ok(()));
        assert_eq!(r.admit("a", t0 + rate, Duration::ZERO), Ok(()), "a zero rate admits every one");
        assert_eq!(retry_after_secs(Duration::from_millis(700)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_idle_connection() {
        assert_eq!(admit(&[false, true], 3), Admit::Take);
        assert_eq!(admit(&[true, false, false], 3), Admit::Evict(1));
        assert_eq!(admit(&[true, true, true], 3), Admit::Refuse);
        assert_eq!(admit(&[], 0), Admit::Refuse);
    }
}
