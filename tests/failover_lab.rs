//! Failover detection in the namespace lab: a client blocked in BLPOP through staybound learns of a
//! switchover, a silent move, an absent address, a late service and a cut-off node within the bound that
//! `staybound check` computes; a direct client without keep-alive is measured beside it.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::lab::{Host, LOGICAL, Lab, REDIS_PORT, wait_until};
use support::sidecar::{Blocked, Sidecar, margin, runs, wait_blocked};

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
    let reached = support::lab::poll(Duration::from_secs(10), || {
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
