//! `staybound demo`: a self-contained demonstration on loopback, with no root and no outside server.
//!
//! The demo owns, in one process and for about ten seconds:
//! * a logical host ([`forwarder`]) on 127.0.0.10 whose address "moves" between two nodes ([`node`]) on
//!   127.0.0.11 and 127.0.0.12, each answering a line protocol with its own name;
//! * a staybound [`Instance`] in front of the logical host, configured from text like an operator's file,
//!   with a send-expect probe whose `identity` reads the node's name from the reply;
//! * two legacy clients ([`client`]) with minimal retries: one through staybound, one straight to the
//!   logical address;
//! * the script: warm-up, a switchover (node 1 stops gracefully, the port refuses connects for a moment,
//!   node 2 takes over), a pause, a crash-like move (node 2 vanishes, the address moves to node 1 at once,
//!   node 2's sessions are dropped silently), a pause, then everything stops;
//! * the report: a timeline of what happened and what staybound detected, and what each client saw.
//!
//! Every task it starts hangs off one cancellation token that is cancelled however `run` ends, and the
//! whole run is bounded by [`LIMIT`].

mod client;
mod forwarder;
mod node;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::failover::HostView;
use crate::metrics::Telemetry;
use crate::registry::Registry;
// The demo starts and stops a staybound; what it reads of it goes through the registry.
use crate::server::Instance;
use client::{Log, Seen};
use forwarder::Forwarder;
use node::Node;

/// The longest a demo may take, whatever happens.
pub(crate) const LIMIT: Duration = Duration::from_secs(28);
/// The longest warm-up accepted: the rest of the script takes about seven seconds.
pub(crate) const MAX_WARMUP: u64 = 15;
/// How long the logical port refuses connects during the switchover. Shorter than the clients' timeout
/// (`client::TIMEOUT`) by more than staybound needs to see the port back, so a held client is served
/// within its own timeout: staybound holds clients, it cannot make a client wait longer than it will.
const SWITCHOVER_GAP: Duration = Duration::from_millis(600);
/// Quiet time after each move.
const PAUSE: Duration = Duration::from_millis(2500);
/// The staybound service's name.
const SERVICE: &str = "demo";

const LOGICAL_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const NODE_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 11), Ipv4Addr::new(127, 0, 0, 12)];

/// Runs the demonstration and returns its report.
///
/// # Errors
/// A warm-up over [`MAX_WARMUP`], an address that cannot be bound, staybound failing to start or to see
/// the logical host, or the run exceeding [`LIMIT`].
pub async fn run(warmup: u64) -> anyhow::Result<String> {
    anyhow::ensure!(
        warmup <= MAX_WARMUP,
        "--warmup {warmup} is too long: at most {MAX_WARMUP} s, so the demo stays under half a minute"
    );
    let stop = CancellationToken::new();
    // why: if the run fails or times out half-way, every node, forwarder session and client still stops.
    let _stop_all = stop.clone().drop_guard();
    tokio::time::timeout(LIMIT, script(Duration::from_secs(warmup), stop))
        .await
        .map_err(|_| anyhow!("the demo did not finish within {} s", LIMIT.as_secs()))?
}

/// A move of the logical host, as the report describes it.
struct Move {
    name: &'static str,
    at: Instant,
    to: String,
}

/// The logical host: the forwarder on its address and the two nodes behind it (`None` while stopped).
struct Cluster {
    fwd: Forwarder,
    nodes: [Option<Node>; 2],
    addrs: [SocketAddr; 2],
    stop: CancellationToken,
}

impl Cluster {
    fn start(stop: &CancellationToken) -> anyhow::Result<Cluster> {
        let node1 = Node::start(1, SocketAddr::new(IpAddr::V4(NODE_IPS[0]), 0), stop)?;
        let node2 = Node::start(2, SocketAddr::new(IpAddr::V4(NODE_IPS[1]), 0), stop)?;
        let addrs = [node1.addr, node2.addr];
        let fwd = Forwarder::start(IpAddr::V4(LOGICAL_IP), addrs[0], stop)?;
        Ok(Cluster { fwd, nodes: [Some(node1), Some(node2)], addrs, stop: stop.clone() })
    }

    async fn stop_node(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.stop().await;
        }
    }

    fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let id = u8::try_from(i + 1).unwrap_or(u8::MAX);
        self.nodes[i] = Some(Node::start(id, self.addrs[i], &self.stop)?);
        Ok(())
    }

    /// A switchover from node `from` to node `to`: the logical port refuses connects, `from` stops
    /// gracefully, and after `gap` the port answers again, from `to`.
    async fn switchover(&mut self, from: usize, to: usize, gap: Duration) -> anyhow::Result<()> {
        self.fwd.refuse().await;
        self.stop_node(from).await;
        tokio::time::sleep(gap).await;
        self.fwd.serve(self.addrs[to]).await
    }

    /// A crash-like move: node `from` vanishes and the address answers from `to` at once.
    async fn crash_move(&mut self, from: usize, to: usize) {
        self.fwd.silent_move(self.addrs[to]);
        self.stop_node(from).await;
    }

    async fn stop(self) {
        self.fwd.stop().await;
        for node in self.nodes.into_iter().flatten() {
            node.stop().await;
        }
    }
}

/// What the run produced, for the report.
struct Outcome {
    moves: Vec<Move>,
    end: Instant,
    through: Log,
    direct: Log,
}

async fn script(warmup: Duration, stop: CancellationToken) -> anyhow::Result<String> {
    let timeline = Timeline::new();
    let mut cluster = Cluster::start(&stop)?;
    let logical = cluster.fwd.addr();
    timeline.note(format!("node 1 serving the logical host {logical}; node 2 standing by"));

    let config_text = config_text(logical);
    let started = async {
        let config = Config::from_toml_str(&config_text, Path::new("demo.toml"))
            .context("the demo's staybound config is invalid")?;
        Instance::start(config, Telemetry::new()).await.context("staybound did not start")
    };
    let instance = match started.await {
        Ok(i) => i,
        Err(e) => {
            cluster.stop().await;
            return Err(e);
        }
    };
    let listen = instance.listen_addrs(SERVICE).first().copied();
    let outcome = match listen {
        Some(listen) => drive(instance.registry(), &mut cluster, listen, &timeline, warmup, &stop).await,
        None => Err(anyhow!("staybound has no listen address")),
    };
    let status = crate::admin::status_json(instance.registry());
    let metrics = instance.registry().telemetry.render();
    let admin = instance.admin_addr();
    instance.shutdown(Duration::from_secs(1)).await;
    stop.cancel();
    let nodes = cluster.addrs;
    cluster.stop().await;
    timeline.note("everything stopped");
    let outcome = outcome?;

    let setup = Setup { logical, nodes, listen: listen.unwrap_or(logical), admin, config_text };
    Ok(report(&setup, &timeline, &outcome, &status, &metrics))
}

/// Starts the watcher and the clients, plays the two moves, stops the clients.
async fn drive(
    registry: &Registry,
    cluster: &mut Cluster,
    listen: SocketAddr,
    timeline: &Timeline,
    warmup: Duration,
    stop: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let view = host_view(registry)?;
    wait_for_identity(view.clone(), "node-1", Duration::from_secs(3)).await?;
    timeline.note(format!("staybound up on {listen}: epoch 1, its probe sees node-1"));
    tokio::spawn(watch_staybound(view, timeline.clone(), stop.child_token()));

    let clients_stop = stop.child_token();
    // why: however this function ends, the clients stop with it.
    let _clients_stop = clients_stop.clone().drop_guard();
    let through = tokio::spawn(client::run(listen, clients_stop.clone()));
    let direct = tokio::spawn(client::run(cluster.fwd.addr(), clients_stop.clone()));
    timeline.note("clients start: one through staybound, one direct to the logical host");
    tokio::time::sleep(warmup).await;

    let mut moves = Vec::new();
    moves.push(Move { name: "switchover", at: Instant::now(), to: "node-2".into() });
    timeline.note("switchover begins: the logical port refuses connects; node 1 stops gracefully (FIN)");
    cluster.switchover(0, 1, SWITCHOVER_GAP).await?;
    timeline.note("node 2 serving the logical host");
    tokio::time::sleep(PAUSE / 2).await;
    cluster.start_node(0)?;
    timeline.note("node 1 back, standing by");
    tokio::time::sleep(PAUSE / 2).await;

    moves.push(Move { name: "crash-like move", at: Instant::now(), to: "node-1".into() });
    timeline.note(
        "crash-like move: node 2 vanishes; the logical host answers from node 1 at once; \
         node 2's sessions are dropped without FIN or RST",
    );
    cluster.crash_move(1, 0).await;
    tokio::time::sleep(PAUSE).await;

    clients_stop.cancel();
    let through = through.await.context("the client through staybound failed")?;
    let direct = direct.await.context("the direct client failed")?;
    let end = Instant::now();
    timeline.note("clients stop");
    Ok(Outcome { moves, end, through, direct })
}
/// The config an operator would write for this logical host, as text.
fn config_text(upstream: SocketAddr) -> String {
    format!(
        r#"shutdown_grace = "1s"

[admin]
listen = "127.0.0.1:0"

[[service]]
name = "{SERVICE}"
listen = "127.0.0.1:0"
upstream = "{upstream}"
on_failover = "reset"

[service.probe]
mode = "send-expect"          # TCP keep-alives cannot see a silent move on loopback: ask the service
interval = "250ms"
timeout = "250ms"
send = 'GET staybound-probe\n'
expect = "VALUE "
identity = 'VALUE (node-[0-9]+) '

[service.hold]
deadline = "5s"
connect_timeout = "250ms"
backoff_initial = "25ms"
backoff_max = "100ms"         # while the host is away, look again at least every 100ms
"#
    )
}

/// The detector's view of the demo service.
fn host_view(registry: &Registry) -> anyhow::Result<watch::Receiver<HostView>> {
    let entry = registry.entry(SERVICE).context("staybound runs no demo service")?;
    Ok(entry.service.load().detector.view.clone())
}

async fn wait_for_identity(mut view: watch::Receiver<HostView>, want: &str, within: Duration) -> anyhow::Result<()> {
    let seen = tokio::time::timeout(within, view.wait_for(|v| v.identity.as_deref() == Some(want))).await;
    match seen {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(anyhow!("staybound's detector stopped before its probe saw {want}")),
        Err(_) => Err(anyhow!("staybound's probe did not see {want} within {} s", within.as_secs())),
    }
}

/// Notes every change of staybound's view of the logical host, dated by when staybound made it (the
/// watcher may run a little later, after the clients that were woken by the same change).
async fn watch_staybound(mut view: watch::Receiver<HostView>, timeline: Timeline, stop: CancellationToken) {
    let mut last = view.borrow_and_update().clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = view.changed() => if r.is_err() { break },
        }
        let now = view.borrow_and_update().clone();
        let mut at = Instant::now();
        let mut parts = Vec::new();
        if now.epoch != last.epoch {
            let epochs = if now.epoch > last.epoch + 1 {
                format!("epochs {}..{}", last.epoch + 1, now.epoch)
            } else {
                format!("epoch {}", now.epoch)
            };
            let how = match &now.last_failover {
                Some(f) => {
                    at = at.min(timeline.instant_of(f.at));
                    format!(", signal {}, {:.0} ms after its last good sign", f.signal.as_str(), ms(f.detection))
                }
                None => String::new(),
            };
            parts.push(format!(
                "staybound detected failover: {epochs}{how}; sessions of epoch {} ended",
                now.epoch.saturating_sub(1)
            ));
        }
        if now.state != last.state {
            at = at.min(now.since);
            let held = if now.state.connectable() { "" } else { ", new clients are held" };
            parts.push(format!("upstream {}{held}", now.state.as_str()));
        }
        if now.identity != last.identity
            && let Some(id) = &now.identity
        {
            parts.push(format!("probe sees {id}"));
        }
        if !parts.is_empty() {
            let text = parts.join("; ");
            let text = if text.starts_with("staybound") { text } else { format!("staybound: {text}") };
            timeline.note_at(at, text);
        }
        last = now;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What happened, when: notes from the script and from staybound's watcher.
#[derive(Clone)]
struct Timeline {
    origin: Instant,
    /// The wall clock at `origin`, to place staybound's `SystemTime` records on the timeline.
    wall: SystemTime,
    notes: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline { origin: Instant::now(), wall: SystemTime::now(), notes: Arc::new(Mutex::new(Vec::new())) }
    }

    fn instant_of(&self, at: SystemTime) -> Instant {
        self.origin + at.duration_since(self.wall).unwrap_or_default()
    }

    fn note(&self, text: impl Into<String>) {
        self.note_at(Instant::now(), text);
    }

    fn note_at(&self, at: Instant, text: impl Into<String>) {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).push((at, text.into()));
    }

    fn t(&self, at: Instant) -> String {
        format!("t+{:.2}s", at.saturating_duration_since(self.origin).as_secs_f64())
    }

    fn sorted(&self) -> Vec<(Instant, String)> {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        notes.sort_by_key(|(at, _)| *at);
        notes
    }
}

/// Where everything was.
struct Setup {
    logical: SocketAddr,
    nodes: [SocketAddr; 2],
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    config_text: String,
}

/// What one client saw of one move: how it noticed, when the new node first answered, requests lost.
struct MoveSeen {
    noticed: Option<(Instant, String)>,
    answered: Option<Instant>,
    lost: usize,
}

fn move_seen(log: &Log, m: &Move, until: Instant) -> MoveSeen {
    let window = || log.events.iter().filter(|(t, _)| *t >= m.at && *t < until);
    let noticed = window().find_map(|(t, s)| match s {
        Seen::AttemptFailed(why) | Seen::Lost(why) => Some((*t, why.to_string())),
        Seen::Ok { node, .. } if *node == m.to => Some((*t, format!("answered by {node}"))),
        Seen::Ok { .. } => None,
    });
    let answered = window().find_map(|(t, s)| match s {
        Seen::Ok { node, .. } if *node == m.to => Some(*t),
        _ => None,
    });
    let lost = window().filter(|(_, s)| matches!(s, Seen::Lost(_))).count();
    MoveSeen { noticed, answered, lost }
}

fn report(setup: &Setup, timeline: &Timeline, outcome: &Outcome, status: &serde_json::Value, metrics: &str) -> String {
    let (moves, end) = (&outcome.moves, outcome.end);
    let clients = [("through staybound", &outcome.through), ("direct", &outcome.direct)];
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "staybound demo: a logical host that fails over, on loopback");
    let _ = writeln!(w, "  logical host  {} (a forwarder standing in for a relocatable address)", setup.logical);
    let _ = writeln!(w, "  nodes         node-1 on {}, node-2 on {}", setup.nodes[0], setup.nodes[1]);
    let admin = setup.admin.map_or_else(|| "none".to_string(), |a| a.to_string());
    let _ = writeln!(w, "  staybound     {} -> {} (admin {admin}), with this config:", setup.listen, setup.logical);
    for line in setup.config_text.lines().filter(|l| !l.is_empty()) {
        let _ = writeln!(w, "                  {line}");
    }
    let _ = writeln!(
        w,
        "  clients       one request every {} ms, {} s timeout per attempt, at most one reconnect per request",
        client::PACE.as_millis(),
        client::TIMEOUT.as_secs()
    );

    // The clients' side of each move joins the timeline.
    let tl = timeline.clone();
    for (i, m) in moves.iter().enumerate() {
        let until = moves.get(i + 1).map_or(end, |n| n.at);
        for (name, log) in clients {
            let seen = move_seen(log, m, until);
            if let Some((t, how)) = &seen.noticed {
                tl.note_at(*t, format!("[{name}] notices: {how}"));
            }
            if let Some(t) = seen.answered {
                let lost = match seen.lost {
                    0 => String::new(),
                    n => format!(" ({n} request{} lost before)", if n == 1 { "" } else { "s" }),
                };
                tl.note_at(t, format!("[{name}] first answer from {}{lost}", m.to));
            }
        }
    }
    let _ = writeln!(w, "\ntimeline");
    for (at, text) in tl.sorted() {
        let _ = writeln!(w, "  {:>8}  {text}", tl.t(at));
    }

    let _ = writeln!(w, "\nclients (a request is lost when its attempt and its one reconnect both fail)");
    let mut rows: Vec<(String, [String; 2])> = vec![
        (String::new(), clients.map(|(name, _)| name.to_string())),
        ("requests answered".into(), clients.map(|(_, log)| log.ok().to_string())),
        ("requests lost".into(), clients.map(|(_, log)| log.lost().to_string())),
        ("reconnects".into(), clients.map(|(_, log)| log.reconnects().to_string())),
        (
            "longest stall between answers".into(),
            clients.map(|(_, log)| match log.longest_stall() {
                Some((d, from)) => format!("{:.2}s from {}", d.as_secs_f64(), timeline.t(from)),
                None => "-".into(),
            }),
        ),
    ];
    for (i, m) in moves.iter().enumerate() {
        let until = moves.get(i + 1).map_or(end, |n| n.at);
        let seen = clients.map(|(_, log)| move_seen(log, m, until));
        let after = |t: Instant| format!("+{:.3}s", t.saturating_duration_since(m.at).as_secs_f64());
        rows.push((
            format!("{}: noticed", m.name),
            [0, 1].map(|c| match &seen[c].noticed {
                Some((t, how)) => format!("{}, {how}", after(*t)),
                None => "never".into(),
            }),
        ));
        rows.push((
            format!("{}: first answer from {}", m.name, m.to),
            [0, 1].map(|c| seen[c].answered.map_or_else(|| "never".into(), after)),
        ));
        rows.push((format!("{}: requests lost", m.name), [0, 1].map(|c| seen[c].lost.to_string())));
    }
    let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 2;
    let cell_width = rows.iter().map(|(_, c)| c[0].len()).max().unwrap_or(0) + 2;
    for (label, cells) in &rows {
        let _ = writeln!(w, "  {label:<label_width$}{:<cell_width$}{}", cells[0], cells[1]);
    }

    let _ = writeln!(w, "\nstaybound");
    for (metric, label) in [
        ("staybound_failovers_total", "signal"),
        ("staybound_sessions_reset_total", "reason"),
        ("staybound_client_connections_total", "outcome"),
        ("staybound_upstream_connect_attempts_total", "result"),
    ] {
        let series = nonzero_series(metrics, metric, label);
        let list = if series.is_empty() {
            "none".to_string()
        } else {
            series.iter().map(|(l, v)| format!("{l} {v}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(w, "  {metric:<44}{list}");
    }
    let held = (value_of(metrics, "staybound_hold_seconds_count"), value_of(metrics, "staybound_hold_seconds_sum"));
    if let (Some(n), Some(sum)) = held {
        let _ = writeln!(w, "  {:<44}{n} held clients, {sum:.3} s of holding in all", "staybound_hold_seconds");
    }
    let _ = writeln!(w, "  /status at the end: {status}");

    let _ = writeln!(w);
    let [(a, la), (b, lb)] = clients;
    let _ = writeln!(
        w,
        "summary: {a} lost {} of {} requests; {b} lost {} of {} requests",
        la.lost(),
        la.ok() + la.lost(),
        lb.lost(),
        lb.ok() + lb.lost()
    );
    out
}

/// The non-zero series of a counter, by one label: `[("probe", 1), ...]`.
fn nonzero_series(text: &str, name: &str, label: &str) -> Vec<(String, String)> {
    let key = format!("{label}=\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{')?;
            if metric != name || value == "0" {
                return None;
            }
            let rest = &labels[labels.find(&key)? + key.len()..];
            Some((rest[..rest.find('"')?].to_string(), value.to_string()))
        })
        .collect()
}

/// The value of a series with no labels but `service`.
fn value_of(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let metric = series.split_once('{').map_or(series, |(m, _)| m);
        if metric == name { value.parse().ok() } else { None }
    })
}
