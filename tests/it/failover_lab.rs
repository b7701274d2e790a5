//! Failover detection in the namespace lab: a client blocked in BLPOP through staybound learns of a
//! switchover, a silent move, an absent address, a late service and a cut-off node within the bound that
//! `staybound check` computes; a direct client without keep-alive is measured beside it. The same holds
//! while staybound is reloaded every 200 ms. A takeover onto a node that answers `-LOADING` for 5 s is one
//! failover, and no client is released to it before it is ready.

use crate::support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use staybound::config::Config;
use staybound::failover::bounds::bounds;
use support::lab::{Host, LOGICAL, Lab, REDIS_PORT};
use support::loadclient::LoadClient;
use support::sidecar::{Blocked, Sidecar, margin, runs, wait_blocked};
use support::wait::wait_until;

fn logical() -> SocketAddr {
    SocketAddr::from((LOGICAL, REDIS_PORT))
}

/// What one run measured.
struct Figures {
    staybound: Duration,
    how: String,
    direct: String,
}

/// Which of `staybound check`'s bounds a scenario is held to.
#[derive(Clone, Copy)]
enum Bound {
    SilentMove,
    BlackHole,
}

/// Runs a scenario `runs()` times. Each run builds the lab with redis on node 1 serving the logical
/// host, staybound with default settings, a client blocked through staybound and one direct; runs `act`
/// (returning the instant the fault began), waits for the new epoch, runs `after` for more checks, and
/// asserts that the client through staybound learned within `bound` plus the margin for a loaded
/// machine. Returns each run's figures; none when the lab is unavailable (skipped loudly).
fn measure(
    tag: &str,
    name: &str,
    bound: Bound,
    act: impl Fn(&Lab) -> Instant,
    after: impl Fn(&Lab, &Sidecar<'_>),
) -> Vec<Figures> {
    let mut figures = Vec::new();
    for _ in 0..runs() {
        let Some(lab) = Lab::new(tag) else {
            return figures;
        };
        lab.start_redis(Host::Node1);
        lab.start_redis(Host::Node2);
        lab.add_logical(Host::Node1, true);
        // The probe and keep-alive path on its own: the neighbour watch has its own lab (neighbor_lab.rs).
        let sc = Sidecar::start(&lab, "[service.probe]\nneighbor = false\n");
        sc.wait_state("up", Duration::from_secs(5));
        let bound = match bound {
            Bound::SilentMove => sc.bounds().silent_move.0,
            Bound::BlackHole => sc.bounds().black_hole.0,
        };
        let via = Blocked::start(&lab, Host::Client, sc.listen());
        let direct = Blocked::start(&lab, Host::Client, logical());
        // Blocked means acknowledged and waiting on node 1.
        wait_blocked(&lab, Host::Node1, 2);
        let t0 = act(&lab);
        let (t1, how) = via.ended(Duration::from_secs(15)).expect("the client through staybound learned within 15 s");
        let staybound = t1.duration_since(t0);
        let direct = match direct.ended(Duration::from_millis(1500)) {
            Some((t, how)) => format!("{how} after {:.3}s", t.duration_since(t0).as_secs_f64()),
            None => format!("still blocked {:.1}s after the fault", t0.elapsed().as_secs_f64()),
        };
        wait_until("a new epoch began", Duration::from_secs(5), || {
            sc.metric("staybound_epoch", &[("service", "redis")]) >= 2.0
        });
        let st = sc.status();
        assert!(st["last_failover"].is_object(), "/status shows the failover: {st}");
        after(&lab, &sc);
        let f = Figures { staybound, how, direct };
        eprintln!(
            "FIGURES {name}: staybound client {} after {:.3}s (bound {:.1}s); direct client: {}",
            f.how,
            f.staybound.as_secs_f64(),
            bound.as_secs_f64(),
            f.direct
        );
        assert!(f.staybound <= bound + margin(), "{name}: noticed after {:?}, bound {bound:?}", f.staybound);
        figures.push(f);
    }
    figures
}

/// A new client through staybound reaches the node whose run_id is `want`.
fn reaches(lab: &Lab, sc: &Sidecar<'_>, want: &str) {
    let listen = sc.listen();
    let mut got = None;
    let reached = support::wait::poll(Duration::from_secs(10), || {
        got = lab.redis_run_id(
            Host::Client,
            match listen.ip() {
                std::net::IpAddr::V4(ip) => ip,
                std::net::IpAddr::V6(_) => unreachable!("the sidecar listens on IPv4"),
            },
        );
        got.as_deref() == Some(want)
    });
    assert!(reached, "a new client through staybound reaches the serving node {want}, got {got:?}");
}

fn signal_counted(sc: &Sidecar<'_>) -> Vec<String> {
    let text = sc.get("/metrics");
    text.lines()
        .filter(|l| l.starts_with("staybound_failovers_total{") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect()
}

#[test]
fn silent_move_is_noticed_within_the_probe_interval() {
    let runs = measure(
        "silent",
        "silent move",
        Bound::SilentMove,
        |lab| {
            let t0 = Instant::now();
            lab.move_logical(Host::Node1, Host::Node2, true);
            t0
        },
        |lab, sc| {
            let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
            sc.wait_state("up", Duration::from_secs(5));
            reaches(lab, sc, &node2);
            let signals = signal_counted(sc);
            assert!(!signals.is_empty(), "a failover signal is counted");
            eprintln!("signals: {signals:?}");
            let detections = sc.metric("staybound_failover_detection_seconds_count", &[("service", "redis")]);
            assert!(detections >= 1.0, "detection time recorded");
            assert_eq!(sc.metric("staybound_upstream_up", &[("service", "redis")]), 1.0);
            let ended = sc.metric("staybound_sessions_reset_total", &[("service", "redis"), ("reason", "failover")])
                + sc.metric("staybound_sessions_reset_total", &[("service", "redis"), ("reason", "upstream_reset")]);
            assert!(ended >= 1.0, "the blocked session was ended and counted");
            let metrics = sc.get("/metrics");
            let excerpt: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && !l.ends_with(" 0")
                        && (l.contains("failover")
                            || l.contains("epoch")
                            || l.contains("sessions_reset")
                            || l.contains("upstream_up")
                            || l.contains("connect_attempts"))
                })
                .collect();
            eprintln!("METRICS after the silent move:\n{}", excerpt.join("\n"));
            let table = lab.exec(Host::Client, &[support::sidecar::BIN, "status", "--admin", support::sidecar::ADMIN]);
            eprintln!("STATUS after the silent move:\n{}", String::from_utf8_lossy(&table.stdout));
        },
    );
    for f in runs {
        assert!(f.direct.starts_with("still blocked"), "the direct client without keep-alive hangs: {}", f.direct);
    }
}

#[test]
fn graceful_switchover_ends_the_session_at_once() {
    measure(
        "switch",
        "graceful switchover",
        Bound::SilentMove,
        |lab| {
            let t0 = Instant::now();
            lab.stop_redis(Host::Node1);
            lab.move_logical(Host::Node1, Host::Node2, true);
            t0
        },
        |lab, sc| {
            let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
            sc.wait_state("up", Duration::from_secs(5));
            reaches(lab, sc, &node2);
        },
    );
}

#[test]
fn absent_address_is_noticed_within_the_black_hole_bound() {
    measure(
        "absent",
        "absent address",
        Bound::BlackHole,
        |lab| {
            let t0 = Instant::now();
            lab.del_logical(Host::Node1);
            t0
        },
        |lab, sc| {
            sc.wait_state("down", Duration::from_secs(5));
            assert_eq!(sc.metric("staybound_upstream_up", &[("service", "redis")]), 0.0);
            // The address appears on node 2, five seconds after it left node 1 (the fault plan's
            // takeover window; a scenario step, not a wait for an event).
            std::thread::sleep(Duration::from_secs(3));
            lab.add_logical(Host::Node2, true);
            let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
            sc.wait_state("up", Duration::from_secs(5));
            reaches(lab, sc, &node2);
        },
    );
}

#[test]
fn late_service_on_the_new_node_is_waited_for() {
    measure(
        "late",
        "late service",
        Bound::SilentMove,
        |lab| {
            lab.stop_redis(Host::Node2);
            let t0 = Instant::now();
            lab.move_logical(Host::Node1, Host::Node2, true);
            t0
        },
        |lab, sc| {
            sc.wait_state("failing-over", Duration::from_secs(5));
            // Node 2's service starts three seconds after its address (a scenario step).
            std::thread::sleep(Duration::from_secs(2));
            lab.start_redis(Host::Node2);
            let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
            sc.wait_state("up", Duration::from_secs(5));
            reaches(lab, sc, &node2);
        },
    );
}

#[test]
fn cut_off_node_is_noticed_within_the_black_hole_bound() {
    measure(
        "cut",
        "cut-off node",
        Bound::BlackHole,
        |lab| {
            let t0 = Instant::now();
            lab.link_down(Host::Node1);
            t0
        },
        |lab, sc| {
            sc.wait_state("down", Duration::from_secs(5));
            lab.link_up(Host::Node1);
            let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).unwrap();
            sc.wait_state("up", Duration::from_secs(10));
            reaches(lab, sc, &node1);
        },
    );
}

const SIGHUP: i32 = 1;

/// The two files the chaos test alternates: they differ in `max_connections`, `[service.hold] deadline`
/// and `[service.probe] timeout`.
const CHAOS_A: &str =
    "max_connections = 8\n[service.hold]\ndeadline = \"5s\"\n[service.probe]\nneighbor = false\ntimeout = \"500ms\"\n";
const LIMITS: (f64, f64) = (8.0, 12.0);

fn chaos_b(a: &str) -> String {
    let b = a
        .replace("max_connections = 8\n", "max_connections = 12\n")
        .replace("deadline = \"5s\"\n", "deadline = \"8s\"\n")
        .replace("timeout = \"500ms\"\n", "timeout = \"800ms\"\n");
    for changed in ["max_connections = 12\n", "deadline = \"8s\"\n", "timeout = \"800ms\"\n"] {
        assert!(b.contains(changed), "{changed} in {b}");
    }
    b
}

/// Sessions staybound carries to `node`'s redis: connections from the client host that sent a command (the
/// probe connection sends none, so it shows `cmd=NULL`). Asked inside the node, over its loopback.
fn sessions_at(lab: &Lab, node: Host) -> usize {
    let out = lab.try_exec_timeout(
        node,
        &["redis-cli", "-h", "127.0.0.1", "-p", &REDIS_PORT.to_string(), "CLIENT", "LIST"],
        Duration::from_secs(2),
    );
    let from = format!(" addr={}:", Host::Client.addr());
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&from) && !l.contains(" cmd=NULL ")).count()
}

/// How many SETs `node`'s redis has served (0 when it is not running).
fn sets_on(lab: &Lab, node: Host) -> u64 {
    let out = lab.redis_cli_at(Host::Client, node.addr(), &["INFO", "commandstats"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `threads` clients through staybound for `span`, each one connecting, sending PING, holding the session a
/// moment and closing, to press on `max_connections`. Returns (served, refused).
fn press(lab: &Lab, to: SocketAddr, threads: usize, span: Duration) -> (u64, u64) {
    let (served, refused) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = Instant::now() + span;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..100_000 {
                    if Instant::now() >= end {
                        break;
                    }
                    let mut b = [0u8; 7];
                    let ok = lab.connect_tcp(Host::Client, to, Duration::from_secs(1)).is_ok_and(|mut c| {
                        c.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
                            && c.write_all(b"*1\r\n$4\r\nPING\r\n").and_then(|()| c.read_exact(&mut b)).is_ok()
                            && &b == b"+PONG\r\n"
                            // why: holding the session a moment is the load, not a synchronisation.
                            && {
                                std::thread::sleep(Duration::from_millis(20));
                                true
                            }
                    });
                    if ok {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        // why: pacing the retries of a refused client, so the load does not spin.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            });
        }
    });
    (served.into_inner(), refused.into_inner())
}

/// The port refuses for about 2 s: the address moves back to node 1, whose service starts 2 s later.
/// Returns how long the service was away.
fn back_to_node1_after_two_seconds(lab: &Lab) -> Duration {
    if lab.redis_pid(Host::Node1).is_some() {
        lab.stop_redis(Host::Node1);
    }
    let t0 = Instant::now();
    lab.move_logical(Host::Node2, Host::Node1, true);
    // why: the scenario: node 1's service starts 2 s after its address.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(t0.elapsed()));
    lab.start_redis(Host::Node1);
    t0.elapsed()
}

/// One chaos run: staybound is sent SIGHUP every 200 ms, alternating two valid files, through (1) clients
/// pressing on `max_connections`, (2) the fault `act` with a client blocked through staybound (measured
/// against the silent-move bound) and (3) a 2 s takeover back to node 1 ridden by a closed-loop client.
/// Meanwhile the sessions at each node are counted.
fn chaos(tag: &str, name: &str, act: impl Fn(&Lab) -> Instant) {
    let Some(lab) = Lab::new(tag) else { return };
    lab.start_redis(Host::Node1);
    lab.start_redis(Host::Node2);
    lab.add_logical(Host::Node1, true);
    let sc = Sidecar::start(&lab, CHAOS_A);
    sc.wait_state("up", Duration::from_secs(5));
    let path = lab.dir().join("staybound.toml");
    let a = std::fs::read_to_string(&path).unwrap();
    let b = chaos_b(&a);
    let config_b = Config::from_toml_str(&b, std::path::Path::new("staybound.toml")).unwrap_or_else(|e| panic!("{e}"));
    // The bound measure() holds the silent move to, for whichever file is in force.
    let bound = sc.bounds().silent_move.0.max(bounds(&config_b.services[0]).silent_move.0);
    let ok_reloads = || sc.metric("staybound_config_reloads_total", &[("result", "ok")]);
    assert_eq!(ok_reloads(), 0.0);

    let stop = AtomicBool::new(false);
    let most = AtomicUsize::new(0);
    let (sent, detected, how, pressed, ride, away, epoch_after_move) = std::thread::scope(|s| {
        let reloader = s.spawn(|| {
            let tmp = path.with_extension("next");
            let mut sent = 0u64;
            for _ in 0..1000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // why: rename, so a reload never reads a file half written.
                std::fs::write(&tmp, [&b, &a][(sent % 2) as usize]).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
                lab.signal(sc.pid, SIGHUP);
                sent += 1;
                // why: the 200 ms between reloads is the scenario's pace, not a synchronisation.
                std::thread::sleep(Duration::from_millis(200));
            }
            sent
        });
        let sampler = s.spawn(|| {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = sessions_at(&lab, Host::Node1).max(sessions_at(&lab, Host::Node2));
                most.fetch_max(n, Ordering::Relaxed);
            }
        });
        let run = || {
            // (1) Clients press on the limit while it changes under them.
            let pressed = press(&lab, sc.listen(), 16, Duration::from_millis(2400));
            wait_until("the pressing clients' sessions ended", Duration::from_secs(5), || {
                sc.metric("staybound_client_connections_active", &[("service", "redis")]) == 0.0
            });
            // (2) The fault, with one client blocked through staybound and nothing else on the way.
            let via = Blocked::start(&lab, Host::Client, sc.listen());
            wait_blocked(&lab, Host::Node1, 1);
            let t0 = act(&lab);
            let (t1, how) =
                via.ended(Duration::from_secs(15)).expect("the client through staybound learned within 15 s");
            sc.wait_state("up", Duration::from_secs(5));
            // The detector may declare the move after the client learned of it: give it the time it would take.
            support::wait::poll(Duration::from_secs(5), || sc.epoch() >= 2);
            let epoch_after_move = sc.epoch();
            // (3) A closed-loop client rides a 2 s takeover back to node 1.
            let load = LoadClient::start(&lab, Host::Client, sc.listen(), Duration::from_secs(5), "chaos");
            wait_until("node 2 serves the closed-loop client", Duration::from_secs(5), || {
                sets_on(&lab, Host::Node2) >= 20
            });
            let away = back_to_node1_after_two_seconds(&lab);
            wait_until("node 1 serves the closed-loop client", Duration::from_secs(10), || {
                sets_on(&lab, Host::Node1) >= 100
            });
            (t1.duration_since(t0), how, pressed, load.finish(), away, epoch_after_move)
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
        stop.store(true, Ordering::Relaxed);
        let sent = reloader.join().unwrap();
        sampler.join().unwrap();
        let (detected, how, pressed, ride, away, epoch_after_move) =
            result.unwrap_or_else(|p| std::panic::resume_unwind(p));
        (sent, detected, how, pressed, ride, away, epoch_after_move)
    });
    wait_until("every reload is counted", Duration::from_secs(10), || ok_reloads() >= sent as f64);
    let applied = ok_reloads();
    let most = most.into_inner();
    let epoch = sc.epoch();
    let m = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("service", "redis")];
        labels.extend_from_slice(extra);
        sc.metric(name, &labels)
    };
    let refused_limit = m("staybound_client_connections_total", &[("outcome", "refused_limit")]);
    let for_reload = m("staybound_failovers_total", &[("signal", "reload")]);
    eprintln!(
        "FIGURES {name} under a SIGHUP every 200 ms: staybound client {how} after {:.3}s (bound {:.1}s); closed-loop client through a {:.2}s takeover: ok {} lost {} longest stall {:.3}s; at most {most} sessions at a node at once (limits {} and {}; pressing clients served {} refused {}, staybound counted {refused_limit} refused_limit); reloads sent {sent} applied {applied} failed {}; epoch {epoch_after_move} after the first move and {epoch} after the second, {for_reload} failovers by reload",
        detected.as_secs_f64(),
        bound.as_secs_f64(),
        away.as_secs_f64(),
        ride.ok,
        ride.lost,
        ride.longest_stall().as_secs_f64(),
        LIMITS.0,
        LIMITS.1,
        pressed.0,
        pressed.1,
        sc.metric("staybound_config_reloads_total", &[("result", "error")]),
    );
    assert!(detected <= bound + margin(), "{name}: noticed after {detected:?}, bound {bound:?}");
    assert_eq!(ride.lost, 0, "no request lost through staybound");
    assert!(ride.ok > 0);
    assert!(most as f64 <= LIMITS.1, "at most max_connections sessions at once: {most}");
    assert!(refused_limit > 0.0, "the limit was reached, so it was tested");
    assert_eq!(applied, sent as f64, "every reload sent was applied");
    assert!(sent >= 20, "{sent} reloads sent");
    assert_eq!(sc.metric("staybound_config_reloads_total", &[("result", "error")]), 0.0);
    assert_eq!(epoch_after_move, 2, "the move was taken for a failover: one epoch");
    assert_eq!(epoch, 3, "one epoch per move, none for a reload");
    assert_eq!(for_reload, 0.0, "no reload was taken for a failover");
}

#[test]
fn reloads_every_200ms_change_nothing_in_a_silent_move() {
    for _ in 0..runs() {
        chaos("chaos-silent", "silent move", |lab| {
            let t0 = Instant::now();
            lab.move_logical(Host::Node1, Host::Node2, true);
            t0
        });
    }
}

#[test]
fn reloads_every_200ms_change_nothing_in_a_graceful_switchover() {
    for _ in 0..runs() {
        chaos("chaos-switch", "graceful switchover", |lab| {
            let t0 = Instant::now();
            lab.stop_redis(Host::Node1);
            lab.move_logical(Host::Node1, Host::Node2, true);
            t0
        });
    }
}

/// A redis-like server on `host` (0.0.0.0:6379): `-LOADING` to every line until `ready` is set to a time
/// that has passed, `+PONG` after. A takeover onto a node that accepts before it has loaded its data.
fn loading_node(lab: &Lab, host: Host, ready: std::sync::Arc<std::sync::Mutex<Option<Instant>>>) {
    let listener = lab.listen_tcp(host, SocketAddr::from(([0, 0, 0, 0], REDIS_PORT))).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let ready = ready.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let is_ready = ready.lock().unwrap().is_some_and(|t| Instant::now() >= t);
                    let reply: &[u8] =
                        if is_ready { b"+PONG\r\n" } else { b"-LOADING Redis is loading the dataset in memory\r\n" };
                    if conn.write_all(reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One PING on a new connection from the namespace `ns` (a legacy client that connects per request): the
/// reply, or what went wrong in brackets.
fn ping_once(ns: &str, to: SocketAddr) -> String {
    support::lab::in_named_ns(ns, || {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
            return "(connect failed)".to_string();
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if s.write_all(b"PING\r\n").is_err() {
            return "(write failed)".into();
        }
        let mut buf = [0u8; 128];
        match s.read(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
            Err(e) => format!("({e})"),
        }
    })
}

#[test]
fn a_takeover_onto_a_node_that_is_loading_is_one_failover_and_holds_clients_until_it_is_ready() {
    for run in 0..runs() {
        let Some(lab) = Lab::new("loading") else { return };
        lab.start_redis(Host::Node1);
        lab.add_logical(Host::Node1, true);
        let ready = std::sync::Arc::new(std::sync::Mutex::new(None));
        loading_node(&lab, Host::Node2, ready.clone());
        let sc = Sidecar::start(
            &lab,
            "[service.probe]\nmode = \"send-expect\"\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"\n",
        );
        sc.wait_state("up", Duration::from_secs(5));
        let listen = sc.listen();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let client = {
            let (stop, lab_ns) = (stop.clone(), lab.ns_name(Host::Client).to_owned());
            std::thread::spawn(move || {
                let mut replies = Vec::new();
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    replies.push((Instant::now(), ping_once(&lab_ns, listen)));
                    // why: the client's own pace, 20 requests a second.
                    std::thread::sleep(Duration::from_millis(50));
                }
                replies
            })
        };
        wait_until("the client is served", Duration::from_secs(5), || {
            sc.metric("staybound_client_connections_total", &[("service", "redis"), ("outcome", "proxied")]) >= 3.0
        });
        // The takeover: node 1 goes, node 2 takes the address and loads for 5 s.
        let moved = Instant::now();
        *ready.lock().unwrap() = Some(moved + Duration::from_secs(5));
        lab.stop_redis(Host::Node1);
        lab.move_logical(Host::Node1, Host::Node2, true);
        wait_until("the client is served by the ready node", Duration::from_secs(20), || {
            Instant::now() > moved + Duration::from_secs(5) && ping_once(lab.ns_name(Host::Client), listen) == "+PONG"
        });
        let served_again =
            sc.metric("staybound_client_connections_total", &[("service", "redis"), ("outcome", "proxied")]);
        wait_until("the client goes on being served", Duration::from_secs(10), || {
            sc.metric("staybound_client_connections_total", &[("service", "redis"), ("outcome", "proxied")])
                >= served_again + 10.0
        });
        stop.store(true, Ordering::Relaxed);
        let replies = client.join().unwrap();
        let ready_at = moved + Duration::from_secs(5);
        let loading = replies.iter().filter(|(_, r)| r.starts_with("-LOADING")).count();
        let failed: Vec<&(Instant, String)> = replies.iter().filter(|(_, r)| r != "+PONG").collect();
        let pongs: Vec<Instant> = replies.iter().filter(|(_, r)| r == "+PONG").map(|(t, _)| *t).collect();
        let stall = pongs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        let first_after = pongs.iter().find(|t| **t > ready_at).map(|t| *t - ready_at);
        let failovers: f64 = ["probe", "identity", "session_reset", "keepalive", "neighbor", "admin", "reload"]
            .iter()
            .map(|s| sc.metric("staybound_failovers_total", &[("service", "redis"), ("signal", s)]))
            .sum();
        eprintln!(
            "FIGURES not-ready node, run {run}: {failovers} failover(s), epoch {}, {loading} -LOADING replies through staybound, {} other failures, {} +PONG, longest stall {:.3}s (the node loaded for 5 s), first +PONG {:.3}s after the node was ready",
            sc.epoch(),
            failed.len() - loading,
            pongs.len(),
            stall.as_secs_f64(),
            first_after.unwrap_or_default().as_secs_f64()
        );
        assert_eq!(failovers, 1.0, "one takeover, one failover");
        assert_eq!(loading, 0, "no client is released to a node that is not ready");
        // why: a request in flight on node 1 when its redis stops is cut off with it (the takeover, not
        // staybound); once staybound knows, every request is held and answered by the ready node.
        assert!(
            failed.len() <= 1 && failed.iter().all(|(at, _)| *at < moved + Duration::from_secs(1)),
            "every request after the takeover answered by a ready node: {failed:?}"
        );
    }
}
