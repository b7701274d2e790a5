//! Configuration: the typed, validated settings every other module reads. `raw` mirrors the TOML file,
//! `validate` turns it into these types and collects every problem at once, `escape` decodes probe bytes.
//! Nothing outside this module knows the file format.

pub mod defaults;
mod escape;
mod parse;
mod raw;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use escape::{escape_bytes, unescape};
pub use validate::ConfigError;
pub use validate::{Problem, compile_identity};

/// Everything staybound runs, as validated from one file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (for messages and reloads).
    pub path: PathBuf,
    /// On SIGTERM, how long sessions may drain before they are ended.
    pub shutdown_grace: Duration,
    /// Data-path worker threads; 0: one per core. 1 runs the data path on a single thread, which on a
    /// small host shared with the client avoids cross-thread wake-ups. Takes effect at start.
    pub workers: usize,
    pub admin: AdminConfig,
    pub intercept: InterceptConfig,
    pub services: Vec<ServiceConfig>,
}

/// `[intercept]`: how the connections of the `intercept` services are redirected into their listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterceptConfig {
    pub method: InterceptMethod,
    /// The cgroup (v2) whose processes the connect hook redirects; `None`: the hierarchy's root, every
    /// process of the host.
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InterceptMethod {
    /// nftables rules in the table `inet staybound`: destination NAT on the output hook.
    #[default]
    Nat,
    /// eBPF programs on a cgroup's `connect4`/`connect6` hooks: the destination is rewritten at `connect()`,
    /// so no packet is translated.
    Connect,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Metrics and status; loopback unless the operator says otherwise.
    pub listen: SocketAddr,
    /// The bearer token `POST /failover/{service}` requires, read from `token_file`; `None` on a loopback
    /// admin without `token_file` (beyond loopback validation requires one).
    pub token: Option<AdminToken>,
    /// Where `token` was read from (for `check`; the file is read again on every reload).
    pub token_file: Option<PathBuf>,
    /// At most one failover through the hook per service per this long; more are answered 429.
    pub failover_rate: Duration,
}

/// A bearer token. Its `Debug` says only that it is set, so no config dump or log line carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    pub(crate) fn new(token: String) -> AdminToken {
        AdminToken(token)
    }

    /// The secret itself, for the constant-time comparison only.
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(set)")
    }
}

/// One service: legacy clients connect to `listen`, staybound connects on their behalf to `upstream`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Unique, `[a-z0-9_-]+`; the `service` metric label.
    pub name: String,
    pub protocol: Protocol,
    /// Where legacy clients connect; at least one.
    pub listen: Vec<SocketAddr>,
    /// The logical host.
    pub upstream: UpstreamAddr,
    /// Bound before connect() so upstream traffic leaves from the relocatable address.
    pub source: Option<IpAddr>,
    /// Allow binding `source` (or a UDP listen address) while it is not on this host.
    pub freebind: bool,
    /// Services whose upstream must be up before this one connects.
    pub depends_on: Vec<String>,
    /// Clients beyond this are refused, counted and logged.
    pub max_connections: usize,
    /// Listen backlog: large enough for every held client to come back at once after a failover.
    pub backlog: u32,
    /// What clients of sessions on a dead epoch get.
    pub on_failover: OnFailover,
    /// A session with no bytes either way for this long is closed; `None` (the default) never: legacy
    /// clients keep idle connections in pools on purpose.
    pub idle_timeout: Option<Duration>,
    /// Transparent mode: this host's outbound TCP to `upstream` is redirected into `listen` (nftables table
    /// `staybound`), so clients that dial the logical host's address come through staybound unchanged.
    pub intercept: bool,
    /// Guard mode: no listener; when an epoch ends, this host's established TCP sockets to `upstream` are
    /// destroyed (sock_diag), so clients that dial the logical host directly learn of the move at once.
    pub guard: bool,
    pub keepalive: KeepaliveConfig,
    pub probe: ProbeConfig,
    pub ride_out: RideOutConfig,
    pub udp: UdpConfig,
}

impl ServiceConfig {
    /// The service a UDP service takes its host state from: the first of its `depends_on`, when its own
    /// probe is off. The server gives such a service that dependency's detector.
    pub fn follows(&self) -> Option<&str> {
        if self.protocol == Protocol::Udp && self.probe.mode == ProbeMode::Off {
            self.depends_on.first().map(String::as_str)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailover {
    /// The client gets an RST (SO_LINGER 0).
    Reset,
    /// The client gets a FIN.
    Close,
}

/// The logical host: an IP address, or a name resolved again on every connect attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddr::Ip(addr) => write!(f, "{addr}"),
            UpstreamAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// TCP keep-alive on upstream sockets, and on accepted client sockets (`client_idle`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeepaliveConfig {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    /// TCP_USER_TIMEOUT: unacknowledged data older than this kills the session.
    pub user_timeout: Duration,
    /// Keep-alive idle time on accepted client sockets; `None` when "off".
    pub client_idle: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMode {
    /// Keep one probe connection open and watch it (config value `hold`).
    KeepOpen,
    /// Hold a connection and send `send` every interval, requiring `expect` in the reply.
    SendExpect,
    /// A fresh connect each interval.
    Connect,
    Off,
}

impl ProbeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeMode::KeepOpen => "hold",
            ProbeMode::SendExpect => "send-expect",
            ProbeMode::Connect => "connect",
            ProbeMode::Off => "off",
        }
    }
}

/// The application keep-alive: a probe session to the logical host.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub mode: ProbeMode,
    pub interval: Duration,
    pub timeout: Duration,
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
    /// One capture group that names the node serving the logical host.
    pub identity: Option<regex_lite::Regex>,
    pub fall: u32,
    pub rise: u32,
    /// Watch the neighbour table for a takeover's gratuitous ARP (Linux, directly connected upstreams).
    pub neighbor: bool,
    /// How long a split brain (the address flapping between two link-layer addresses) damps epochs, and
    /// how far back a flap is looked for; zero: never damped.
    pub split_brain_window: Duration,
    /// An application keep-alive that speaks the service's protocol (`preset`); the mode is then
    /// `send-expect`, with the preset's exchange instead of `send` and `expect`.
    pub preset: Option<Preset>,
}

/// The protocols a probe preset speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresetKind {
    Redis,
    Postgres,
}

impl PresetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PresetKind::Redis => "redis",
            PresetKind::Postgres => "postgres",
        }
    }
}

/// The role a node must have to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Any node that answers the preset's exchange is ready.
    Any,
    /// Only a primary (redis `ROLE` says `master`; PostgreSQL is not in recovery) is ready.
    Primary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Any => "any",
            Role::Primary => "primary",
        }
    }
}

/// A probe preset: the protocol, the role required, and how to log in.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub kind: PresetKind,
    pub role: Role,
    /// The login (PostgreSQL user; redis ACL user); empty: redis's default user, PostgreSQL `postgres`.
    pub user: String,
    /// The password, read from `password_file`.
    pub password: Option<Secret>,
    /// Where `password` was read from (for `check`).
    pub password_file: Option<PathBuf>,
    /// The PostgreSQL database; empty: the user's name.
    pub database: String,
    /// TLS for the probe connection, verified against `tls_ca_file`.
    pub tls: Option<TlsCa>,
    /// The name the server's certificate must carry: the upstream's host (an IP address or a DNS name).
    pub tls_name: String,
}

/// A CA to verify a server against: where it was read from, and its certificates (DER).
#[derive(Clone, PartialEq)]
pub struct TlsCa {
    pub file: PathBuf,
    pub certs: Vec<Vec<u8>>,
}

impl fmt::Debug for TlsCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsCa({}, {} certificate(s))", self.file.display(), self.certs.len())
    }
}

/// A password. Its `Debug` says only that it is set, so no config dump or log line carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub(crate) fn new(secret: String) -> Secret {
        Secret(secret)
    }

    /// The secret itself, for the login exchange only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(set)")
    }
}

impl PartialEq for ProbeConfig {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode
            && self.interval == other.interval
            && self.timeout == other.timeout
            && self.send == other.send
            && self.expect == other.expect
            && self.identity.as_ref().map(|r| r.as_str()) == other.identity.as_ref().map(|r| r.as_str())
            && self.fall == other.fall
            && self.rise == other.rise
            && self.neighbor == other.neighbor
            && self.split_brain_window == other.split_brain_window
            && self.preset == other.preset
    }
}

/// Riding out a takeover: how long new clients wait and how connects are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RideOutConfig {
    pub deadline: Duration,
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub budget_ratio: f64,
    pub budget_min_per_sec: u32,
    pub budget_window: Duration,
    /// Held clients released per second after a takeover (`None`: all at once); see `pace`.
    pub release_rate: Option<u32>,
}

/// An address or a CIDR block whose datagrams count as the upstream's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UdpConfig {
    pub reply_from: Vec<IpNet>,
    pub flow_idle: Duration,
    /// Flows of the service; at the limit a new client's flow takes the place of the least recently used one.
    pub max_flows: usize,
    /// Flows of one client address; datagrams of new clients from an address at the limit are dropped.
    pub max_flows_per_source: usize,
}

impl UdpConfig {
    /// A datagram from `from` counts as the upstream's reply when it comes from the upstream address `peer`
    /// itself or from an address in `reply_from` (any port: a node answering from its stationary address
    /// keeps the port).
    pub fn is_reply(&self, from: SocketAddr, peer: SocketAddr) -> bool {
        from == peer || self.reply_from.iter().any(|net| net.contains(from.ip()))
    }
}

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// `ConfigError::Io` when the file cannot be read, `ConfigError::Invalid` with every problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Config::from_toml_str(&text, path)
    }

    /// Parses and validates config text; `path` only names the file in messages.
    ///
    /// # Errors
    /// `ConfigError::Invalid` with every problem found, each with line, column and key.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        validate::validate(text, path)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_from_the_upstream_or_reply_from_only() -> Result<(), std::net::AddrParseError> {
        let peer: SocketAddr = "198.18.0.100:53".parse()?;
        let udp = |reply_from| UdpConfig {
            reply_from,
            flow_idle: Duration::from_secs(1),
            max_flows: 1,
            max_flows_per_source: 1,
        };
        let (none, nets) = (udp(vec![]), udp(vec![IpNet { addr: "198.18.0.0".parse()?, prefix: 24 }]));
        assert!(none.is_reply(peer, peer));
        assert!(!none.is_reply("198.18.0.100:54".parse()?, peer), "another port of the upstream");
        assert!(!none.is_reply("198.18.0.1:53".parse()?, peer));
        assert!(nets.is_reply("198.18.0.1:53".parse()?, peer));
        assert!(!nets.is_reply("198.18.1.1:53".parse()?, peer));
        assert!(!nets.is_reply("[::ffff:198.18.0.1]:53".parse()?, peer), "families never mix");
        Ok(())
    }
}
