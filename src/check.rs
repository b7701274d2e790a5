//! `staybound check`: what a config file means once validated, service by service, with the worst-case
//! detection times its settings allow.

use std::fmt::Write;

use crate::config::{Config, InterceptMethod, ProbeMode, Protocol, UpstreamAddr, escape_bytes};
use crate::failover::bounds::{self, fmt};

/// The report `check` prints for a valid config.
pub fn report(config: &Config) -> String {
    report_with(config, &std::collections::HashMap::new())
}

/// Whether the neighbour-table sign is available for each service's upstream, as `check` shows it.
pub async fn neighbor_notes(config: &Config) -> std::collections::HashMap<String, String> {
    let mut notes = std::collections::HashMap::new();
    for s in &config.services {
        let note = match &s.upstream {
            UpstreamAddr::Name { .. } => "not available: the upstream is a name".to_string(),
            UpstreamAddr::Ip(addr) => match crate::failover::neighbor::unavailable(addr.ip()).await {
                None => "available: the upstream is on a directly connected network".into(),
                Some(why) => format!("not available: {why}"),
            },
        };
        notes.insert(s.name.clone(), note);
    }
    notes
}

/// The report, with a neighbour-watch note per service.
pub(crate) fn report_with(config: &Config, neighbor: &std::collections::HashMap<String, String>) -> String {
    report_full(config, neighbor, None)
}

/// Whether this host lets staybound destroy sockets (guard mode), when a service is in guard mode: found
/// out on a socket pair of its own.
pub fn guard_note(config: &Config) -> Option<String> {
    config.services.iter().any(|s| s.guard).then(|| crate::guard::probe().describe())
}

/// The report, with a neighbour-watch note per service and, with guard services, whether the kernel lets
/// staybound destroy sockets.
pub fn report_full(
    config: &Config,
    neighbor: &std::collections::HashMap<String, String>,
    guard: Option<&str>,
) -> String {
    let mut out = String::new();
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(out, "{}: valid, {} service(s)", config.path.display(), config.services.len());
    let _ = writeln!(out, "admin listen   {}", config.admin.listen);
    // why: only whether the token is set, and where it comes from; never the token.
    let _ = writeln!(
        out,
        "admin hook     token {}, at most one failover per service per {}",
        match &config.admin.token_file {
            Some(f) => format!("set (from {})", f.display()),
            None => "not set (loopback only)".to_string(),
        },
        d(config.admin.failover_rate)
    );
    let _ = writeln!(out, "shutdown_grace {}", d(config.shutdown_grace));
    let _ = writeln!(
        out,
        "workers        {}",
        if config.workers == 0 { "one per core".to_string() } else { config.workers.to_string() }
    );
    let mut warnings = Vec::new();
    if !config.admin.listen.ip().is_loopback() {
        warnings.push(format!(
            "admin listens on {}, not loopback: anyone who reaches it can read /metrics and /status (the failover \
             hook needs the token)",
            config.admin.listen
        ));
    }
    for s in &config.services {
        let proto = match s.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let _ = writeln!(out, "\nservice {} ({proto})", s.name);
        let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        let udp = s.protocol == Protocol::Udp;
        if s.guard {
            let _ = writeln!(
                out,
                "  mode            guard: no listener; at an epoch's end this host's established TCP sockets to {} are destroyed (sock_diag)",
                s.upstream
            );
            let _ = writeln!(out, "  destroy         {}", guard.unwrap_or("not checked"));
            if s.probe.mode == ProbeMode::Off {
                warnings.push(format!(
                    "service {}: guard mode with probe mode \"off\": no traffic goes through staybound and the neighbour \
                     watch needs the probe, so only POST /failover can end an epoch",
                    s.name
                ));
            }
            if guard.is_some_and(|g| !g.starts_with("allowed")) {
                warnings.push(format!(
                    "service {}: guard mode cannot destroy sockets here ({}): its clients are not told of a failover",
                    s.name,
                    guard.unwrap_or("")
                ));
            }
        } else if udp {
            let _ = writeln!(out, "  listen          {}", listen.join(", "));
        } else {
            let _ = writeln!(out, "  listen          {} (backlog {})", listen.join(", "), s.backlog);
        }
        if s.intercept {
            let how = match config.intercept.method {
                InterceptMethod::Nat => format!(
                    "redirected into the listener (nftables table inet {}; needs CAP_NET_ADMIN, or `staybound setup` beforehand)",
                    crate::intercept::TABLE
                ),
                InterceptMethod::Connect => format!(
                    "sent to the listener at connect() by the connect hook on cgroup {} (eBPF, no NAT; needs CAP_BPF and CAP_NET_ADMIN)",
                    config
                        .intercept
                        .cgroup
                        .as_ref()
                        .map_or("(the cgroup v2 root: every process)".into(), |c| c.display().to_string())
                ),
            };
            let _ = writeln!(out, "  mode            transparent: this host's TCP to {} is {how}", s.upstream);
        }
        let kind = match &s.upstream {
            UpstreamAddr::Ip(_) => "address",
            UpstreamAddr::Name { .. } => "name, resolved again on every connect",
        };
        let _ = writeln!(out, "  upstream        {} ({kind})", s.upstream);
        match s.source {
            Some(ip) => {
                let _ = writeln!(
                    out,
                    "  source          {ip} (bound {}{})",
                    if udp { "by every flow's socket" } else { "before connect" },
                    if s.freebind { ", freebind" } else { "" }
                );
            }
            None if s.intercept && config.intercept.method == InterceptMethod::Nat => {
                // why: the redirected clients and staybound's own upstream connections then go from one
                // address to one address and port, and share its ephemeral ports and TIME_WAIT table
                // (README, "Transparent mode"): at a high rate of new connections that is the cost to know.
                let _ = writeln!(
                    out,
                    "  source          (the kernel's choice, the same as the redirected clients': both share this host's ephemeral ports to {}; a `source` address of staybound's own separates them)",
                    s.upstream
                );
            }
            None => {
                let _ = writeln!(out, "  source          (the kernel's choice)");
            }
        }
        if !s.depends_on.is_empty() {
            let _ = writeln!(out, "  depends_on      {}", s.depends_on.join(", "));
        }
        if udp {
            report_udp(&mut out, s, &mut warnings);
            continue;
        }
        let _ = writeln!(
            out,
            "  clients         max_connections {}, idle_timeout {}, on_failover {}",
            s.max_connections,
            s.idle_timeout.map_or("off".to_string(), d),
            match s.on_failover {
                crate::config::OnFailover::Reset => "reset",
                crate::config::OnFailover::Close => "close",
            }
        );
        let k = &s.keepalive;
        let _ = writeln!(
            out,
            "  keepalive       idle {}, interval {}, count {}, user_timeout {}, client_idle {}",
            d(k.idle),
            d(k.interval),
            k.count,
            d(k.user_timeout),
            k.client_idle.map_or("off".to_string(), d)
        );
        let p = &s.probe;
        let mut probe = format!(
            "{} every {}, timeout {}, fall {}, rise {}",
            p.mode.as_str(),
            d(p.interval),
            d(p.timeout),
            p.fall,
            p.rise
        );
        match &p.preset {
            Some(preset) => {
                let _ = write!(probe, ", preset {}, role {}", preset.kind.as_str(), preset.role.as_str());
                if !preset.user.is_empty() {
                    let _ = write!(probe, ", user {}", preset.user);
                }
                if !preset.database.is_empty() {
                    let _ = write!(probe, ", database {}", preset.database);
                }
                // why: only whether a password is set, and where it comes from; never the password.
                if let Some(file) = &preset.password_file {
                    let _ = write!(probe, ", password set (from {})", file.display());
                }
                if let Some(ca) = &preset.tls {
                    let _ = write!(probe, ", tls verified against {}", ca.file.display());
                }
            }
            None if p.mode == ProbeMode::SendExpect => {
                let _ = write!(probe, ", send \"{}\", expect \"{}\"", escape_bytes(&p.send), escape_bytes(&p.expect));
            }
            None => {}
        }
        if let Some(re) = &p.identity {
            let _ = write!(probe, ", identity /{}/", re.as_str());
        }
        let _ = writeln!(out, "  probe           {probe}");
        let h = &s.ride_out;
        let _ = writeln!(
            out,
            "  hold            deadline {}, connect_timeout {}, backoff {}..{}, budget {} per first attempt + {}/s over {}, release {}",
            d(h.deadline),
            d(h.connect_timeout),
            d(h.backoff_initial),
            d(h.backoff_max),
            h.budget_ratio,
            h.budget_min_per_sec,
            d(h.budget_window),
            h.release_rate.map_or("all at once".to_string(), |r| format!("{r}/s"))
        );
        if let Some(note) = neighbor.get(&s.name) {
            let damp = match (note.starts_with("available"), p.split_brain_window.is_zero()) {
                (false, _) => String::new(),
                (true, true) => "; a split brain is not damped".to_string(),
                (true, false) => format!("; a split brain ends at most one epoch per {}", d(p.split_brain_window)),
            };
            let _ = writeln!(out, "  neighbour watch {note}{damp}");
        }
        let b = bounds::bounds(s);
        let _ = writeln!(out, "  worst case to notice:");
        let _ =
            writeln!(out, "    a silent move (new node answers RST)  {:>6}  {}", fmt(b.silent_move.0), b.silent_move.1);
        let _ =
            writeln!(out, "    a black-holed host                    {:>6}  {}", fmt(b.black_hole.0), b.black_hole.1);
        let _ = writeln!(out, "    a connect that cannot complete        {:>6}  {}", fmt(b.connect.0), b.connect.1);
        warnings.extend(b.warnings().into_iter().map(|w| format!("service {}: {w}", s.name)));
    }
    if !warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings:");
        for w in warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }
    out
}

/// The part of the report that differs for a UDP service: no connections, keep-alives or hold, a probe
/// over UDP or a host state taken from a dependency, and flows that stay across failovers.
fn report_udp(out: &mut String, s: &crate::config::ServiceConfig, warnings: &mut Vec<String>) {
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let p = &s.probe;
    match s.follows() {
        Some(dep) => {
            let _ = writeln!(out, "  probe           off: the host state is service {dep}'s (first of depends_on)");
        }
        None if p.mode == ProbeMode::SendExpect => {
            let mut probe = format!(
                "send-expect over UDP every {}, timeout {}, fall {}, rise {}, send \"{}\", expect \"{}\"",
                d(p.interval),
                d(p.timeout),
                p.fall,
                p.rise,
                escape_bytes(&p.send),
                escape_bytes(&p.expect)
            );
            if let Some(re) = &p.identity {
                let _ = write!(probe, ", identity /{}/", re.as_str());
            }
            let _ = writeln!(out, "  probe           {probe}");
        }
        None => {
            let _ = writeln!(out, "  probe           off: the host state is always up (no depends_on)");
        }
    }
    if let UpstreamAddr::Name { .. } = s.upstream {
        let _ = writeln!(
            out,
            "  resolve         for each new flow, within hold.connect_timeout {}",
            d(s.ride_out.connect_timeout)
        );
    }
    let nets: Vec<String> = s.udp.reply_from.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "  udp             reply_from [{}], flow_idle {}, max_flows {} ({} per source address); flows stay across \
         failovers",
        nets.join(", "),
        d(s.udp.flow_idle),
        s.udp.max_flows,
        s.udp.max_flows_per_source
    );
    if p.mode == ProbeMode::SendExpect {
        let b = bounds::bounds(s);
        let _ = writeln!(out, "  worst case to notice:");
        let _ =
            writeln!(out, "    a black-holed host                    {:>6}  {}", fmt(b.black_hole.0), b.black_hole.1);
        if b.black_hole.0 > bounds::WARN_ABOVE {
            warnings.push(format!(
                "service {}: a black-holed host is noticed only after {}",
                s.name,
                fmt(b.black_hole.0)
            ));
        }
    }
}
