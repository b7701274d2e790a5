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

/// Builds the lab with redis on node 1 serving the logical host, staybound with default settings, a
/// client blocked through staybound and one direct; runs `act` (returning the instant the fault began);
/// returns the figures and leaves the lab for more checks.
fn scenario(tag: &str, act: impl FnOnce(&Lab) -> Instant, after: impl FnOnce(&Lab, &Sidecar<'_>)) -> Option<Figures> {
    let lab = Lab::new(tag)?;
    lab.start_redis(Host::Node1);
    lab.start_redis(Host::Node2);
    lab.add_logical(Host::Node1, true);
    let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).expect("node1 run_id");
    // The probe and keep-alive path on its own: the neighbour watch has its own lab (neighbor_lab.rs).
    let sc = Sidecar::start(&lab, "[service.probe]\nneighbor = false\n");
    sc.wait_state("up", Duration::from_secs(5));
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
    let _ = node1;
    Some(Figures { staybound, how, direct })
}

fn report(name: &str, bound: Duration, f: &Figures) {
    eprintln!(
        "FIGURES {name}: staybound client {} after {:.3}s (bound {:.1}s); direct client: {}",
        f.how,
        f.staybound.as_secs_f64(),
        bound.as_secs_f64(),
        f.direct
    );
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
    for _ in 0..runs() {
        let mut bound = Duration::ZERO;
        let Some(f) = scenario(
            "silent",
            |lab| {
                let t0 = Instant::now();
                lab.move_logical(Host::Node1, Host::Node2, true);
                t0
            },
            |lab, sc| {
                bound = sc.bounds().silent_move.0;
                let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
                sc.wait_state("up", Duration::from_secs(5));
                reaches(lab, sc, &node2);
                let signals = signal_counted(sc);
                assert!(!signals.is_empty(), "a failover signal is counted");
                eprintln!("signals: {signals:?}");
                let detections = sc.metric("staybound_failover_detection_seconds_count", &[("service", "redis")]);
                assert!(detections >= 1.0, "detection time recorded");
                assert_eq!(sc.metric("staybound_upstream_up", &[("service", "redis")]), 1.0);
                let ended = sc
                    .metric("staybound_sessions_reset_total", &[("service", "redis"), ("reason", "failover")])
                    + sc.metric(
                        "staybound_sessions_reset_total",
                        &[("service", "redis"), ("reason", "upstream_reset")],
                    );
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
                let table =
                    lab.exec(Host::Client, &[support::sidecar::BIN, "status", "--admin", support::sidecar::ADMIN]);
                eprintln!("STATUS after the silent move:\n{}", String::from_utf8_lossy(&table.stdout));
            },
        ) else {
            return;
        };
        report("silent move", bound, &f);
        assert!(f.staybound <= bound + margin(), "noticed after {:?}, bound {:?}", f.staybound, bound);
        assert!(f.direct.starts_with("still blocked"), "the direct client without keep-alive hangs: {}", f.direct);
    }
}

#[test]
fn graceful_switchover_ends_the_session_at_once() {
    for _ in 0..runs() {
        let mut bound = Duration::ZERO;
        let Some(f) = scenario(
            "switch",
            |lab| {
                let t0 = Instant::now();
                lab.stop_redis(Host::Node1);
                lab.move_logical(Host::Node1, Host::Node2, true);
                t0
            },
            |lab, sc| {
                bound = sc.bounds().silent_move.0;
                let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
                sc.wait_state("up", Duration::from_secs(5));
                reaches(lab, sc, &node2);
            },
        ) else {
            return;
        };
        report("graceful switchover", bound, &f);
        assert!(f.staybound <= bound + margin());
    }
}

#[test]
fn absent_address_is_noticed_within_the_black_hole_bound() {
    for _ in 0..runs() {
        let mut bound = Duration::ZERO;
        let Some(f) = scenario(
            "absent",
            |lab| {
                let t0 = Instant::now();
                lab.del_logical(Host::Node1);
                t0
            },
            |lab, sc| {
                bound = sc.bounds().black_hole.0;
                sc.wait_state("down", Duration::from_secs(5));
                assert_eq!(sc.metric("staybound_upstream_up", &[("service", "redis")]), 0.0);
                // The address appears on node 2, five seconds after it left node 1.
                std::thread::sleep(Duration::from_secs(3));
                lab.add_logical(Host::Node2, true);
                let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
                sc.wait_state("up", Duration::from_secs(5));
                reaches(lab, sc, &node2);
            },
        ) else {
            return;
        };
        report("absent address", bound, &f);
        assert!(f.staybound <= bound + margin(), "noticed after {:?}, bound {:?}", f.staybound, bound);
    }
}

#[test]
fn late_service_on_the_new_node_is_waited_for() {
    for _ in 0..runs() {
        let mut bound = Duration::ZERO;
        let Some(f) = scenario(
            "late",
            |lab| {
                lab.stop_redis(Host::Node2);
                let t0 = Instant::now();
                lab.move_logical(Host::Node1, Host::Node2, true);
                t0
            },
            |lab, sc| {
                bound = sc.bounds().silent_move.0;
                sc.wait_state("failing-over", Duration::from_secs(5));
                // Node 2's service starts three seconds after its address.
                std::thread::sleep(Duration::from_secs(2));
                lab.start_redis(Host::Node2);
                let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
                sc.wait_state("up", Duration::from_secs(5));
                reaches(lab, sc, &node2);
            },
        ) else {
            return;
        };
        report("late service", bound, &f);
        assert!(f.staybound <= bound + margin(), "noticed after {:?}, bound {:?}", f.staybound, bound);
    }
}

#[test]
fn cut_off_node_is_noticed_within_the_black_hole_bound() {
    for _ in 0..runs() {
        let mut bound = Duration::ZERO;
        let Some(f) = scenario(
            "cut",
            |lab| {
                let t0 = Instant::now();
                lab.link_down(Host::Node1);
                t0
            },
            |lab, sc| {
                bound = sc.bounds().black_hole.0;
                sc.wait_state("down", Duration::from_secs(5));
                lab.link_up(Host::Node1);
                let node1 = lab.redis_run_id(Host::Client, Host::Node1.addr()).unwrap();
                sc.wait_state("up", Duration::from_secs(10));
                reaches(lab, sc, &node1);
            },
        ) else {
            return;
        };
        report("cut-off node", bound, &f);
        assert!(f.staybound <= bound + margin(), "noticed after {:?}, bound {:?}", f.staybound, bound);
    }
}
