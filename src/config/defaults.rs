//! The default of every config key that has one, named, in one block. Validation (`validate`) takes them from
//! here; the README's reference and `staybound check` show the same values. A key's allowed range stays
//! beside its validation, with the message that names it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// Top level.
/// `shutdown_grace`: how long draining sessions may take after SIGTERM.
pub(crate) const SHUTDOWN_GRACE: Duration = secs(30);
/// `workers`: runtime worker threads.
pub(crate) const WORKERS: i64 = 1;

// [admin]
/// `admin.listen`: loopback only.
pub const ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);
/// `admin.failover_rate`: at most one failover through the admin hook per service per this long.
pub(crate) const FAILOVER_RATE: Duration = secs(1);

// [[service]]
/// `max_connections`.
pub(crate) const MAX_CONNECTIONS: i64 = 10_000;
/// `backlog`: large enough for every held client to come back at once after a failover.
pub(crate) const BACKLOG: i64 = 4096;

// [service.keepalive]
/// `keepalive.idle`.
pub(crate) const KEEPALIVE_IDLE: Duration = secs(1);
/// `keepalive.interval`.
pub(crate) const KEEPALIVE_INTERVAL: Duration = secs(1);
/// `keepalive.count`.
pub(crate) const KEEPALIVE_COUNT: i64 = 3;
/// `keepalive.user_timeout`.
pub(crate) const USER_TIMEOUT: Duration = secs(5);
/// `keepalive.client_idle`.
pub(crate) const CLIENT_IDLE: Duration = secs(30);

// [service.probe]
/// `probe.interval`.
pub(crate) const PROBE_INTERVAL: Duration = secs(1);
/// `probe.timeout`.
pub(crate) const PROBE_TIMEOUT: Duration = secs(1);
/// `probe.fall` and `probe.rise`.
pub(crate) const FALL: i64 = 1;
pub(crate) const RISE: i64 = 1;
/// `probe.split_brain_window`: longer than a flapping address takes to come back, shorter than any real
/// failback takes.
pub(crate) const SPLIT_BRAIN_WINDOW: Duration = secs(10);

// [service.hold] (the ride-out)
/// `hold.deadline`.
pub(crate) const DEADLINE: Duration = secs(30);
/// `hold.connect_timeout`.
pub(crate) const CONNECT_TIMEOUT: Duration = secs(1);
/// `hold.backoff_initial`.
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// `hold.backoff_max`.
pub(crate) const BACKOFF_MAX: Duration = secs(1);
/// `hold.budget_ratio`.
pub(crate) const BUDGET_RATIO: f64 = 0.2;
/// `hold.budget_min_per_sec`.
pub(crate) const BUDGET_MIN_PER_SEC: i64 = 10;
/// `hold.budget_window`.
pub(crate) const BUDGET_WINDOW: Duration = secs(10);
/// `hold.release_rate`: held clients released per second after a takeover (0: all at once).
pub(crate) const RELEASE_RATE: i64 = 10_000;

// [service.udp]
/// `udp.flow_idle`.
pub(crate) const FLOW_IDLE: Duration = secs(60);
/// `udp.max_flows`.
pub const MAX_FLOWS: i64 = 10_000;
/// `udp.max_flows_per_source` (at most `max_flows`).
/// why: enough for the clients of one NAT gateway or one application host with a pool of sockets, and small
/// beside the default `max_flows`, so no single address takes more than a sliver of the table.
pub(crate) const FLOWS_PER_SOURCE: usize = 64;
