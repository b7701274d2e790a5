//! Upstream names, resolved by hickory-resolver rather than the C library's blocking `getaddrinfo`: every
//! address of the answer, in its order; answers cached for their TTL; each lookup bounded in time; and one
//! lookup shared by every caller that asks while it runs, so a thousand clients released together make one
//! query, and a stalled resolver holds none of them past its own deadline. The system's configuration
//! (`/etc/resolv.conf` and `/etc/hosts`, or the files `ip netns exec` mounts over them) is read again when
//! either file changes, as the C library does. When the resolver fails or stalls (not when it says the name
//! has no address), the last good answer serves until it answers again (serve-stale, RFC 8767): a resolver
//! outage is no outage of the upstream, and the detector's probe must not read it as one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::ResolveHosts;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The files whose change makes the resolver read the system's configuration again.
const SYSTEM_FILES: [&str; 2] = ["/etc/resolv.conf", "/etc/hosts"];

/// Longest an answer is kept, whatever its TTL (a hosts-file answer has none worth keeping that long).
const MAX_KEEP: Duration = Duration::from_secs(300);

/// One query's bound inside the resolver (it retries a server once): a lookup that takes longer has
/// its callers give up at their own deadlines first.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A name's answer: its addresses in order, or why there are none.
pub(crate) type Answer = Result<Arc<[SocketAddr]>, String>;

/// What identifies the system files' contents without reading them: size and modification time each.
type Stamp = [Option<(u64, SystemTime)>; 2];

fn stamp() -> Stamp {
    SYSTEM_FILES.map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.len(), m.modified().ok()?))))
}

/// The process's resolver, made again when the system files change.
static SYSTEM: Mutex<Option<(Stamp, TokioResolver)>> = Mutex::new(None);

fn system_resolver() -> Result<(Stamp, TokioResolver), String> {
    let now = stamp();
    let mut slot = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((s, r)) = slot.as_ref()
        && *s == now
    {
        return Ok((now, r.clone()));
    }
    let mut builder =
        TokioResolver::builder_tokio().map_err(|e| format!("cannot read the resolver configuration: {e}"))?;
    let opts = builder.options_mut();
    opts.use_hosts_file = ResolveHosts::Always;
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 1;
    let resolver = builder.build().map_err(|e| format!("cannot make a resolver: {e}"))?;
    *slot = Some((now, resolver.clone()));
    Ok((now, resolver))
}

/// One upstream name and port: its cached answer and the lookup in flight.
#[derive(Debug)]
pub(crate) struct Name {
    host: String,
    port: u16,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last good answer, until when it holds, and the system files it was made under.
    cached: Option<(Arc<[SocketAddr]>, Instant, Stamp)>,
    /// The lookup in flight: `None` in the channel until it ends.
    flight: Option<watch::Receiver<Option<Answer>>>,
    /// The resolver failed or did not answer in time, and the last good answer serves meanwhile.
    stale: bool,
}

impl State {
    /// The last good answer, while the resolver fails.
    fn stale_answer(&self) -> Option<Arc<[SocketAddr]>> {
        self.cached.as_ref().filter(|_| self.stale).map(|(addrs, ..)| addrs.clone())
    }
}

/// Why a query gave no addresses.
#[derive(Debug)]
enum QueryError {
    /// The name has no address: an answer, which replaces the last one.
    NoAddress(String),
    /// The resolver failed (no server reached, a server error, its configuration unreadable).
    Failed(String),
}

impl Name {
    pub(crate) fn new(host: &str, port: u16) -> Name {
        Name { host: host.to_owned(), port, state: Mutex::new(State::default()) }
    }

    /// The name's addresses: the cached answer while its TTL holds, else the lookup in flight, or a new
    /// one, shared with every caller that asks meanwhile. Waits at most `within`.
    pub(crate) async fn lookup(self: &Arc<Self>, within: Duration) -> Answer {
        let deadline = Instant::now() + within;
        let mut rx = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((addrs, until, made)) = &st.cached
                && Instant::now() < *until
                && *made == stamp()
            {
                return Ok(addrs.clone());
            }
            let rx = match &st.flight {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    st.flight = Some(rx.clone());
                    let me = self.clone();
                    tokio::spawn(async move {
                        let answer = me.query().await;
                        let mut st = me.state.lock().unwrap_or_else(|e| e.into_inner());
                        st.flight = None;
                        let answer = match answer {
                            Ok((addrs, _)) => Ok(addrs),
                            Err(QueryError::NoAddress(why)) => {
                                st.cached = None;
                                st.stale = false;
                                Err(why)
                            }
                            Err(QueryError::Failed(why)) => {
                                me.serve_stale(&mut st, &why);
                                Err(why)
                            }
                        };
                        let _ = tx.send(Some(answer));
                        drop(st);
                    });
                    rx
                }
            };
            // why: the resolver failed last time; the last answer serves at once while the lookup goes on,
            // rather than after every caller's own wait for a resolver that does not answer.
            if let Some(addrs) = st.stale_answer() {
                return Ok(addrs);
            }
            rx
        };
        let answer = match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone().unwrap_or_else(|| Err("the lookup ended without an answer".into())),
            Ok(Err(_)) => Err("the lookup was dropped".into()),
            Err(_) => {
                let why = format!("no answer from the resolver within {}", humantime::format_duration(within));
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                self.serve_stale(&mut st, &why);
                Err(why)
            }
        };
        // why: only a failure leaves the last answer to serve; a name that has no address now emptied it.
        answer.or_else(|why| self.state.lock().unwrap_or_else(|e| e.into_inner()).stale_answer().ok_or(why))
    }

    /// The resolver failed: the last good answer, if there is one, serves until it answers again; said once.
    fn serve_stale(&self, st: &mut State, why: &str) {
        if st.cached.is_some() && !st.stale {
            st.stale = true;
            warn!(name = %self.host, error = why, "the resolver did not answer; the name's last answer serves until it does");
        }
    }

    /// Asks the resolver; caches a good answer for its TTL (at most `MAX_KEEP`).
    async fn query(&self) -> Result<(Arc<[SocketAddr]>, Instant), QueryError> {
        let (made, resolver) = system_resolver().map_err(QueryError::Failed)?;
        let began = Instant::now();
        let lookup = resolver.lookup_ip(self.host.as_str()).await.map_err(|e| {
            if e.is_nx_domain() || e.is_no_records_found() {
                QueryError::NoAddress(e.to_string())
            } else {
                QueryError::Failed(e.to_string())
            }
        })?;
        let addrs: Arc<[SocketAddr]> = lookup.iter().map(|ip| SocketAddr::new(ip, self.port)).collect();
        if addrs.is_empty() {
            return Err(QueryError::NoAddress("no address".into()));
        }
        let ttl = lookup.valid_until().saturating_duration_since(std::time::Instant::now()).min(MAX_KEEP);
        let until = Instant::now() + ttl;
        debug!(name = %self.host, addresses = ?addrs, ttl_s = ttl.as_secs(), took_ms = began.elapsed().as_millis() as u64, "upstream name resolved");
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.cached = Some((addrs.clone(), until, made));
        if std::mem::take(&mut st.stale) {
            info!(name = %self.host, addresses = ?addrs, "the resolver answers again");
        }
        Ok((addrs, until))
    }
}

/// The order to try a name's addresses in: the one that last worked first (so a dead record costs one
/// attempt, not one per connect), then the answer's order; only those of `family` (IPv4 when `Some(true)`)
/// when the source address fixes it.
pub(crate) fn order(addrs: &[SocketAddr], preferred: Option<SocketAddr>, family_v4: Option<bool>) -> Vec<SocketAddr> {
    let usable = |a: &SocketAddr| family_v4.is_none_or(|v4| v4 == a.is_ipv4());
    let mut out: Vec<SocketAddr> = preferred.filter(|p| addrs.contains(p) && usable(p)).into_iter().collect();
    out.extend(addrs.iter().copied().filter(|a| usable(a) && Some(*a) != preferred));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_address_that_worked_goes_first_then_the_answers_order() {
        let answer = [a("198.18.0.1:1"), a("198.18.0.2:1"), a("[2001:2::1]:1"), a("198.18.0.3:1")];
        assert_eq!(order(&answer, None, None), answer.to_vec());
        assert_eq!(
            order(&answer, Some(a("198.18.0.2:1")), None),
            vec![a("198.18.0.2:1"), a("198.18.0.1:1"), a("[2001:2::1]:1"), a("198.18.0.3:1")]
        );
        // An address no longer in the answer is not tried.
        assert_eq!(order(&answer, Some(a("198.18.0.9:1")), None), answer.to_vec());
        // The source's family decides.
        assert_eq!(order(&answer, None, Some(false)), vec![a("[2001:2::1]:1")]);
        assert_eq!(order(&answer, Some(a("[2001:2::1]:1")), Some(true)).len(), 3);
        assert!(order(&[], None, None).is_empty());
    }

    #[tokio::test]
    async fn a_name_from_the_hosts_file_is_resolved_and_shared() {
        let name = Arc::new(Name::new("localhost", 7));
        let (x, y) = tokio::join!(name.lookup(Duration::from_secs(5)), name.lookup(Duration::from_secs(5)));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x, y);
        assert!(x.iter().all(|s| s.ip().is_loopback() && s.port() == 7), "{x:?}");
    }
}
