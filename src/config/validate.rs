//! Raw TOML to typed `Config`: every value checked for unit, range and form, `[defaults]` merged key by
//! key, cross-service rules (unique names, known and acyclic `depends_on`) applied. Problems are collected,
//! not returned one by one, so an operator fixes a file in one pass.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{
    DurationText, Inherit, RawAdmin, RawHold, RawIntercept, RawKeepalive, RawProbe, RawService, RawUdp, S,
};
use super::*;

/// One thing wrong in a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    /// The key, spelled as a path (`service[orders].keepalive.idle`).
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Io { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out =
        format!("{} has {} problem{}:", path.display(), problems.len(), if problems.len() == 1 { "" } else { "s" });
    for p in problems {
        out.push_str(&format!("\n  {}:{}:{}: {}: {}", path.display(), p.line, p.column, p.key, p.message));
    }
    out
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: {}", self.line, self.column, self.key, self.message)
    }
}

/// Collects problems against the text they point into.
struct Ctx<'a> {
    text: &'a str,
    /// The config file: relative paths in it (`password_file`, `tls_ca_file`) are taken from its directory.
    path: &'a Path,
    problems: Vec<Problem>,
    /// Keys whose value was of the wrong type and was taken out: already reported, so a "missing" that
    /// follows from taking it out is not.
    taken: HashSet<String>,
}

impl Ctx<'_> {
    fn at(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        if self.taken.contains(key) {
            return;
        }
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem { line, column, key: key.to_string(), message: message.into() });
    }

    fn duration(
        &mut self,
        v: &Option<S<DurationText>>,
        key: &str,
        default: Duration,
        range: (Duration, Duration),
    ) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref().as_str()) {
            Ok(d) if d < range.0 || d > range.1 => {
                self.at(
                    v.span(),
                    key,
                    format!(
                        "{:?} is out of range: must be from {} to {}",
                        v.get_ref(),
                        humantime::format_duration(range.0),
                        humantime::format_duration(range.1)
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.at(v.span(), key, format!("{:?} is not a duration: {e}", v.get_ref()));
                default
            }
        }
    }

    /// Keep-alive times go to the kernel in whole seconds.
    fn seconds(&mut self, v: &Option<S<DurationText>>, key: &str, default: Duration) -> Duration {
        let d = self.duration(v, key, default, (Duration::from_secs(1), Duration::from_secs(32767)));
        if d.subsec_nanos() != 0 {
            if let Some(v) = v {
                self.at(
                    v.span(),
                    key,
                    format!(
                        "{:?} must be a whole number of seconds (the kernel's unit for TCP keep-alive)",
                        v.get_ref()
                    ),
                );
            }
            return default;
        }
        d
    }

    fn int(&mut self, v: &Option<S<i64>>, key: &str, default: i64, range: (i64, i64)) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < range.0 || n > range.1 {
            self.at(v.span(), key, format!("{n} is out of range: must be from {} to {}", range.0, range.1));
            return default;
        }
        n
    }

    fn one_of<T: Copy>(&mut self, v: &Option<S<String>>, key: &str, default: T, choices: &[(&str, T)]) -> T {
        let Some(v) = v else { return default };
        match choices.iter().find(|(name, _)| *name == v.get_ref()) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                self.at(v.span(), key, format!("{:?} is not one of {}", v.get_ref(), names.join(", ")));
                default
            }
        }
    }
}

/// Problems as the operator reads the file: top to bottom.
fn in_line_order(mut problems: Vec<Problem>) -> Vec<Problem> {
    problems.sort_by_key(|p| (p.line, p.column));
    problems
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

/// The dotted key written on the line holding `offset`, under its table header (`service.keepalive.idle`).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty() && !k.starts_with('['));
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k.to_string()),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

/// A duration with a unit: "250ms", "5s", "2m", "1h 30m". A bare number is refused: its unit would be a guess.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("empty; write a number with a unit such as \"250ms\", \"5s\" or \"2m\"".into());
    }
    if trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err("a unit is needed, such as \"250ms\", \"5s\" or \"2m\"".into());
    }
    humantime::parse_duration(trimmed).map_err(|e| e.to_string())
}

pub(super) fn validate(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut cx = Ctx { text, path, problems: Vec::new(), taken: HashSet::new() };
    let (raw, shape) = super::parse::parse(text);
    for p in shape {
        let (line, column) = line_col(text, p.span.start);
        let key = p.key.clone().or_else(|| key_at(text, p.span.start)).unwrap_or_else(|| "(syntax)".into());
        cx.problems.push(Problem { line, column, key: key.clone(), message: p.message });
        cx.taken.insert(key);
    }
    let Some(raw) = raw else {
        return Err(ConfigError::Invalid { path: path.to_path_buf(), problems: in_line_order(cx.problems) });
    };

    let shutdown_grace = cx.duration(
        &raw.shutdown_grace,
        "shutdown_grace",
        defaults::SHUTDOWN_GRACE,
        (Duration::ZERO, Duration::from_secs(3600)),
    );
    let workers = cx.int(&raw.workers, "workers", defaults::WORKERS, (0, 256)) as usize;
    let admin = admin(&mut cx, raw.admin.as_ref(), path);
    let intercept = intercept(&mut cx, raw.intercept.as_ref());

    let defaults = raw.defaults.unwrap_or_default();
    if raw.service.is_empty() {
        cx.at(0..0, "service", "no [[service]] table: there is nothing to run");
    }
    let mut services = Vec::new();
    let mut spans = Vec::new();
    for (index, svc) in raw.service.into_iter().enumerate() {
        let span = svc.span();
        let svc = svc.into_inner();
        let label = match &svc.name {
            Some(n) => format!("service[{}]", n.get_ref()),
            None => format!("service[{index}]"),
        };
        let depends_spans: Vec<Range<usize>> =
            svc.depends_on.as_ref().map(|d| d.get_ref().iter().map(|n| n.span()).collect()).unwrap_or_default();
        spans.push((span.clone(), depends_spans));
        services.push(service(&mut cx, svc, span, &label, &defaults));
    }
    cross_checks(&mut cx, &services, &spans);

    if !cx.problems.is_empty() {
        return Err(ConfigError::Invalid { path: path.to_path_buf(), problems: in_line_order(cx.problems) });
    }
    Ok(Config { path: path.to_path_buf(), shutdown_grace, workers, admin, intercept, services })
}

/// `[admin]`: where it listens, the hook's token (read from its file now, and again at every reload) and
/// rate. Beyond loopback the hook must be authenticated, so a token file is required there.
fn admin(cx: &mut Ctx<'_>, raw: Option<&RawAdmin>, config_path: &Path) -> AdminConfig {
    let default = RawAdmin::default();
    let raw = raw.unwrap_or(&default);
    let listen = match &raw.listen {
        None => defaults::ADMIN_LISTEN,
        Some(v) => v.get_ref().parse().unwrap_or_else(|_| {
            cx.at(v.span(), "admin.listen", format!("{:?} is not an IP:port address", v.get_ref()));
            defaults::ADMIN_LISTEN
        }),
    };
    let failover_rate = cx.duration(
        &raw.failover_rate,
        "admin.failover_rate",
        defaults::FAILOVER_RATE,
        (Duration::ZERO, Duration::from_secs(3600)),
    );
    let (token, token_file) = match &raw.token_file {
        None => {
            if let Some(v) = raw.listen.as_ref().filter(|_| !listen.ip().is_loopback()) {
                cx.at(
                    v.span(),
                    "admin.token_file",
                    format!(
                        "missing: admin.listen {listen} is not loopback, so POST /failover must be authenticated; \
                         set token_file to a file holding a bearer token (such as `openssl rand -hex 32`)"
                    ),
                );
            }
            (None, None)
        }
        Some(v) => {
            let file = token_path(config_path, v.get_ref());
            match read_token(&file) {
                Ok(t) => (Some(AdminToken::new(t)), Some(file)),
                Err(e) => {
                    cx.at(v.span(), "admin.token_file", format!("{:?} {e}", v.get_ref()));
                    (None, Some(file))
                }
            }
        }
    };
    AdminConfig { listen, token, token_file, failover_rate }
}

/// `[intercept]`: the method, and for the connect hook the cgroup it goes on (an absolute path; whether it
/// is a cgroup is found out when the hook is attached, and said then).
fn intercept(cx: &mut Ctx<'_>, raw: Option<&RawIntercept>) -> InterceptConfig {
    let Some(raw) = raw else { return InterceptConfig::default() };
    let method = cx.one_of(
        &raw.method,
        "intercept.method",
        InterceptMethod::Nat,
        &[("nat", InterceptMethod::Nat), ("connect", InterceptMethod::Connect)],
    );
    let cgroup = raw.cgroup.as_ref().and_then(|v| {
        let p = Path::new(v.get_ref());
        if !p.is_absolute() {
            cx.at(v.span(), "intercept.cgroup", format!("{:?} is not an absolute path", v.get_ref()));
            None
        } else if method != InterceptMethod::Connect {
            // A method that is neither is reported already; this would only repeat it.
            if raw.method.as_ref().is_some_and(|m| m.get_ref() != "nat") {
                return None;
            }
            cx.at(v.span(), "intercept.cgroup", "only the connect method uses a cgroup: set method = \"connect\"");
            None
        } else {
            Some(p.to_path_buf())
        }
    });
    InterceptConfig { method, cgroup }
}

/// A relative `token_file` is taken from the config file's directory, wherever staybound was started.
fn token_path(config_path: &Path, written: &str) -> PathBuf {
    let p = Path::new(written);
    match config_path.parent() {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The largest token file read: it holds one token, and a path such as /dev/zero must not hang a check.
const TOKEN_FILE_LIMIT: u64 = 4096;

/// Reads a token file: a regular file of at most [`TOKEN_FILE_LIMIT`] bytes holding one token.
fn read_token(file: &Path) -> Result<String, String> {
    token_from_text(&read_small(file, TOKEN_FILE_LIMIT, "a token file holds one token")?)
}

/// Reads a regular file of at most `limit` bytes as text (a path such as /dev/zero must not hang a check).
/// The messages never quote the content: it may be a secret.
fn read_small(file: &Path, limit: u64, what: &str) -> Result<String, String> {
    use std::io::Read;
    // why: opening a FIFO waits for a writer; a path that is not a regular file is refused before it is opened.
    if std::fs::metadata(file).is_ok_and(|m| !m.is_file()) {
        return Err("is not a regular file".into());
    }
    let f = std::fs::File::open(file).map_err(|e| format!("cannot be read: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mut bytes = Vec::new();
    f.take(limit + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("is larger than {limit} bytes: {what}"));
    }
    String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())
}

/// The password in a password file's text: the file's one line, without its line end. The messages never
/// quote the text: it is a secret.
pub(crate) fn password_from_text(text: &str) -> Result<String, String> {
    let password = text.strip_suffix('\n').map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        return Err("is empty: it must hold the probe's password on one line".into());
    }
    if password.contains(['\n', '\r', '\0']) {
        return Err("holds more than one line (or a NUL): it must hold the probe's password on one line".into());
    }
    Ok(password.to_string())
}

/// The shortest token accepted: anything shorter could be guessed.
const TOKEN_MIN_LEN: usize = 16;

/// The token in a token file's text: surrounding whitespace (a trailing newline) is not part of it; it must
/// be a bearer token (RFC 6750 `token68`: letters, digits and `-._~+/`, then `=` padding) of at least
/// [`TOKEN_MIN_LEN`] characters. The messages never quote the text: it is a secret.
pub(crate) fn token_from_text(text: &str) -> Result<String, String> {
    let token = text.trim();
    if token.is_empty() {
        return Err("is empty: it must hold the bearer token (such as the output of `openssl rand -hex 32`)".into());
    }
    let body = token.trim_end_matches('=');
    let token68 = !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'));
    if !token68 {
        return Err("holds characters a bearer token cannot have: use letters, digits and -._~+/ (such as the \
                    output of `openssl rand -hex 32`) on one line"
            .into());
    }
    if token.len() < TOKEN_MIN_LEN {
        return Err(format!(
            "holds a token of {} characters: use at least {TOKEN_MIN_LEN} (such as `openssl rand -hex 32`)",
            token.len()
        ));
    }
    Ok(token.to_string())
}

fn service(
    cx: &mut Ctx<'_>,
    svc: RawService,
    span: Range<usize>,
    label: &str,
    defaults: &super::raw::RawDefaults,
) -> ServiceConfig {
    let key = |k: &str| format!("{label}.{k}");
    let name = match &svc.name {
        None => {
            cx.at(span.clone(), &key("name"), "missing: every service needs a name");
            String::new()
        }
        Some(n) => {
            let s = n.get_ref();
            if s.is_empty()
                || s.len() > 64
                || !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                cx.at(n.span(), &key("name"), format!("{s:?} must be 1 to 64 characters of [a-z0-9_-]"));
            }
            s.clone()
        }
    };
    let protocol =
        cx.one_of(&svc.protocol, &key("protocol"), Protocol::Tcp, &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)]);

    modes(cx, &svc, protocol_of(&svc), &svc.upstream, label);
    let guard = svc.guard.as_ref().is_some_and(|b| *b.get_ref());
    let intercept = svc.intercept.as_ref().is_some_and(|b| *b.get_ref());
    let listen = match &svc.listen {
        // why: guard mode has no listener: it destroys the sockets clients made themselves.
        None if guard => Vec::new(),
        None => {
            cx.at(
                span.clone(),
                &key("listen"),
                "missing: where legacy clients connect (an IP:port, or a list of them)",
            );
            Vec::new()
        }
        Some(v) => listen_addrs(cx, v, &key("listen")),
    };

    let upstream = match &svc.upstream {
        None => {
            cx.at(span.clone(), &key("upstream"), "missing: the logical host, as IP:port or name:port");
            UpstreamAddr::Ip(SocketAddr::from(([127, 0, 0, 1], 1)))
        }
        Some(v) => parse_upstream(v.get_ref()).unwrap_or_else(|e| {
            cx.at(v.span(), &key("upstream"), format!("{:?} {e}", v.get_ref()));
            UpstreamAddr::Ip(SocketAddr::from(([127, 0, 0, 1], 1)))
        }),
    };

    let source = svc.source.as_ref().and_then(|v| match v.get_ref().parse::<IpAddr>() {
        Ok(ip) => {
            if let UpstreamAddr::Ip(up) = &upstream
                && up.is_ipv4() != ip.is_ipv4()
            {
                cx.at(v.span(), &key("source"), format!("{ip} is not of the upstream's address family ({up})"));
            }
            Some(ip)
        }
        Err(_) => {
            cx.at(v.span(), &key("source"), format!("{:?} is not an IP address", v.get_ref()));
            None
        }
    });
    let freebind = svc.freebind.as_ref().is_some_and(|b| *b.get_ref());
    let depends_on =
        svc.depends_on.as_ref().map(|d| d.get_ref().iter().map(|n| n.get_ref().clone()).collect()).unwrap_or_default();
    let max_connections =
        cx.int(&svc.max_connections, &key("max_connections"), defaults::MAX_CONNECTIONS, (1, 1_000_000)) as usize;
    let backlog = cx.int(&svc.backlog, &key("backlog"), defaults::BACKLOG, (1, 65_535)) as u32;
    let on_failover = cx.one_of(
        &svc.on_failover,
        &key("on_failover"),
        OnFailover::Reset,
        &[("reset", OnFailover::Reset), ("close", OnFailover::Close)],
    );
    let idle_timeout = match &svc.idle_timeout {
        Some(v) if v.get_ref().as_str() == "off" => None,
        None => None,
        some => Some(cx.duration(
            some,
            &key("idle_timeout"),
            Duration::from_secs(3600),
            (Duration::from_secs(1), Duration::from_secs(86_400 * 7)),
        )),
    };

    let keepalive = keepalive(cx, RawKeepalive::inherit(svc.keepalive, defaults.keepalive.as_ref()), &key("keepalive"));
    let own_mode = svc.probe.as_ref().and_then(|p| p.mode.clone());
    let mut probe = probe(cx, RawProbe::inherit(svc.probe, defaults.probe.as_ref()), &key("probe"));
    if protocol == Protocol::Udp && matches!(probe.mode, ProbeMode::KeepOpen | ProbeMode::Connect) {
        // why: "hold" and "connect" are TCP sessions; a UDP service probes with datagrams ("send-expect") or
        // takes its host state from a TCP service in `depends_on`. The built-in default ("hold") and a
        // [defaults.probe] mode meant for TCP services become "off" here; the service's own setting is an error.
        match own_mode {
            Some(m) => cx.at(
                m.span(),
                &key("probe.mode"),
                format!(
                    "{:?} is a TCP probe; a udp service takes \"send-expect\" (sent over UDP) or \"off\" (its host \
                     state then comes from the first service in depends_on)",
                    m.get_ref()
                ),
            ),
            None => probe.mode = ProbeMode::Off,
        }
    }
    if let Some(preset) = &mut probe.preset {
        preset.tls_name = match &upstream {
            UpstreamAddr::Ip(addr) => addr.ip().to_string(),
            UpstreamAddr::Name { host, .. } => host.clone(),
        };
    }
    if protocol == Protocol::Udp
        && let Some(preset) = &probe.preset
    {
        cx.at(
            span.clone(),
            &key("probe.preset"),
            format!("{:?} is a TCP protocol; a udp service probes with send-expect over UDP", preset.kind.as_str()),
        );
    }
    let ride_out = hold(cx, RawHold::inherit(svc.hold, defaults.hold.as_ref()), &key("hold"));
    let own_udp = svc.udp.is_some();
    let udp = udp(cx, RawUdp::inherit(svc.udp, defaults.udp.as_ref()), &key("udp"));
    if own_udp && protocol == Protocol::Tcp {
        cx.at(span.clone(), &key("udp"), "[service.udp] applies only to protocol = \"udp\"");
    }

    ServiceConfig {
        name,
        protocol,
        listen,
        upstream,
        source,
        freebind,
        depends_on,
        max_connections,
        backlog,
        on_failover,
        idle_timeout,
        intercept,
        guard,
        keepalive,
        probe,
        ride_out,
        udp,
    }
}

/// The protocol as written, when it is one.
fn protocol_of(svc: &RawService) -> Option<Protocol> {
    match svc.protocol.as_ref().map(|p| p.get_ref().as_str()) {
        Some("udp") => Some(Protocol::Udp),
        _ => Some(Protocol::Tcp),
    }
}

/// `guard` and `intercept`: what each needs of the rest of the service, every conflict reported at its key.
fn modes(cx: &mut Ctx<'_>, svc: &RawService, protocol: Option<Protocol>, upstream: &Option<S<String>>, label: &str) {
    fn on(v: &Option<S<bool>>) -> Option<&S<bool>> {
        v.as_ref().filter(|b| *b.get_ref())
    }
    let key = |k: &str| format!("{label}.{k}");
    let protocol = protocol.unwrap_or(Protocol::Tcp);
    let upstream = upstream.as_ref().and_then(|u| parse_upstream(u.get_ref()).ok());
    let listen: Vec<SocketAddr> = match svc.listen.as_ref().map(|l| l.get_ref()) {
        Some(toml::Value::String(a)) => a.parse().into_iter().collect(),
        Some(toml::Value::Array(items)) => items.iter().filter_map(|i| i.as_str()?.parse().ok()).collect(),
        _ => Vec::new(),
    };
    if let Some(g) = on(&svc.guard) {
        if on(&svc.intercept).is_some() {
            cx.at(
                g.span(),
                &key("guard"),
                "true together with intercept = true: guard mode has no listener and stays out of the data path, \
                 intercept redirects clients into the listener; choose one",
            );
        }
        if protocol == Protocol::Udp {
            cx.at(
                g.span(),
                &key("guard"),
                "true on a udp service: guard mode destroys TCP sockets; a datagram has no session to end",
            );
        }
        if let Some(l) = &svc.listen {
            cx.at(l.span(), &key("listen"), "set with guard = true: guard mode has no listener (clients dial the upstream themselves); remove listen");
        }
        if let Some(UpstreamAddr::Name { .. }) = upstream
            && let Some(u) = &svc.upstream
        {
            cx.at(
                u.span(),
                &key("upstream"),
                format!(
                    "{:?} is a name: guard mode finds the sockets to destroy by address, so it needs IP:port",
                    u.get_ref()
                ),
            );
        }
    }
    if let Some(i) = on(&svc.intercept) {
        if protocol == Protocol::Udp {
            cx.at(
                i.span(),
                &key("intercept"),
                "true on a udp service: interception redirects TCP connections only (see the README, UDP)",
            );
        }
        match upstream {
            Some(UpstreamAddr::Name { .. }) => {
                if let Some(u) = &svc.upstream {
                    cx.at(
                        u.span(),
                        &key("upstream"),
                        format!(
                            "{:?} is a name: intercept = true redirects connections to one address, so it needs IP:port",
                            u.get_ref()
                        ),
                    );
                }
            }
            Some(UpstreamAddr::Ip(up))
                if !listen.is_empty() && !listen.iter().any(|l| l.is_ipv4() == up.is_ipv4() && l.port() != 0) =>
            {
                let span = svc.listen.as_ref().map_or(i.span(), |l| l.span());
                cx.at(
                    span,
                    &key("listen"),
                    format!(
                        "has no address of the upstream's family ({up}) with a fixed port: intercept = true \
                         redirects connections to the upstream into such a listen address"
                    ),
                );
            }
            _ => {}
        }
    }
}

fn listen_addrs(cx: &mut Ctx<'_>, v: &S<toml::Value>, key: &str) -> Vec<SocketAddr> {
    let items: Vec<&toml::Value> = match v.get_ref() {
        toml::Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    if items.is_empty() {
        cx.at(v.span(), key, "an empty list: give at least one IP:port");
    }
    let mut out = Vec::new();
    for item in items {
        match item.as_str().map(|s| (s, s.parse::<SocketAddr>())) {
            Some((_, Ok(addr))) => out.push(addr),
            Some((s, Err(_))) => {
                cx.at(v.span(), key, format!("{s:?} is not an IP:port address (a name is not allowed here)"))
            }
            None => cx.at(v.span(), key, format!("{item} is not a string \"IP:port\"")),
        }
    }
    out
}

/// `IP:port`, `[v6]:port` or `name:port`.
pub(crate) fn parse_upstream(text: &str) -> Result<UpstreamAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("has port 0".into());
        }
        return Ok(UpstreamAddr::Ip(addr));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("needs a port: IP:port or name:port".into());
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or("has no valid port (1 to 65535)")?;
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid_name {
        return Err("is neither IP:port nor a valid host name with a port".into());
    }
    Ok(UpstreamAddr::Name { host: host.to_string(), port })
}

fn keepalive(cx: &mut Ctx<'_>, k: RawKeepalive, key: &str) -> KeepaliveConfig {
    let key = |k: &str| format!("{key}.{k}");
    let client_idle = match &k.client_idle {
        Some(v) if v.get_ref().as_str() == "off" => None,
        other => Some(cx.seconds(other, &key("client_idle"), defaults::CLIENT_IDLE)),
    };
    KeepaliveConfig {
        idle: cx.seconds(&k.idle, &key("idle"), defaults::KEEPALIVE_IDLE),
        interval: cx.seconds(&k.interval, &key("interval"), defaults::KEEPALIVE_INTERVAL),
        count: cx.int(&k.count, &key("count"), defaults::KEEPALIVE_COUNT, (1, 127)) as u32,
        user_timeout: cx.duration(
            &k.user_timeout,
            &key("user_timeout"),
            defaults::USER_TIMEOUT,
            (Duration::ZERO, Duration::from_secs(3600)),
        ),
        client_idle,
    }
}

fn probe(cx: &mut Ctx<'_>, p: RawProbe, key: &str) -> ProbeConfig {
    let key = |k: &str| format!("{key}.{k}");
    let mode = cx.one_of(
        &p.mode,
        &key("mode"),
        ProbeMode::KeepOpen,
        &[
            ("hold", ProbeMode::KeepOpen),
            ("send-expect", ProbeMode::SendExpect),
            ("connect", ProbeMode::Connect),
            ("off", ProbeMode::Off),
        ],
    );
    let bytes = |cx: &mut Ctx<'_>, v: &Option<S<String>>, k: &str| match v {
        None => Vec::new(),
        Some(v) => unescape(v.get_ref()).unwrap_or_else(|e| {
            cx.at(v.span(), &key(k), format!("{:?}: {e}", v.get_ref()));
            Vec::new()
        }),
    };
    let send = bytes(cx, &p.send, "send");
    let expect = bytes(cx, &p.expect, "expect");
    let preset = preset(cx, &p, &key(""));
    if preset.is_some() {
        // why: the preset's exchange is the probe; it holds a session and asks every interval.
        return ProbeConfig {
            mode: ProbeMode::SendExpect,
            send: Vec::new(),
            expect: Vec::new(),
            identity: None,
            preset,
            ..pacing(cx, &p, &key(""))
        };
    }
    if mode == ProbeMode::SendExpect && send.is_empty() {
        let span = p.mode.as_ref().map(|m| m.span()).unwrap_or(0..0);
        cx.at(
            span,
            &key("send"),
            "mode = \"send-expect\" needs a non-empty `send` (a null or status request of the protocol)",
        );
    }
    for (v, k) in [(&p.send, "send"), (&p.expect, "expect")] {
        if let Some(v) = v
            && mode != ProbeMode::SendExpect
            && !v.get_ref().is_empty()
        {
            cx.at(v.span(), &key(k), format!("is used only with mode = \"send-expect\" (mode is {:?})", mode.as_str()));
        }
    }
    let identity = match &p.identity {
        Some(v) if !v.get_ref().is_empty() => match compile_identity(v.get_ref()) {
            Ok(re) if re.captures_len() == 2 => {
                if mode == ProbeMode::Off {
                    cx.at(v.span(), &key("identity"), "needs a probe: mode is \"off\"");
                }
                Some(re)
            }
            Ok(re) => {
                cx.at(
                    v.span(),
                    &key("identity"),
                    format!("{:?} must have exactly one capture group (it has {})", v.get_ref(), re.captures_len() - 1),
                );
                None
            }
            Err(e) if regex_lite::Regex::new(v.get_ref()).is_ok() => {
                cx.at(
                    v.span(),
                    &key("identity"),
                    format!(
                        "{:?} compiles to a program over {} KiB, which would make every probe slow to match; \
                         use bounded repetition sparingly ({e})",
                        v.get_ref(),
                        IDENTITY_PROGRAM_LIMIT / 1024
                    ),
                );
                None
            }
            Err(e) => {
                cx.at(v.span(), &key("identity"), format!("{:?} is not a valid regex: {e}", v.get_ref()));
                None
            }
        },
        _ => None,
    };
    ProbeConfig { mode, send, expect, identity, preset: None, ..pacing(cx, &p, &key("")) }
}

/// The probe's pacing keys (`interval`, `timeout`, `fall`, `rise`, `neighbor`) with the rest defaulted.
fn pacing(cx: &mut Ctx<'_>, p: &RawProbe, prefix: &str) -> ProbeConfig {
    let key = |k: &str| format!("{prefix}{k}");
    ProbeConfig {
        mode: ProbeMode::KeepOpen,
        interval: cx.duration(
            &p.interval,
            &key("interval"),
            defaults::PROBE_INTERVAL,
            (Duration::from_millis(100), Duration::from_secs(3600)),
        ),
        timeout: cx.duration(
            &p.timeout,
            &key("timeout"),
            defaults::PROBE_TIMEOUT,
            (Duration::from_millis(10), Duration::from_secs(3600)),
        ),
        send: Vec::new(),
        expect: Vec::new(),
        identity: None,
        fall: cx.int(&p.fall, &key("fall"), defaults::FALL, (1, 100)) as u32,
        rise: cx.int(&p.rise, &key("rise"), defaults::RISE, (1, 100)) as u32,
        neighbor: p.neighbor.as_ref().is_none_or(|b| *b.get_ref()),
        split_brain_window: cx.duration(
            &p.split_brain_window,
            &key("split_brain_window"),
            defaults::SPLIT_BRAIN_WINDOW,
            (Duration::ZERO, Duration::from_secs(3600)),
        ),
        preset: None,
    }
}

/// The largest password file read: it holds one password.
const PASSWORD_FILE_LIMIT: u64 = 4096;

/// `preset` and its keys. Without a preset its keys are errors; with one, `send`, `expect` and `identity`
/// are (the preset's exchange replaces them) and `mode` may only be `send-expect` (what a preset does).
fn preset(cx: &mut Ctx<'_>, p: &RawProbe, prefix: &str) -> Option<Preset> {
    let key = |k: &str| format!("{prefix}{k}");
    let kind = match &p.preset {
        Some(v) if !v.get_ref().is_empty() => Some(cx.one_of(
            &p.preset,
            &key("preset"),
            PresetKind::Redis,
            &[("redis", PresetKind::Redis), ("postgres", PresetKind::Postgres)],
        )),
        _ => None,
    };
    fn text(v: &Option<S<String>>) -> &str {
        v.as_ref().map_or("", |v| v.get_ref().as_str())
    }
    let Some(kind) = kind else {
        let keyed: [(Option<Range<usize>>, &str); 6] = [
            (p.role.as_ref().filter(|v| v.get_ref() != "any").map(|v| v.span()), "role"),
            (p.user.as_ref().filter(|v| !v.get_ref().is_empty()).map(|v| v.span()), "user"),
            (p.password_file.as_ref().filter(|v| !v.get_ref().is_empty()).map(|v| v.span()), "password_file"),
            (p.database.as_ref().filter(|v| !v.get_ref().is_empty()).map(|v| v.span()), "database"),
            (p.tls.as_ref().filter(|v| *v.get_ref()).map(|v| v.span()), "tls"),
            (p.tls_ca_file.as_ref().filter(|v| !v.get_ref().is_empty()).map(|v| v.span()), "tls_ca_file"),
        ];
        for (span, k) in keyed.into_iter().filter_map(|(span, k)| Some((span?, k))) {
            cx.at(span, &key(k), "is used only with a preset (preset = \"redis\" or \"postgres\")");
        }
        let _ = cx.one_of(&p.role, &key("role"), Role::Any, &[("any", Role::Any), ("primary", Role::Primary)]);
        return None;
    };
    if let Some(m) = &p.mode
        && m.get_ref() != "send-expect"
    {
        cx.at(
            m.span(),
            &key("mode"),
            format!(
                "{:?} with preset = {:?}: a preset holds a session and asks every interval (\"send-expect\"); \
                 leave mode unset",
                m.get_ref(),
                kind.as_str()
            ),
        );
    }
    for (v, k) in [(&p.send, "send"), (&p.expect, "expect"), (&p.identity, "identity")] {
        if let Some(v) = v
            && !v.get_ref().is_empty()
        {
            cx.at(
                v.span(),
                &key(k),
                format!("must be empty with preset = {:?}: the preset's exchange replaces it", kind.as_str()),
            );
        }
    }
    let role = cx.one_of(&p.role, &key("role"), Role::Any, &[("any", Role::Any), ("primary", Role::Primary)]);
    if let Some(v) = &p.database
        && !v.get_ref().is_empty()
        && kind != PresetKind::Postgres
    {
        cx.at(
            v.span(),
            &key("database"),
            format!("is used only with preset = \"postgres\" (it is {:?})", kind.as_str()),
        );
    }
    let (password, password_file) = match &p.password_file {
        Some(v) if !v.get_ref().is_empty() => {
            let file = token_path(cx.path, v.get_ref());
            let read = read_small(&file, PASSWORD_FILE_LIMIT, "a password file holds one password")
                .and_then(|t| password_from_text(&t));
            match read {
                Ok(pw) => (Some(Secret::new(pw)), Some(file)),
                Err(e) => {
                    cx.at(v.span(), &key("password_file"), format!("{:?} {e}", v.get_ref()));
                    (None, Some(file))
                }
            }
        }
        _ => (None, None),
    };
    // why: both go into the postgres startup message as C strings, and the user into redis' AUTH line.
    for (v, name) in [(&p.user, "user"), (&p.database, "database")] {
        if let Some(v) = v
            && v.get_ref().contains(['\0', '\r', '\n', ' '])
        {
            cx.at(v.span(), &key(name), format!("{:?} may not hold spaces, line ends or NUL", v.get_ref()));
        }
    }
    if kind == PresetKind::Redis && !text(&p.user).is_empty() && password.is_none() && p.password_file.is_none() {
        let span = p.user.as_ref().map(|v| v.span()).unwrap_or(0..0);
        cx.at(span, &key("password_file"), "missing: a redis ACL user logs in with a password (AUTH user password)");
    }
    let tls = tls(cx, p, prefix);
    Some(Preset {
        kind,
        role,
        user: text(&p.user).to_string(),
        password,
        password_file,
        database: text(&p.database).to_string(),
        tls,
        tls_name: String::new(),
    })
}

/// `tls` and `tls_ca_file`: TLS for the probe connection, verified against the CA in the file.
fn tls(cx: &mut Ctx<'_>, p: &RawProbe, prefix: &str) -> Option<TlsCa> {
    let key = |k: &str| format!("{prefix}{k}");
    let on = p.tls.as_ref().is_some_and(|v| *v.get_ref());
    let ca = p.tls_ca_file.as_ref().filter(|v| !v.get_ref().is_empty());
    match (on, ca) {
        (false, None) => None,
        (false, Some(v)) => {
            cx.at(v.span(), &key("tls_ca_file"), "is used only with tls = true");
            None
        }
        (true, None) => {
            let span = p.tls.as_ref().map(|v| v.span()).unwrap_or(0..0);
            cx.at(span, &key("tls_ca_file"), "missing: tls = true verifies the server against a CA file (PEM)");
            None
        }
        (true, Some(v)) => {
            let file = token_path(cx.path, v.get_ref());
            match read_ca(&file) {
                Ok(certs) => Some(TlsCa { file, certs }),
                Err(e) => {
                    cx.at(v.span(), &key("tls_ca_file"), format!("{:?} {e}", v.get_ref()));
                    None
                }
            }
        }
    }
}

/// The largest CA file read: a bundle of a few certificates.
const CA_FILE_LIMIT: u64 = 1024 * 1024;

/// The certificates (DER) of a PEM CA file; at least one.
fn read_ca(file: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let text = read_small(file, CA_FILE_LIMIT, "a CA file holds a few certificates")?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate (PEM, -----BEGIN CERTIFICATE-----)".into());
    }
    // why: a certificate that cannot be a trust anchor would make every probe fail its handshake; said
    // here, it is a config error at the key.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for der in &certs {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("holds a certificate that cannot be a root: {e}"))?;
    }
    Ok(certs)
}

fn hold(cx: &mut Ctx<'_>, h: RawHold, key: &str) -> RideOutConfig {
    let key = |k: &str| format!("{key}.{k}");
    let ms = Duration::from_millis;
    let backoff_initial = cx.duration(
        &h.backoff_initial,
        &key("backoff_initial"),
        defaults::BACKOFF_INITIAL,
        (ms(1), Duration::from_secs(60)),
    );
    let backoff_max =
        cx.duration(&h.backoff_max, &key("backoff_max"), defaults::BACKOFF_MAX, (ms(1), Duration::from_secs(300)));
    if backoff_max < backoff_initial {
        let span = h.backoff_max.as_ref().or(h.backoff_initial.as_ref()).map(|v| v.span()).unwrap_or(0..0);
        cx.at(
            span,
            &key("backoff_max"),
            format!(
                "{} is below backoff_initial ({})",
                humantime::format_duration(backoff_max),
                humantime::format_duration(backoff_initial)
            ),
        );
    }
    let budget_ratio = match &h.budget_ratio {
        None => defaults::BUDGET_RATIO,
        Some(v) => {
            let r = *v.get_ref();
            if !r.is_finite() || !(0.0..=1000.0).contains(&r) {
                cx.at(v.span(), &key("budget_ratio"), format!("{r} is out of range: must be from 0 to 1000"));
                defaults::BUDGET_RATIO
            } else {
                r
            }
        }
    };
    RideOutConfig {
        deadline: cx.duration(
            &h.deadline,
            &key("deadline"),
            defaults::DEADLINE,
            (Duration::ZERO, Duration::from_secs(3600)),
        ),
        connect_timeout: cx.duration(
            &h.connect_timeout,
            &key("connect_timeout"),
            defaults::CONNECT_TIMEOUT,
            (ms(10), Duration::from_secs(300)),
        ),
        backoff_initial,
        backoff_max,
        budget_ratio,
        budget_min_per_sec: cx.int(
            &h.budget_min_per_sec,
            &key("budget_min_per_sec"),
            defaults::BUDGET_MIN_PER_SEC,
            (0, 100_000),
        ) as u32,
        budget_window: cx.duration(
            &h.budget_window,
            &key("budget_window"),
            defaults::BUDGET_WINDOW,
            (Duration::from_secs(1), Duration::from_secs(3600)),
        ),
        release_rate: match cx.int(&h.release_rate, &key("release_rate"), defaults::RELEASE_RATE, (0, 10_000_000)) {
            0 => None,
            n => Some(n as u32),
        },
    }
}

/// The largest compiled program accepted for `probe.identity`. regex-lite's matching time grows with
/// program size times reply length, and a short pattern can compile to a large program:
/// `(a{0,100}){0,100}b` is 19 bytes and takes seconds per 4 KiB reply. Identity patterns in use
/// (`run_id:([0-9a-f]+)` and the like) compile to well under 1 KiB.
pub(crate) const IDENTITY_PROGRAM_LIMIT: usize = 16 * 1024;

/// Compiles an identity pattern as validation accepts it: within [`IDENTITY_PROGRAM_LIMIT`].
pub fn compile_identity(pattern: &str) -> Result<regex_lite::Regex, regex_lite::Error> {
    regex_lite::RegexBuilder::new(pattern).size_limit(IDENTITY_PROGRAM_LIMIT).build()
}

/// Flows of one client address unless `max_flows_per_source` says otherwise (at most `max_flows`).
///
fn udp(cx: &mut Ctx<'_>, u: RawUdp, key: &str) -> UdpConfig {
    let key = |k: &str| format!("{key}.{k}");
    let mut reply_from = Vec::new();
    if let Some(list) = &u.reply_from {
        for item in list.get_ref() {
            match parse_net(item.get_ref()) {
                Ok(net) if net.prefix == 0 => cx.at(
                    item.span(),
                    &key("reply_from"),
                    format!(
                        "{:?} is every address: anyone could answer for the upstream; list the nodes' stationary \
                         addresses (or their subnet)",
                        item.get_ref()
                    ),
                ),
                Ok(net) => reply_from.push(net),
                Err(e) => cx.at(item.span(), &key("reply_from"), format!("{:?} {e}", item.get_ref())),
            }
        }
    }
    let max_flows = cx.int(&u.max_flows, &key("max_flows"), defaults::MAX_FLOWS, (1, 1_000_000)) as usize;
    let max_flows_per_source = match &u.max_flows_per_source {
        None => defaults::FLOWS_PER_SOURCE.min(max_flows),
        Some(v) => {
            let n = cx.int(&u.max_flows_per_source, &key("max_flows_per_source"), 0, (1, 1_000_000)) as usize;
            if n > max_flows {
                cx.at(
                    v.span(),
                    &key("max_flows_per_source"),
                    format!("{n} is more than max_flows ({max_flows}): one address could take every flow"),
                );
            }
            if n == 0 || n > max_flows { defaults::FLOWS_PER_SOURCE.min(max_flows) } else { n }
        }
    };
    UdpConfig {
        reply_from,
        flow_idle: cx.duration(
            &u.flow_idle,
            &key("flow_idle"),
            defaults::FLOW_IDLE,
            (Duration::from_secs(1), Duration::from_secs(86_400)),
        ),
        max_flows,
        max_flows_per_source,
    }
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| "is not an IP address or CIDR block".to_string())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => {
            p.parse::<u8>().ok().filter(|p| *p <= max).ok_or(format!("has a prefix length that is not 0 to {max}"))?
        }
    };
    Ok(IpNet { addr, prefix })
}

fn cross_checks(cx: &mut Ctx<'_>, services: &[ServiceConfig], spans: &[(Range<usize>, Vec<Range<usize>>)]) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut listens: HashMap<(SocketAddr, Protocol), &str> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        if s.name.is_empty() {
            continue;
        }
        if let Some(first) = seen.insert(&s.name, i) {
            let (line, _) = line_col(cx.text, spans[first].0.start);
            cx.at(
                spans[i].0.clone(),
                &format!("service[{}].name", s.name),
                format!("duplicate name: already used by the service at line {line}"),
            );
        }
        for addr in &s.listen {
            if addr.port() != 0
                && let Some(other) = listens.insert((*addr, s.protocol), &s.name)
            {
                cx.at(
                    spans[i].0.clone(),
                    &format!("service[{}].listen", s.name),
                    format!("{addr} is already the listen address of service {other:?}"),
                );
            }
        }
    }
    for (i, s) in services.iter().enumerate() {
        for (j, dep) in s.depends_on.iter().enumerate() {
            let span = spans[i].1.get(j).cloned().unwrap_or(spans[i].0.clone());
            let key = format!("service[{}].depends_on", s.name);
            if dep == &s.name {
                cx.at(span, &key, format!("{dep:?}: a service cannot depend on itself"));
            } else if !seen.contains_key(dep.as_str()) {
                cx.at(span, &key, format!("{dep:?} is not a service in this file"));
            }
        }
    }
    for (i, s) in services.iter().enumerate() {
        // A UDP service without a probe takes its host state from the first of its depends_on; that one must
        // have a detector of its own.
        let followed = s.follows().and_then(|d| services.iter().find(|o| o.name == d));
        if let Some(dep) = followed
            && dep.follows().is_some()
        {
            let span = spans[i].1.first().cloned().unwrap_or(spans[i].0.clone());
            cx.at(
                span,
                &format!("service[{}].depends_on", s.name),
                format!(
                    "{:?} is a udp service without a probe of its own: a udp service with probe mode \"off\" takes \
                     its host state from the first service in depends_on, which must be a tcp service or have a \
                     send-expect probe",
                    dep.name
                ),
            );
        }
    }
    if let Some(cycle) = find_cycle(services) {
        let first = services.iter().position(|s| s.name == cycle[0]).unwrap_or(0);
        cx.at(
            spans[first].0.clone(),
            &format!("service[{}].depends_on", cycle[0]),
            format!("dependency cycle: {}", cycle.join(" -> ")),
        );
    }
}

/// A dependency cycle among services, as the list of names around it (first repeated at the end).
fn find_cycle(services: &[ServiceConfig]) -> Option<Vec<String>> {
    let deps: HashMap<&str, &[String]> = services.iter().map(|s| (s.name.as_str(), s.depends_on.as_slice())).collect();
    let mut done: HashSet<&str> = HashSet::new();
    for start in services.iter().map(|s| s.name.as_str()) {
        let mut path: Vec<&str> = Vec::new();
        if let Some(c) = visit(start, &deps, &mut path, &mut done) {
            return Some(c);
        }
    }
    None
}

fn visit<'a>(
    node: &'a str,
    deps: &HashMap<&'a str, &'a [String]>,
    path: &mut Vec<&'a str>,
    done: &mut HashSet<&'a str>,
) -> Option<Vec<String>> {
    if let Some(pos) = path.iter().position(|n| *n == node) {
        let mut cycle: Vec<String> = path[pos..].iter().map(|s| s.to_string()).collect();
        cycle.push(node.to_string());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node);
    for dep in deps.get(node).copied().unwrap_or(&[]) {
        if dep != node
            && deps.contains_key(dep.as_str())
            && let Some(c) = visit(dep, deps, path, done)
        {
            return Some(c);
        }
    }
    path.pop();
    done.insert(node);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        validate(text, Path::new("t.toml"))
    }

    fn with_probe(probe: &str) -> String {
        format!(
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n[service.probe]\n{probe}"
        )
    }

    #[test]
    fn a_preset_reads_its_password_from_a_file_beside_the_config_and_never_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("redis.pw"), "s3cret-pass\n").unwrap();
        let path = dir.path().join("staybound.toml");
        let text =
            with_probe("preset = \"redis\"\nrole = \"primary\"\nuser = \"probe\"\npassword_file = \"redis.pw\"\n");
        let c = validate(&text, &path).unwrap();
        let p = &c.services[0].probe;
        assert_eq!(p.mode, ProbeMode::SendExpect);
        let preset = p.preset.as_ref().unwrap();
        assert_eq!((preset.kind, preset.role, preset.user.as_str()), (PresetKind::Redis, Role::Primary, "probe"));
        assert_eq!(preset.password.as_ref().map(Secret::expose), Some("s3cret-pass"));
        assert_eq!(preset.password_file.as_deref(), Some(dir.path().join("redis.pw").as_path()));
        assert!(!format!("{c:?}").contains("s3cret"), "Debug carries no secret");
        let report = crate::check::report(&c);
        assert!(report.contains("preset redis, role primary, user probe, password set (from "), "{report}");
        assert!(!report.contains("s3cret"));
        // A file that cannot be used: named, its content never quoted.
        std::fs::write(dir.path().join("two.pw"), "s3cret\nmore\n").unwrap();
        std::fs::write(dir.path().join("empty.pw"), "\n").unwrap();
        let fifo = std::process::Command::new("mkfifo").arg(dir.path().join("fifo.pw")).status();
        assert!(fifo.is_ok_and(|s| s.success()), "mkfifo");
        for (file, says) in [
            ("two.pw", "more than one line"),
            ("empty.pw", "is empty"),
            ("none.pw", "cannot be read"),
            ("fifo.pw", "not a regular file"),
        ] {
            let text = with_probe(&format!("preset = \"postgres\"\npassword_file = \"{file}\"\n"));
            let err = validate(&text, &path).unwrap_err();
            let p = &err.problems()[0];
            assert_eq!((p.line, p.key.as_str()), (7, "service[a].probe.password_file"), "{err}");
            assert!(p.message.contains(file) && p.message.contains(says), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn tls_needs_a_ca_file_of_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staybound.toml");
        // A self-signed CA certificate (P-256, valid until 2126).
        let pem = "-----BEGIN CERTIFICATE-----\n\
                   MIIBjzCCATWgAwIBAgIUKNXvtz26AnkDArzHo2DdBt6ertowCgYIKoZIzj0EAwIw\n\
                   HDEaMBgGA1UEAwwRc3RheWJvdW5kIHRlc3QgQ0EwIBcNMjYxMTI4MDkxMzQwWhgP\n\
                   MjEyNjExMDQwOTEzNDBaMBwxGjAYBgNVBAMMEXN0YXlib3VuZCB0ZXN0IENBMFkw\n\
                   EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEThJ/IHQqkZ2U0LieJh6KES/a9tYgOlfs\n\
                   FY3f3+EUuc45p2/bF9zc2FqNmIn8RtqBHSoPBe8VZSeV24rs43W/MKNTMFEwHQYD\n\
                   VR0OBBYEFJT2YEzBJcdaVpIiBtVLIl2JCTfEMB8GA1UdIwQYMBaAFJT2YEzBJcda\n\
                   VpIiBtVLIl2JCTfEMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIh\n\
                   APVeRLFb58TY46LFpzc1M+58O9p3wSuFWYFAgvoCxhJ7AiBnYNzjcklRlYna013r\n\
                   qNXCmWtHdH94MeciuzqXkO7tdA==\n\
                   -----END CERTIFICATE-----\n";
        let bad = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ0Zq\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("bad.crt"), bad).unwrap();
        std::fs::write(dir.path().join("ca.crt"), pem).unwrap();
        std::fs::write(dir.path().join("empty.crt"), "# nothing here\n").unwrap();
        let text = with_probe("preset = \"postgres\"\ntls = true\ntls_ca_file = \"ca.crt\"\n");
        let c = validate(&text, &path).unwrap();
        let preset = c.services[0].probe.preset.as_ref().unwrap();
        let ca = preset.tls.as_ref().unwrap();
        assert_eq!((ca.file.as_path(), ca.certs.len()), (dir.path().join("ca.crt").as_path(), 1));
        assert_eq!(preset.tls_name, "127.0.0.1", "the upstream's host is the name verified");
        assert!(crate::check::report(&c).contains("tls verified against "));
        for (probe, key, says) in [
            ("tls = true\n", "service[a].probe.tls_ca_file", "missing"),
            ("tls_ca_file = \"ca.crt\"\n", "service[a].probe.tls_ca_file", "only with tls = true"),
            ("tls = true\ntls_ca_file = \"empty.crt\"\n", "service[a].probe.tls_ca_file", "no certificate"),
            ("tls = true\ntls_ca_file = \"none.crt\"\n", "service[a].probe.tls_ca_file", "cannot be read"),
            ("tls = true\ntls_ca_file = \"bad.crt\"\n", "service[a].probe.tls_ca_file", "cannot be a root"),
        ] {
            let err = validate(&with_probe(&format!("preset = \"redis\"\n{probe}")), &path).unwrap_err();
            let p = &err.problems()[0];
            assert_eq!(p.key, key, "{err}");
            assert!(p.message.contains(says), "{err}");
        }
    }

    #[test]
    fn a_nul_in_the_postgres_user_or_database_is_a_config_error_not_a_probe_panic() {
        let err =
            load(&with_probe("preset = \"postgres\"\nuser = \"a\\u0000b\"\ndatabase = \"c\\u0000d\"\n")).unwrap_err();
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["service[a].probe.user", "service[a].probe.database"], "{err}");
    }

    #[test]
    fn preset_keys_are_checked_in_one_pass() {
        let ok = load(&with_probe("preset = \"postgres\"\nuser = \"probe\"\ndatabase = \"app\"\n")).unwrap();
        let preset = ok.services[0].probe.preset.clone().unwrap();
        assert_eq!((preset.kind, preset.role, preset.database.as_str()), (PresetKind::Postgres, Role::Any, "app"));
        assert!(load(&with_probe("preset = \"redis\"\nmode = \"send-expect\"\n")).is_ok());
        assert!(load(&with_probe("preset = \"\"\nrole = \"any\"\n")).unwrap().services[0].probe.preset.is_none());
        let err = load(&with_probe(
            "preset = \"redis\"\nmode = \"hold\"\nsend = \"PING\"\nexpect = \"PONG\"\nidentity = \"(x)\"\nrole = \"leader\"\ndatabase = \"d\"\nuser = \"u\"\n",
        ))
        .unwrap_err();
        let keys: Vec<(usize, &str)> = err.problems().iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (7, "service[a].probe.mode"),
                (8, "service[a].probe.send"),
                (9, "service[a].probe.expect"),
                (10, "service[a].probe.identity"),
                (11, "service[a].probe.role"),
                (12, "service[a].probe.database"),
                (13, "service[a].probe.password_file"),
            ],
            "{err}"
        );
        assert!(err.to_string().contains("\"leader\" is not one of \"any\", \"primary\""), "{err}");
        // Without a preset its keys are errors; so are a bad preset name and a preset on a udp service.
        let err = load(&with_probe("role = \"primary\"\nuser = \"u\"\ntls = true\n")).unwrap_err();
        assert_eq!(err.problems().len(), 3, "{err}");
        assert!(err.problems().iter().all(|p| p.message.contains("only with a preset")), "{err}");
        let err = load(&with_probe("preset = \"mysql\"\n")).unwrap_err();
        assert!(err.to_string().contains("\"mysql\" is not one of \"redis\", \"postgres\""), "{err}");
        let udp = "[[service]]\nname = \"u\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n[service.probe]\npreset = \"redis\"\n";
        let err = load(udp).unwrap_err();
        assert!(err.problems().iter().any(|p| p.key == "service[u].probe.preset"), "{err}");
        // [defaults.probe] may hold a preset: every service inherits it key by key.
        let c = load("[defaults.probe]\npreset = \"redis\"\nrole = \"primary\"\n[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n").unwrap();
        assert_eq!(c.services[0].probe.preset.as_ref().map(|p| p.role), Some(Role::Primary));
    }

    #[test]
    fn minimal_gets_interface_defaults() {
        let c = load("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n").unwrap();
        let s = &c.services[0];
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(s.keepalive.idle, Duration::from_secs(1));
        assert_eq!(s.keepalive.client_idle, Some(Duration::from_secs(30)));
        assert_eq!(s.probe.mode, ProbeMode::KeepOpen);
        assert_eq!(s.ride_out.deadline, Duration::from_secs(30));
        assert_eq!(s.ride_out.budget_ratio, 0.2);
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.on_failover, OnFailover::Reset);
    }

    #[test]
    fn defaults_inherit_key_by_key() {
        let c = load(
            "[defaults.probe]\ninterval = \"2s\"\nfall = 3\n[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"h.example:2\"\n[service.probe]\nfall = 2\n",
        )
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.probe.interval, Duration::from_secs(2));
        assert_eq!(s.probe.fall, 2);
        assert_eq!(s.upstream, UpstreamAddr::Name { host: "h.example".into(), port: 2 });
    }

    #[test]
    fn every_problem_at_once_with_line_and_key() {
        let err =
            load("[[service]]\nname = \"A\"\nlisten = []\n[service.keepalive]\nidle = \"5\"\ncount = 0\n").unwrap_err();
        let p = err.problems();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"service[A].name"), "{keys:?}");
        assert!(keys.contains(&"service[A].listen"), "{keys:?}");
        assert!(keys.contains(&"service[A].upstream"), "{keys:?}");
        assert!(keys.contains(&"service[A].keepalive.idle"), "{keys:?}");
        assert!(keys.contains(&"service[A].keepalive.count"), "{keys:?}");
        let idle = p.iter().find(|p| p.key.ends_with("idle")).unwrap();
        assert_eq!((idle.line, idle.column), (5, 8));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_all_reported_in_one_pass_in_line_order() {
        let text = "workers = \"two\"\n\
            [[service]]\n\
            name = \"a\"\n\
            listen = \"127.0.0.1:1\"\n\
            idel = \"1s\"\n\
            upstream = 7\n\
            [service.hold]\n\
            deadlin = \"30s\"\n\
            deadline = 30\n\
            [service.probe]\n\
            mode = \"sometimes\"\n\
            fall = \"2\"\n";
        let err = load(text).unwrap_err();
        let got: Vec<(usize, &str)> = err.problems().iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (1, "workers"),
                (5, "service[a].idel"),
                (6, "service[a].upstream"),
                (8, "service[a].hold.deadlin"),
                (9, "service[a].hold.deadline"),
                (11, "service[a].probe.mode"),
                (12, "service[a].probe.fall"),
            ],
            "{err}"
        );
        let msg = |line| err.problems().iter().find(|p| p.line == line).unwrap().message.clone();
        assert!(msg(5).contains("unknown field `idel`"), "{}", msg(5));
        assert!(msg(9).contains("\"30s\""), "a bare number gets the unit hint: {}", msg(9));
        assert!(msg(12).contains("whole number"), "{}", msg(12));
    }

    #[test]
    fn a_key_of_the_wrong_type_is_not_also_reported_missing() {
        let err = load("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = 7\n").unwrap_err();
        assert_eq!(err.problems().len(), 1, "{err}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = load("[[service]]\nname = \"a\"\nlisten = [\n").unwrap_err();
        assert_eq!(err.problems()[0].line, 3, "{err}");
    }

    #[test]
    fn cycles_are_found() {
        let svc = |n: &str, d: &str| {
            format!(
                "[[service]]\nname = \"{n}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:2\"\ndepends_on = [\"{d}\"]\n"
            )
        };
        let err = load(&format!("{}{}{}", svc("a", "b"), svc("b", "c"), svc("c", "a"))).unwrap_err();
        assert!(err.to_string().contains("dependency cycle"), "{err}");
    }

    #[test]
    fn udp_services_probe_over_udp_or_follow_a_dependency() {
        let udp = |extra: &str| {
            format!(
                "[[service]]\nname = \"t\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n[[service]]\nname = \"u\"\nprotocol = \"udp\"\nlisten = \"0.0.0.0:53\"\nupstream = \"127.0.0.1:53\"\ndepends_on = [\"t\"]\n{extra}"
            )
        };
        let c = load(&udp("[service.udp]\nreply_from = [\"198.18.0.0/24\"]\nflow_idle = \"1s\"\n")).unwrap();
        let u = c.service("u").unwrap();
        assert_eq!((u.protocol, u.probe.mode), (Protocol::Udp, ProbeMode::Off), "the TCP default becomes off");
        assert_eq!(c.service("t").unwrap().probe.mode, ProbeMode::KeepOpen);
        assert_eq!(u.udp.flow_idle, Duration::from_secs(1));
        let c = load(&udp("[service.probe]\nmode = \"send-expect\"\nsend = \"ping\"\n")).unwrap();
        assert_eq!(c.service("u").unwrap().probe.mode, ProbeMode::SendExpect);
        let err = load(&udp("[service.probe]\nmode = \"hold\"\n")).unwrap_err();
        assert!(err.problems().iter().any(|p| p.key == "service[u].probe.mode"), "{err}");
        // Following a service that itself follows would leave nobody watching the host.
        let chain = format!(
            "{}[[service]]\nname = \"v\"\nprotocol = \"udp\"\nlisten = \"0.0.0.0:54\"\nupstream = \"127.0.0.1:53\"\ndepends_on = [\"u\"]\n",
            udp("")
        );
        let err = load(&chain).unwrap_err();
        assert!(err.problems().iter().any(|p| p.key == "service[v].depends_on"), "{err}");
    }

    #[test]
    fn a_non_loopback_admin_needs_a_token_file_and_the_file_is_read() {
        let svc = "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n";
        let err = load(&format!("[admin]\nlisten = \"0.0.0.0:9901\"\n{svc}")).unwrap_err();
        let p = &err.problems()[0];
        assert_eq!((p.line, p.key.as_str()), (2, "admin.token_file"), "{err}");
        let c = load(&format!("[admin]\nlisten = \"127.0.0.1:9901\"\n{svc}")).unwrap();
        assert_eq!((c.admin.token, c.admin.failover_rate), (None, Duration::from_secs(1)), "optional on loopback");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(dir.path().join("admin.token"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(dir.path().join("empty.token"), "\n").unwrap();
        let with = |file: &str| {
            validate(
                &format!("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{file}\"\nfailover_rate = \"5s\"\n{svc}"),
                &path,
            )
        };
        let c = with("admin.token").unwrap();
        assert_eq!(c.admin.token.as_ref().map(AdminToken::expose), Some(&b"0123456789abcdef0123"[..]));
        assert_eq!(c.admin.token_file, Some(dir.path().join("admin.token")), "relative to the config file");
        assert_eq!(c.admin.failover_rate, Duration::from_secs(5));
        assert!(!format!("{c:?}").contains("0123456789abcdef"), "Debug never shows the token");
        for (file, what) in [("empty.token", "is empty"), ("missing.token", "cannot be read"), ("/", "regular file")] {
            let err = with(file).unwrap_err();
            let p = &err.problems()[0];
            assert_eq!((p.line, p.key.as_str()), (3, "admin.token_file"), "{err}");
            assert!(p.message.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn token_text() {
        assert_eq!(token_from_text("  abcdefghijklmnop+/==\r\n").unwrap(), "abcdefghijklmnop+/==");
        assert!(token_from_text("").unwrap_err().contains("empty"));
        assert!(token_from_text("abcdefgh ijklmnopqrs").unwrap_err().contains("characters"));
        assert!(token_from_text("abcdefghijklmnop\nsecond").unwrap_err().contains("characters"));
        assert!(token_from_text("short").unwrap_err().contains("at least 16"));
        let secret = "abc\"defghijklmnopqrstuvwxyz";
        assert!(!token_from_text(secret).unwrap_err().contains("defghijklmnop"), "the secret is never quoted");
    }

    #[test]
    fn flows_per_source_default_to_64_within_max_flows_and_are_checked() {
        let udp = |keys: &str| {
            load(&format!(
                "[[service]]\nname = \"u\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:53\"\nupstream = \"127.0.0.1:53\"\n[service.udp]\n{keys}"
            ))
        };
        let per = |c: Config| c.services[0].udp.max_flows_per_source;
        assert_eq!(per(udp("").unwrap()), 64);
        assert_eq!(per(udp("max_flows = 10\n").unwrap()), 10, "never more than max_flows");
        assert_eq!(per(udp("max_flows_per_source = 3\n").unwrap()), 3);
        let err = udp("max_flows = 10\nmax_flows_per_source = 11\n").unwrap_err();
        let p: Vec<(usize, usize, &str)> = err.problems().iter().map(|p| (p.line, p.column, p.key.as_str())).collect();
        assert_eq!(p, vec![(8, 24, "service[u].udp.max_flows_per_source")], "{err}");
        assert!(err.to_string().contains("more than max_flows (10)"), "{err}");
        let err = udp("max_flows_per_source = 0\n").unwrap_err();
        assert!(err.to_string().contains("0 is out of range: must be from 1 to 1000000"), "{err}");
        let err = udp("max_flows_per_source = \"many\"\n").unwrap_err();
        assert_eq!(err.problems()[0].key, "service[u].udp.max_flows_per_source", "{err}");
    }

    #[test]
    fn a_reply_from_of_every_address_is_refused() {
        let text = "[[service]]\nname = \"u\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:53\"\nupstream = \"127.0.0.1:53\"\n[service.udp]\nreply_from = [\"10.0.0.0/8\", \"0.0.0.0/0\", \"::/0\"]\n";
        let err = load(text).unwrap_err();
        let keys: Vec<(usize, &str)> = err.problems().iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(keys, vec![(7, "service[u].udp.reply_from"), (7, "service[u].udp.reply_from")], "{err}");
        assert!(err.to_string().contains("every address"), "{err}");
    }

    #[test]
    fn guard_and_intercept_conflicts_are_each_reported_at_their_key() {
        let svc = |keys: &str| load(&format!("[[service]]\nname = \"g\"\n{keys}"));
        let c = svc("upstream = \"198.18.0.100:6379\"\nguard = true\n").unwrap();
        assert!(c.services[0].guard && c.services[0].listen.is_empty(), "guard needs no listen");
        let c = svc("listen = \"127.0.0.1:6379\"\nupstream = \"198.18.0.100:6379\"\nintercept = true\n").unwrap();
        assert!(c.services[0].intercept);
        let problems = |keys: &str| -> Vec<(usize, String)> {
            svc(keys).unwrap_err().problems().iter().map(|p| (p.line, p.key.clone())).collect()
        };
        assert_eq!(
            problems("listen = \"127.0.0.1:1\"\nupstream = \"198.18.0.100:6379\"\nguard = true\nintercept = true\n"),
            vec![(3, "service[g].listen".into()), (5, "service[g].guard".into())]
        );
        assert_eq!(
            problems("protocol = \"udp\"\nupstream = \"198.18.0.100:53\"\nguard = true\n"),
            vec![(5, "service[g].guard".into())],
            "guard on udp"
        );
        assert_eq!(
            problems("upstream = \"db.example:5432\"\nguard = true\n"),
            vec![(3, "service[g].upstream".into())],
            "guard finds sockets by address"
        );
        assert_eq!(
            problems("listen = \"127.0.0.1:1\"\nupstream = \"db.example:5432\"\nintercept = true\n"),
            vec![(4, "service[g].upstream".into())]
        );
        assert_eq!(
            problems(
                "listen = \"127.0.0.1:1\"\nprotocol = \"udp\"\nupstream = \"198.18.0.100:53\"\nintercept = true\n"
            ),
            vec![(6, "service[g].intercept".into())]
        );
        assert_eq!(
            problems("listen = [\"[::1]:1\", \"127.0.0.1:0\"]\nupstream = \"198.18.0.100:6379\"\nintercept = true\n"),
            vec![(3, "service[g].listen".into())],
            "a listen address of the upstream's family with a fixed port"
        );
        let err = svc("upstream = \"198.18.0.100:6379\"\nguard = true\nintercept = true\n").unwrap_err();
        assert!(err.to_string().contains("t.toml:4:9: service[g].guard: true together with intercept"), "{err}");
    }

    #[test]
    fn nets() {
        let n = parse_net("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(parse_net("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(parse_net("1.2.3.4/33").is_err());
    }
}
