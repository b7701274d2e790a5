//! A config document built from fuzz input with `arbitrary`: staybound's own tables and keys, with values
//! mostly of the right type and in range, and otherwise at or past the edges of their ranges, of the
//! wrong type, or under a key the table does not have. [`render`] writes it as TOML.
//!
//! Every service gets `name`, `listen` and `upstream` unless the input asks to leave one out, and names
//! come from a small pool so that `depends_on`, duplicates and cycles refer to services that exist.

use std::fmt::Write;

use arbitrary::Arbitrary;

#[derive(Arbitrary, Debug)]
pub struct Doc {
    shutdown_grace: Option<Value>,
    workers: Option<Value>,
    admin_listen: Option<Value>,
    /// A key at the top level (usually one that belongs elsewhere).
    stray: Option<Entry>,
    defaults: Vec<(Sub, Vec<Entry>)>,
    /// At least one service: a file without any is covered by the `config` target's seeds.
    first: Service,
    more: Vec<Service>,
}

#[derive(Arbitrary, Debug)]
struct Service {
    name: Value,
    listen: Value,
    upstream: Value,
    /// Leaves out name (bit 0), listen (bit 1) or upstream (bit 2) when the top bits are all set.
    omit: u8,
    entries: Vec<Entry>,
    subs: Vec<(Sub, Vec<Entry>)>,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Sub {
    Keepalive,
    Probe,
    Hold,
    Udp,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::Keepalive => "keepalive",
            Sub::Probe => "probe",
            Sub::Hold => "hold",
            Sub::Udp => "udp",
        }
    }

    fn keys(self) -> &'static [Key] {
        match self {
            Sub::Keepalive => &[Key::Idle, Key::Interval, Key::Count, Key::UserTimeout, Key::ClientIdle],
            Sub::Probe => &[
                Key::Mode,
                Key::Interval,
                Key::Timeout,
                Key::Send,
                Key::Expect,
                Key::Identity,
                Key::Fall,
                Key::Rise,
                Key::Neighbor,
            ],
            Sub::Hold => &[
                Key::Deadline,
                Key::ConnectTimeout,
                Key::BackoffInitial,
                Key::BackoffMax,
                Key::BudgetRatio,
                Key::BudgetMinPerSec,
                Key::BudgetWindow,
            ],
            Sub::Udp => &[Key::ReplyFrom, Key::FlowIdle, Key::MaxFlows],
        }
    }
}

/// A key of the table it is written in (`key` < 240), or any key of the file (>= 240).
#[derive(Arbitrary, Debug)]
struct Entry {
    key: u8,
    value: Value,
}

/// The numbers and text a value is made of; `kind` < 224 gives a value of the key's own type.
#[derive(Arbitrary, Debug)]
struct Value {
    kind: u8,
    pick: u8,
    a: u32,
    b: u16,
    text: String,
}

/// Every key of the config file (src/config/raw.rs).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    ShutdownGrace,
    Workers,
    AdminListen,
    Listen,
    Name,
    Protocol,
    Upstream,
    Source,
    Freebind,
    DependsOn,
    MaxConnections,
    Backlog,
    OnFailover,
    IdleTimeout,
    Idle,
    Interval,
    Count,
    UserTimeout,
    ClientIdle,
    Mode,
    Timeout,
    Send,
    Expect,
    Identity,
    Fall,
    Rise,
    Neighbor,
    Deadline,
    ConnectTimeout,
    BackoffInitial,
    BackoffMax,
    BudgetRatio,
    BudgetMinPerSec,
    BudgetWindow,
    ReplyFrom,
    FlowIdle,
    MaxFlows,
}

const ALL_KEYS: &[Key] = &[
    Key::ShutdownGrace,
    Key::Workers,
    Key::Listen,
    Key::Name,
    Key::Protocol,
    Key::Upstream,
    Key::Source,
    Key::Freebind,
    Key::DependsOn,
    Key::MaxConnections,
    Key::Backlog,
    Key::OnFailover,
    Key::IdleTimeout,
    Key::Idle,
    Key::Interval,
    Key::Count,
    Key::UserTimeout,
    Key::ClientIdle,
    Key::Mode,
    Key::Timeout,
    Key::Send,
    Key::Expect,
    Key::Identity,
    Key::Fall,
    Key::Rise,
    Key::Neighbor,
    Key::Deadline,
    Key::ConnectTimeout,
    Key::BackoffInitial,
    Key::BackoffMax,
    Key::BudgetRatio,
    Key::BudgetMinPerSec,
    Key::BudgetWindow,
    Key::ReplyFrom,
    Key::FlowIdle,
    Key::MaxFlows,
];

const SERVICE_KEYS: &[Key] = &[
    Key::Protocol,
    Key::Source,
    Key::Freebind,
    Key::DependsOn,
    Key::MaxConnections,
    Key::Backlog,
    Key::OnFailover,
    Key::IdleTimeout,
    Key::Name,
    Key::Listen,
    Key::Upstream,
];

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::ShutdownGrace => "shutdown_grace",
            Key::Workers => "workers",
            Key::AdminListen | Key::Listen => "listen",
            Key::Name => "name",
            Key::Protocol => "protocol",
            Key::Upstream => "upstream",
            Key::Source => "source",
            Key::Freebind => "freebind",
            Key::DependsOn => "depends_on",
            Key::MaxConnections => "max_connections",
            Key::Backlog => "backlog",
            Key::OnFailover => "on_failover",
            Key::IdleTimeout => "idle_timeout",
            Key::Idle => "idle",
            Key::Interval => "interval",
            Key::Count => "count",
            Key::UserTimeout => "user_timeout",
            Key::ClientIdle => "client_idle",
            Key::Mode => "mode",
            Key::Timeout => "timeout",
            Key::Send => "send",
            Key::Expect => "expect",
            Key::Identity => "identity",
            Key::Fall => "fall",
            Key::Rise => "rise",
            Key::Neighbor => "neighbor",
            Key::Deadline => "deadline",
            Key::ConnectTimeout => "connect_timeout",
            Key::BackoffInitial => "backoff_initial",
            Key::BackoffMax => "backoff_max",
            Key::BudgetRatio => "budget_ratio",
            Key::BudgetMinPerSec => "budget_min_per_sec",
            Key::BudgetWindow => "budget_window",
            Key::ReplyFrom => "reply_from",
            Key::FlowIdle => "flow_idle",
            Key::MaxFlows => "max_flows",
        }
    }
}

/// Service names: the first five are valid and shared, so `depends_on` and duplicates find each other.
const NAMES: &[&str] = &["a", "b", "c", "orders", "x-1_2", "A", "", "no space"];
const V4: &[&str] = &["127.0.0.1", "198.18.0.100", "10.1.2.3", "0.0.0.0", "255.255.255.255"];
const V6: &[&str] = &["::1", "::", "fe80::1", "2001:db8::5"];
const UNITS: &[&str] = &["ns", "us", "ms", "s", "sec", "m", "min", "h", "d", "w", "M", "y", "", "x"];
const REGEXES: &[&str] = &["run_id:([0-9a-f]+)", "(.*)", "()", "node=(\\w+)", "(a)(b)", "no group", "(unclosed"];

fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn pick<'a>(list: &[&'a str], i: impl Into<u32>) -> &'a str {
    list[i.into() as usize % list.len()]
}

/// Mostly IPv4 (an upstream and its `source` must share a family).
fn ip(p: u8, a: u32) -> String {
    match p % 8 {
        0..=4 => pick(V4, a).to_string(),
        5 => std::net::Ipv4Addr::from(a).to_string(),
        _ => pick(V6, a).to_string(),
    }
}

fn ip_port(p: u8, a: u32, port: u16) -> String {
    let ip = ip(p, a);
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

fn duration(v: &Value) -> String {
    let (a, b, p) = (v.a, v.b, v.pick);
    match p % 8 {
        0 => format!("{}s", 1 + a % 5),
        1 => format!("{}ms", (1 + a % 20) * 50),
        2 => format!("{}m", 1 + a % 3),
        3 => format!("{b}{}", pick(UNITS, a)),
        4 => format!("{a}{}", pick(UNITS, b)),
        5 => format!("{}.{}{}", a % 100, b % 1000, pick(UNITS, b)),
        6 => format!("{}s {}ms", a % 10, b),
        _ => pick(&["off", "0s", "0", "5", "", " 1s ", "1h 30m", "1500ms", "3601s"], a).to_string(),
    }
}

fn int(v: &Value, lo: i64, hi: i64) -> String {
    let (a, p) = (i64::from(v.a), v.pick);
    match p % 8 {
        0..=3 => (lo + a % (hi - lo + 1)).to_string(),
        4 => lo.to_string(),
        5 => hi.to_string(),
        6 => (lo - 1 - a % 2).to_string(),
        _ => (hi + 1 + a % 2).to_string(),
    }
}

fn list(n: u8, item: impl Fn(u8) -> String) -> String {
    let items: Vec<String> = (0..n).map(item).collect();
    format!("[{}]", items.join(", "))
}

fn natural(key: Key, v: &Value) -> String {
    let (a, b, p) = (v.a, v.b, v.pick);
    match key {
        Key::ShutdownGrace
        | Key::Idle
        | Key::Interval
        | Key::UserTimeout
        | Key::ClientIdle
        | Key::IdleTimeout
        | Key::Timeout
        | Key::Deadline
        | Key::ConnectTimeout
        | Key::BackoffInitial
        | Key::BackoffMax
        | Key::BudgetWindow
        | Key::FlowIdle => toml_str(&duration(v)),
        Key::AdminListen => toml_str(&ip_port(p, a, b)),
        Key::Listen => match p % 8 {
            0..=4 => toml_str(&ip_port(p / 8, a, b)),
            5 => list(1 + (a % 3) as u8, |i| toml_str(&ip_port(p / 8 + i, a.rotate_left(u32::from(i)), b))),
            6 => "[]".into(),
            _ => toml_str(&format!("h{}.example:{b}", a % 4)),
        },
        Key::Upstream => match p % 8 {
            // Port 0 is refused; arbitrary gives 0 once the input runs out, so that would be most upstreams.
            0..=4 => toml_str(&ip_port(p / 8, a, if b == 0 { 6379 } else { b })),
            5 => toml_str(&format!("h{}.example:{b}", a % 4)),
            6 => toml_str(&ip(p / 8, a)),
            _ => toml_str(&format!("{}:{}", pick(&["host_x", "-", "a..b", "", "h"], a), u32::from(b) * 2)),
        },
        Key::Source => toml_str(&ip(p, a)),
        Key::Name => toml_str(pick(NAMES, if p > 240 { p } else { p % 5 })),
        Key::DependsOn => list(p % 3, |i| toml_str(pick(NAMES, a.wrapping_add(u32::from(i)) % 6))),
        Key::Protocol => toml_str(pick(&["tcp", "tcp", "tcp", "udp", "sctp"], p)),
        Key::OnFailover => toml_str(pick(&["reset", "close", "reset", "close", "explode"], p)),
        Key::Mode => toml_str(pick(&["hold", "send-expect", "connect", "off", "HOLD"], p)),
        Key::Freebind | Key::Neighbor => (p % 2 == 0).to_string(),
        Key::Workers => int(v, 0, 256),
        Key::MaxConnections | Key::MaxFlows => int(v, 1, 1_000_000),
        Key::Backlog => int(v, 1, 65_535),
        Key::Count => int(v, 1, 127),
        Key::Fall | Key::Rise => int(v, 1, 100),
        Key::BudgetMinPerSec => int(v, 0, 100_000),
        Key::BudgetRatio => match p % 8 {
            0..=3 => format!("{}.{}", a % 1000, b),
            4 => "0.0".into(),
            5 => "1000.0".into(),
            6 => pick(&["nan", "-inf", "inf", "-0.0", "1000.0000001", "-1.0", "1e308"], a).into(),
            _ => format!("{}.{}", a % 1100, b),
        },
        Key::Send | Key::Expect => match p % 4 {
            0 => toml_str(&staybound::config::escape_bytes(v.text.as_bytes())),
            1 => toml_str("PING\\r\\n"),
            _ => toml_str(&v.text),
        },
        Key::Identity => toml_str(if p % 2 == 0 { pick(REGEXES, p / 2) } else { &v.text }),
        Key::ReplyFrom => list(p % 4, |i| {
            let ip = ip(p.wrapping_add(i), a);
            let max = if ip.contains(':') { 128 } else { 32 };
            match b % 4 {
                0 => toml_str(&ip),
                1 | 2 => toml_str(&format!("{ip}/{}", u32::from(b) % (max + 1))),
                _ => toml_str(&format!("{ip}/{}", u32::from(b) % 300)),
            }
        }),
    }
}

fn value(key: Key, v: &Value) -> String {
    if v.kind < 224 {
        return natural(key, v);
    }
    match v.kind % 6 {
        0 => toml_str(&v.text),
        1 => (i64::from(v.a as i32)).to_string(),
        2 => format!("{:?}", f64::from(v.a) / f64::from(v.b.max(1))),
        3 => (v.pick % 2 == 0).to_string(),
        4 => format!("[{}]", toml_str(&v.text)),
        _ => format!("{{ x = {} }}", v.b),
    }
}

/// Writes the entries of one table; a key set twice is written once (TOML refuses a repeated key).
fn table(out: &mut String, keys: &[Key], entries: &[Entry], seen: &mut Vec<Key>) {
    for e in entries {
        let key = if e.key < 240 {
            keys[usize::from(e.key) % keys.len()]
        } else {
            ALL_KEYS[usize::from(e.key) % ALL_KEYS.len()]
        };
        if !seen.iter().any(|k| k.name() == key.name()) {
            seen.push(key);
            let _ = writeln!(out, "{} = {}", key.name(), value(key, &e.value));
        }
    }
}

fn subtables(out: &mut String, prefix: &str, subs: &[(Sub, Vec<Entry>)]) {
    let mut seen = Vec::new();
    for (sub, entries) in subs {
        if !seen.contains(sub) {
            seen.push(*sub);
            let _ = writeln!(out, "[{prefix}.{}]", sub.name());
            table(out, sub.keys(), entries, &mut Vec::new());
        }
    }
}

/// The TOML text of a document: top-level keys, `[admin]`, `[defaults.*]`, then each `[[service]]` with
/// its `[service.*]` tables.
pub fn render(doc: &Doc) -> String {
    let mut out = String::new();
    let mut top = Vec::new();
    if let Some(v) = &doc.shutdown_grace {
        top.push(Key::ShutdownGrace);
        let _ = writeln!(out, "shutdown_grace = {}", value(Key::ShutdownGrace, v));
    }
    if let Some(v) = &doc.workers {
        top.push(Key::Workers);
        let _ = writeln!(out, "workers = {}", value(Key::Workers, v));
    }
    if let Some(e) = &doc.stray {
        table(&mut out, ALL_KEYS, std::slice::from_ref(e), &mut top);
    }
    if let Some(v) = &doc.admin_listen {
        let _ = writeln!(out, "[admin]\nlisten = {}", value(Key::AdminListen, v));
    }
    subtables(&mut out, "defaults", &doc.defaults);
    for (i, svc) in std::iter::once(&doc.first).chain(&doc.more).enumerate() {
        out.push_str("[[service]]\n");
        let omit = if svc.omit >= 0xf8 { svc.omit } else { 0 };
        let mut seen = Vec::new();
        for (bit, key, v) in
            [(1, Key::Name, &svc.name), (2, Key::Listen, &svc.listen), (4, Key::Upstream, &svc.upstream)]
        {
            if omit & bit == 0 {
                seen.push(key);
                let v = match key {
                    // Distinct names unless the input says otherwise.
                    Key::Name if v.kind < 224 && v.pick <= 240 => {
                        toml_str(pick(NAMES, (i + usize::from(v.pick)) as u32 % 5))
                    }
                    _ => value(key, v),
                };
                let _ = writeln!(out, "{} = {v}", key.name());
            }
        }
        table(&mut out, SERVICE_KEYS, &svc.entries, &mut seen);
        subtables(&mut out, "service", &svc.subs);
    }
    out
}
