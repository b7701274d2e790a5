//! Metric names, their help text and label sets, and the per-service handles the data path increments.
//! Every series a service can have is registered when the service starts, so dashboards and alerts see
//! it at zero before the first failover. The data path only touches pre-resolved handles (an atomic add);
//! rendering is the admin server's business.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::label::label_enum;
use crate::oserror::ConnectClass;

label_enum! {
    /// What detected a failover; the `signal` label.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Signal {
        Probe = "probe",
        Identity = "identity",
        SessionReset = "session_reset",
        Keepalive = "keepalive",
        Neighbor = "neighbor",
        Admin = "admin",
        /// A reload gave the service another upstream address.
        Reload = "reload",
        /// The node serving the epoch answers in another role than the probe's preset requires (a primary
        /// demoted to a replica or standby).
        Role = "role",
    }
}

label_enum! {
    /// Why staybound ended a session; the `reason` label.
    pub enum ResetReason {
        Failover = "failover",
        UpstreamReset = "upstream_reset",
        UpstreamTimeout = "upstream_timeout",
        Shutdown = "shutdown",
    }
}

label_enum! {
    /// How an accepted client connection ended up; the `outcome` label.
    pub enum Outcome {
        Proxied = "proxied",
        RefusedLimit = "refused_limit",
        RefusedDeadline = "refused_deadline",
        RefusedShutdown = "refused_shutdown",
        /// The client closed its connection while it was held: no upstream was made for it.
        ClientGone = "client_gone",
    }
}

label_enum! {
    /// Why a datagram was not relayed; the `reason` label.
    pub(crate) enum UdpDrop {
        UnknownSource = "unknown_source",
        NoFlow = "no_flow",
        FlowLimit = "flow_limit",
        /// A new client whose address has `max_flows_per_source` flows already.
        SourceLimit = "source_limit",
        SendError = "send_error",
    }
}

label_enum! {
    /// Why the admin server refused a request or a connection; the `reason` label.
    pub(crate) enum AdminRefusal {
        /// The failover hook without the right bearer token.
        Unauthorized = "unauthorized",
        /// An `Origin` header that is not the admin endpoint itself (a browser's cross-site request).
        ForbiddenOrigin = "forbidden_origin",
        /// A `Host` header that is not the admin endpoint's address (DNS rebinding).
        ForbiddenHost = "forbidden_host",
        /// A hook failover of a service within `failover_rate` of the last one.
        RateLimited = "rate_limited",
        /// A connection closed because the admin connection budget was full.
        ConnectionLimit = "connection_limit",
    }
}

const CLIENT_CONNECTIONS: &str = "staybound_client_connections_total";
const CLIENT_ACTIVE: &str = "staybound_client_connections_active";
const HELD: &str = "staybound_held_clients";
const HOLD_SECONDS: &str = "staybound_hold_seconds";
const CONNECT_ATTEMPTS: &str = "staybound_upstream_connect_attempts_total";
const BUDGET_EXHAUSTED: &str = "staybound_retry_budget_exhausted_total";
const UPSTREAM_UP: &str = "staybound_upstream_up";
const UPSTREAM_NOT_READY: &str = "staybound_upstream_not_ready";
const EPOCH: &str = "staybound_epoch";
const FAILOVERS: &str = "staybound_failovers_total";
const DETECTION_SECONDS: &str = "staybound_failover_detection_seconds";
const SESSIONS_RESET: &str = "staybound_sessions_reset_total";
const NEIGHBOR_RESOLVES: &str = "staybound_neighbor_resolves_total";
const SPLIT_BRAIN: &str = "staybound_split_brain";
const SPLIT_BRAIN_DAMPED: &str = "staybound_split_brain_damped_total";
const KNOCKS: &str = "staybound_probe_knocks_total";
const KNOCKS_FAILED: &str = "staybound_probe_knocks_failed_total";
const BYTES: &str = "staybound_bytes_total";
const UDP_DATAGRAMS: &str = "staybound_udp_datagrams_total";
const UDP_DROPPED: &str = "staybound_udp_dropped_total";
const UDP_EVICTED: &str = "staybound_udp_flows_evicted_total";
const UDP_BOUND: &str = "staybound_udp_listener_bound";
const CONFIG_RELOADS: &str = "staybound_config_reloads_total";
const UPGRADES: &str = "staybound_upgrades_total";
const LISTEN_OVERFLOWS: &str = "staybound_listen_overflows_total";
const ADMIN_REFUSED: &str = "staybound_admin_requests_refused_total";
const SESSION_CAPACITY: &str = "staybound_session_capacity";
const GUARD_DESTROYED: &str = "staybound_guard_sockets_destroyed_total";
const GUARD_FAILED: &str = "staybound_guard_destroy_failures_total";
const INTERCEPT_REFUSED: &str = "staybound_intercept_refused_total";

/// The metric registry of one staybound process (or of one test instance).
#[derive(Clone)]
pub struct Telemetry {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    reloads_ok: Counter,
    reloads_error: Counter,
    upgrades_ok: Counter,
    upgrades_error: Counter,
    listen_overflows: Counter,
    admin_refused: [Counter; AdminRefusal::ALL.len()],
    session_capacity: Gauge,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let detection: Vec<f64> = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
        ];
        let hold: Vec<f64> = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
            300.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DETECTION_SECONDS.into()), &detection)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HOLD_SECONDS.into()), &hold))
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let recorder = Arc::new(recorder);
        describe(&recorder);
        let reload = |result: &'static str| {
            recorder.register_counter(&Key::from_parts(CONFIG_RELOADS, vec![Label::new("result", result)]), &meta())
        };
        let (reloads_ok, reloads_error) = (reload("ok"), reload("error"));
        let upgrade = |result: &'static str| {
            let c = recorder.register_counter(&Key::from_parts(UPGRADES, vec![Label::new("result", result)]), &meta());
            c.increment(0);
            c
        };
        let (upgrades_ok, upgrades_error) = (upgrade("ok"), upgrade("error"));
        let listen_overflows = recorder.register_counter(&Key::from_name(LISTEN_OVERFLOWS), &meta());
        listen_overflows.absolute(listen_overflows_now().unwrap_or(0));
        let admin_refused = AdminRefusal::ALL.map(|r| {
            let c = recorder
                .register_counter(&Key::from_parts(ADMIN_REFUSED, vec![Label::new("reason", r.as_str())]), &meta());
            c.increment(0);
            c
        });
        let session_capacity = recorder.register_gauge(&Key::from_name(SESSION_CAPACITY), &meta());
        session_capacity.set(0.0);
        Telemetry {
            recorder,
            handle,
            reloads_ok,
            reloads_error,
            upgrades_ok,
            upgrades_error,
            listen_overflows,
            admin_refused,
            session_capacity,
        }
    }

    /// Counts a request or connection the admin server refused.
    pub(crate) fn admin_refused(&self, r: AdminRefusal) {
        self.admin_refused[r.index()].increment(1);
    }

    /// Sets the number of TCP sessions the open-file limit allows (see `limits`).
    pub fn set_session_capacity(&self, sessions: u64) {
        self.session_capacity.set(sessions as f64);
    }

    /// Prometheus text format of every series.
    pub fn render(&self) -> String {
        if let Some(n) = listen_overflows_now() {
            self.listen_overflows.absolute(n);
        }
        self.handle.render()
    }

    /// Drains histogram buffers; call every few seconds.
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn reload(&self, ok: bool) {
        if ok { self.reloads_ok.increment(1) } else { self.reloads_error.increment(1) }
    }

    /// An upgrade (SIGUSR2): `ok` is counted by the new process once it took over (the old one stops serving
    /// metrics then), `error` by the old one, which keeps running.
    pub fn upgrade(&self, ok: bool) {
        if ok { self.upgrades_ok.increment(1) } else { self.upgrades_error.increment(1) }
    }

    /// Registers every series of one service at zero and returns the handles.
    pub fn service(&self, name: &str) -> Arc<ServiceMetrics> {
        let r = &*self.recorder;
        let svc = Label::new("service", name.to_string());
        let key = |metric: &'static str, extra: Option<(&'static str, &'static str)>| {
            let mut labels = vec![svc.clone()];
            if let Some((k, v)) = extra {
                labels.push(Label::new(k, v));
            }
            Key::from_parts(metric, labels)
        };
        let counter = |m, extra| {
            let c = r.register_counter(&key(m, extra), &meta());
            c.increment(0);
            c
        };
        let gauge = |m| {
            let g = r.register_gauge(&key(m, None), &meta());
            // why: present from the start, but not reset: a service removed and added back by reloads finds
            // its series with the sessions still draining counted, and their ends take them back to zero.
            g.increment(0.0);
            g
        };
        let outcome = Outcome::ALL.map(|o| counter(CLIENT_CONNECTIONS, Some(("outcome", o.as_str()))));
        let connect = ConnectCounts(ConnectClass::ALL.map(|c| counter(CONNECT_ATTEMPTS, Some(("result", c.as_str())))));
        let failovers = Signal::ALL.map(|s| counter(FAILOVERS, Some(("signal", s.as_str()))));
        let resets = ResetReason::ALL.map(|s| counter(SESSIONS_RESET, Some(("reason", s.as_str()))));
        let udp_dropped = UdpDrop::ALL.map(|d| counter(UDP_DROPPED, Some(("reason", d.as_str()))));
        Arc::new(ServiceMetrics {
            outcome,
            active: gauge(CLIENT_ACTIVE),
            held: gauge(HELD),
            hold_seconds: r.register_histogram(&key(HOLD_SECONDS, None), &meta()),
            connect,
            budget_exhausted: counter(BUDGET_EXHAUSTED, None),
            upstream_up: gauge(UPSTREAM_UP),
            upstream_not_ready: gauge(UPSTREAM_NOT_READY),
            epoch: gauge(EPOCH),
            failovers,
            detection_seconds: r.register_histogram(&key(DETECTION_SECONDS, None), &meta()),
            resets,
            neighbor_resolves: counter(NEIGHBOR_RESOLVES, None),
            split_brain: gauge(SPLIT_BRAIN),
            split_brain_damped: counter(SPLIT_BRAIN_DAMPED, None),
            knocks: counter(KNOCKS, None),
            knocks_failed: counter(KNOCKS_FAILED, None),
            bytes_upstream: counter(BYTES, Some(("direction", "upstream"))),
            bytes_client: counter(BYTES, Some(("direction", "client"))),
            udp_upstream: counter(UDP_DATAGRAMS, Some(("direction", "upstream"))),
            udp_client: counter(UDP_DATAGRAMS, Some(("direction", "client"))),
            udp_dropped,
            udp_evicted: counter(UDP_EVICTED, None),
            udp_bound: gauge(UDP_BOUND),
            guard_destroyed: counter(GUARD_DESTROYED, None),
            guard_failed: counter(GUARD_FAILED, None),
            intercept_refused: counter(INTERCEPT_REFUSED, None),
        })
    }
}

/// The network namespace's count of connections dropped because a listen queue was full (Linux keeps
/// no per-socket count): `TcpExt: ListenOverflows` of /proc/net/netstat.
pub(crate) fn listen_overflows_now() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names.split_whitespace().position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

fn meta() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

fn describe(r: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, help: &'static str| {
        (KeyName::from(name), unit, SharedString::from(help))
    };
    for (name, unit, help) in [
        d(CLIENT_CONNECTIONS, None, "Client connections accepted, by how they ended up."),
        d(CONNECT_ATTEMPTS, None, "Upstream connect attempts, by result class."),
        d(BUDGET_EXHAUSTED, None, "Connect retries not made because the retry budget was spent."),
        d(FAILOVERS, None, "Detected failovers of the logical host, by the signal that detected them."),
        d(SESSIONS_RESET, None, "Sessions ended by staybound, by reason."),
        d(
            NEIGHBOR_RESOLVES,
            None,
            "Neighbour entries of the upstream forced to be resolved anew while it was silent (deleted).",
        ),
        d(BYTES, Some(Unit::Bytes), "Bytes relayed, by direction (upstream: client to upstream)."),
        d(UDP_DATAGRAMS, None, "Datagrams relayed, by direction."),
        d(UDP_DROPPED, None, "Datagrams not relayed, by reason."),
        d(UDP_EVICTED, None, "UDP flows ended to make room for a new client at max_flows (the least recently used)."),
        d(CONFIG_RELOADS, None, "Config reloads on SIGHUP, by result."),
        d(UPGRADES, None, "Upgrades on SIGUSR2 (sockets handed to a new binary), by result."),
        d(ADMIN_REFUSED, None, "Admin requests and connections refused, by reason."),
        d(
            INTERCEPT_REFUSED,
            None,
            "Transparent mode: connections refused because their original destination was not the service's upstream.",
        ),
        d(GUARD_DESTROYED, None, "Guard mode: this host's sockets to the upstream destroyed at an epoch's end."),
        d(
            GUARD_FAILED,
            None,
            "Guard mode: sockets to the upstream that could not be destroyed at an epoch's end (not permitted, ...).",
        ),
        d(
            LISTEN_OVERFLOWS,
            None,
            "Connections dropped because a listen queue was full, in this network namespace (Linux counts no finer).",
        ),
    ] {
        r.describe_counter(name, unit, help);
    }
    for (name, unit, help) in [
        d(CLIENT_ACTIVE, None, "Client sessions now proxying."),
        d(HELD, None, "Clients waiting for the upstream."),
        d(UPSTREAM_UP, None, "1 when the logical host is up, else 0."),
        d(UPSTREAM_NOT_READY, None, "1 while the node answers but its probe reply lacks `expect` (not ready), else 0."),
        d(EPOCH, None, "The current epoch: grows by one at each detected failover."),
        d(UDP_BOUND, None, "1 when every UDP listen address of the service is bound, else 0."),
        d(
            SESSION_CAPACITY,
            None,
            "TCP sessions the open-file limit allows (two descriptors each, after a reserve); 0 until set at start.",
        ),
    ] {
        r.describe_gauge(name, unit, help);
    }
    for (name, unit, help) in [
        d(HOLD_SECONDS, Some(Unit::Seconds), "How long clients waited before their upstream connected."),
        d(DETECTION_SECONDS, Some(Unit::Seconds), "From the last good sign of the old epoch to the failover decision."),
    ] {
        r.describe_histogram(name, unit, help);
    }
}

/// The `staybound_upstream_connect_attempts_total` series of one service, one per `result`.
#[derive(Clone, Debug)]
pub struct ConnectCounts([Counter; ConnectClass::ALL.len()]);

impl ConnectCounts {
    /// Counters that count nowhere, for a connector outside a running service.
    pub fn unrecorded() -> ConnectCounts {
        ConnectCounts(ConnectClass::ALL.map(|_| Counter::noop()))
    }

    /// Counts one attempt that ended so.
    pub fn count(&self, c: ConnectClass) {
        self.0[c.index()].increment(1);
    }
}

/// Pre-resolved handles of one service's series.
pub struct ServiceMetrics {
    outcome: [Counter; Outcome::ALL.len()],
    pub active: Gauge,
    pub held: Gauge,
    pub hold_seconds: Histogram,
    connect: ConnectCounts,
    pub budget_exhausted: Counter,
    pub upstream_up: Gauge,
    /// 1 while the node answers but its probe reply lacks `expect`.
    pub upstream_not_ready: Gauge,
    pub epoch: Gauge,
    failovers: [Counter; Signal::ALL.len()],
    pub detection_seconds: Histogram,
    resets: [Counter; ResetReason::ALL.len()],
    /// Neighbour entries of the upstream the detector forced to be resolved anew.
    pub neighbor_resolves: Counter,
    /// 1 while the upstream address flaps between link-layer addresses (two nodes claim it).
    pub split_brain: Gauge,
    /// Epoch ends held back because a split brain was flapping.
    pub split_brain_damped: Counter,
    /// Knocks sent on the probe connection to confirm a neighbour change (`failover::knock`).
    pub knocks: Counter,
    /// Knocks not sent (a firewall dropped them on the way out, or another local error).
    pub knocks_failed: Counter,
    pub bytes_upstream: Counter,
    pub bytes_client: Counter,
    pub udp_upstream: Counter,
    pub udp_client: Counter,
    udp_dropped: [Counter; UdpDrop::ALL.len()],
    /// Flows ended to make room for a new client at `max_flows`.
    pub udp_evicted: Counter,
    pub udp_bound: Gauge,
    /// Guard mode: sockets to the upstream destroyed at epoch ends.
    pub guard_destroyed: Counter,
    /// Guard mode: sockets that matched but could not be destroyed.
    pub guard_failed: Counter,
    /// Transparent mode: connections whose original destination was not the upstream, refused.
    pub intercept_refused: Counter,
}

impl ServiceMetrics {
    pub fn outcome(&self, o: Outcome) -> &Counter {
        &self.outcome[o.index()]
    }
    /// The connect attempt counters, for the service's connectors (they count every attempt).
    pub(crate) fn connect_counts(&self) -> ConnectCounts {
        self.connect.clone()
    }
    pub fn failover(&self, s: Signal) -> &Counter {
        &self.failovers[s.index()]
    }
    pub fn reset(&self, r: ResetReason) -> &Counter {
        &self.resets[r.index()]
    }
    pub(crate) fn udp_dropped(&self, d: UdpDrop) -> &Counter {
        &self.udp_dropped[d.index()]
    }
}
