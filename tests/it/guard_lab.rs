//! Guard mode in the namespace lab: staybound runs in the client's namespace with no listener; legacy clients
//! dial the logical host's address themselves. When an epoch ends, their sockets to it are destroyed, so a
//! client blocked in BLPOP gets its error within 0.2 s of the failover decision (a direct client on a host
//! without staybound stays blocked), staybound's own probe session is spared (one epoch per move), and the
//! sockets destroyed are counted.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use support::lab::{Host, LOGICAL, REDIS_PORT};
use support::loadclient::{LoadClient, switchover};
use support::sidecar::{Blocked, Sidecar, margin, runs, two_nodes, wait_blocked};
use support::wait::wait_until;

fn logical() -> SocketAddr {
    SocketAddr::from((LOGICAL, REDIS_PORT))
}

/// Most a blocked client may wait after the failover decision for its socket to be destroyed.
const AFTER_DECISION: Duration = Duration::from_millis(200);

#[test]
fn a_silent_move_aborts_the_direct_clients_sockets_at_the_epoch_s_end() {
    for run in 0..runs() {
        let Some(lab) = two_nodes("guard") else { return };
        let sc = Sidecar::start_with(&lab, "guard = true\n", "[service.probe]\nneighbor = false\n");
        sc.wait_state("up", Duration::from_secs(5));
        let st = sc.status();
        let destroy = st["guard"]["destroy"].as_str().unwrap_or("").to_string();
        assert!(destroy.starts_with("allowed"), "the kernel lets staybound destroy sockets here: {st}");
        assert_eq!(st["listen"], serde_json::json!([]), "guard mode has no listener: {st}");

        // Two unmodified clients straight to the logical host: they are what guard mode looks after.
        let blocked = [Blocked::start(&lab, Host::Client, logical()), Blocked::start(&lab, Host::Client, logical())];
        // Both clients plus staybound's probe connection reach node 1.
        wait_blocked(&lab, Host::Node1, 2);
        let t0 = Instant::now();
        lab.move_logical(Host::Node1, Host::Node2, true);
        let mut seen = Vec::new();
        for b in &blocked {
            let (t, how) =
                b.ended(Duration::from_secs(10)).expect("the guarded client learned of the move within 10 s");
            seen.push((t, SystemTime::now(), how));
        }
        wait_until("the failover is in /status", Duration::from_secs(5), || sc.status()["last_failover"].is_object());
        let st = sc.status();
        let decided = humantime::parse_rfc3339(st["last_failover"]["time"].as_str().unwrap()).unwrap();
        wait_until("the sweep is in /status", Duration::from_secs(5), || {
            sc.status()["guard"]["last_epoch_end"].is_object()
        });
        let st = sc.status();
        let sweep = &st["guard"]["last_epoch_end"];
        let bound = sc.bounds().silent_move.0;
        for (t, wall, how) in &seen {
            let after_move = t.duration_since(t0);
            // The client read its error a moment before `wall`: an upper bound on how long after the decision.
            let after_decision = wall.duration_since(decided).unwrap_or_default();
            eprintln!(
                "FIGURES guard run {run}: blocked direct client {how} after {:.3}s from the move, {:.3}s after the \
                 failover decision (sweep took {:.4}s, destroyed {})",
                after_move.as_secs_f64(),
                after_decision.as_secs_f64(),
                sweep["seconds"].as_f64().unwrap_or(-1.0),
                sweep["destroyed"]
            );
            assert!(how.contains("abort") || how == "reset" || how == "eof", "an error at once: {how}");
            assert!(after_move <= bound + margin(), "noticed after {after_move:?}, bound {bound:?}");
            // As the neighbour lab: half the loaded-machine margin on top (CI shares its cores).
            let limit = AFTER_DECISION + margin() / 2;
            assert!(after_decision <= limit, "{after_decision:?} after the decision, limit {limit:?}");
        }
        assert!(sweep["destroyed"].as_u64().unwrap_or(0) >= 2, "both clients' sockets destroyed: {st}");
        assert_eq!(sweep["failed"].as_u64(), Some(0), "{st}");
        assert!(sc.metric("staybound_guard_sockets_destroyed_total", &[("service", "redis")]) >= 2.0);
        sc.wait_state("up", Duration::from_secs(5));
        // The probe connection is staybound's own: spared, so the move made exactly one epoch.
        assert_eq!(sc.epoch(), 2, "one epoch per move: {}", sc.status());
        // A client that reconnects by itself reaches the new node.
        let node2 = lab.redis_run_id(Host::Client, Host::Node2.addr()).unwrap();
        assert_eq!(lab.redis_run_id(Host::Client, LOGICAL).as_deref(), Some(node2.as_str()));
    }
}

#[test]
fn without_guard_the_same_direct_client_stays_blocked() {
    let Some(lab) = two_nodes("guard-off") else { return };
    // The same staybound without guard mode: it notices the move, and the direct client is not its business.
    let sc = Sidecar::start(&lab, "[service.probe]\nneighbor = false\n");
    sc.wait_state("up", Duration::from_secs(5));
    let direct = Blocked::start(&lab, Host::Client, logical());
    wait_blocked(&lab, Host::Node1, 1);
    lab.move_logical(Host::Node1, Host::Node2, true);
    wait_until("the move is detected", Duration::from_secs(5), || sc.epoch() >= 2);
    let ended = direct.ended(Duration::from_millis(1500));
    eprintln!("FIGURES guard off: direct client {ended:?} 1.5 s after the failover decision");
    assert!(ended.is_none(), "a direct client without keep-alive hangs: {ended:?}");
    assert_eq!(sc.status()["guard"], serde_json::Value::Null);
}

/// A silent move from `from` to `to` (both services running) ridden by a closed-loop client dialling the
/// logical host directly.
fn silent_move(lab: &support::lab::Lab, from: Host, to: Host, tag: &'static str) -> support::loadclient::Stats {
    let load = LoadClient::start(lab, Host::Client, logical(), Duration::from_secs(5), tag);
    wait_until("the closed-loop client runs", Duration::from_secs(5), || load.ok_so_far() >= 100);
    lab.move_logical(from, to, true);
    let before = load.ok_so_far();
    // Past the silent-move bound, so a guard's sweep has come and gone.
    wait_until("the closed-loop client goes on", Duration::from_secs(10), || load.ok_so_far() >= before + 300);
    load.finish()
}

#[test]
fn a_closed_loop_client_reconnects_by_itself_and_loses_no_more_than_direct() {
    for run in 0..runs() {
        let Some(lab) = two_nodes("guard-loop") else { return };
        // The same client and move without staybound, then with staybound guarding it.
        let direct_move = silent_move(&lab, Host::Node1, Host::Node2, "direct");
        let sc = Sidecar::start_with(&lab, "guard = true\n", "[service.probe]\nneighbor = false\n");
        sc.wait_state("up", Duration::from_secs(5));
        let guarded_move = silent_move(&lab, Host::Node2, Host::Node1, "guarded");
        wait_until("the move was a failover", Duration::from_secs(5), || sc.epoch() >= 2);
        // And a 2 s switchover (the service stops, its address moves, the new node's starts 2 s later).
        lab.stop_redis(Host::Node2);
        let guarded_switch = switchover(&lab, logical(), Host::Node1, Host::Node2, "guarded");
        sc.wait_state("up", Duration::from_secs(5));
        lab.kill(sc.pid);
        let direct_switch = switchover(&lab, logical(), Host::Node2, Host::Node1, "direct");
        let f = |s: &support::loadclient::Stats| {
            format!("{} answered, {} lost, longest stall {:.2}s", s.ok, s.lost, s.longest_stall().as_secs_f64())
        };
        eprintln!(
            "FIGURES guard run {run}: silent move: guarded {}; direct {}. 2 s switchover: guarded {}; direct {}",
            f(&guarded_move),
            f(&direct_move),
            f(&guarded_switch),
            f(&direct_switch)
        );
        // The client's own reconnect rides a destroyed socket as it rides the new node's RST.
        assert!(
            guarded_move.lost <= direct_move.lost + 1,
            "guarded {} lost, direct {}",
            guarded_move.lost,
            direct_move.lost
        );
    }
}
