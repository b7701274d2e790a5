//! Riding out a takeover in the namespace lab: a closed-loop legacy client (SET then GET at about 200
//! requests a second, one reconnect per request) through staybound and, beside it, direct.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::lab::{Host, LOGICAL, Lab, REDIS_PORT};
use support::loadclient::{LoadClient, Stats};
use support::sidecar::{Sidecar, margin, runs};

fn logical() -> SocketAddr {
    SocketAddr::from((LOGICAL, REDIS_PORT))
}

/// Runs both clients through a fault that `act` causes and ends; `act` returns how long the service
/// was away.
fn ride(tag: &str, timeout: Duration, act: impl FnOnce(&Lab) -> Duration) -> Option<(Stats, Stats, Duration)> {
    let lab = Lab::new(tag)?;
    lab.start_redis(Host::Node1);
    lab.add_logical(Host::Node1, true);
    let sc = Sidecar::start(&lab, "");
    sc.wait_state("up", Duration::from_secs(5));
    let via = LoadClient::start(&lab, Host::Client, sc.listen(), timeout, "via");
    let direct = LoadClient::start(&lab, Host::Client, logical(), timeout, "direct");
    // why: the clients run a while before the fault, so each has a rhythm to stall from.
    std::thread::sleep(Duration::from_millis(800));
    let away = act(&lab);
    std::thread::sleep(Duration::from_millis(1500));
    let (via, direct) = (via.finish(), direct.finish());
    Some((via, direct, away))
}

fn show(name: &str, via: &Stats, direct: &Stats, away: Duration) {
    eprintln!(
        "FIGURES {name}: away {:.3}s | staybound: ok {} lost {} longest stall {:.3}s ({:+.3}s beyond the time away) | direct: ok {} lost {} longest stall {:.3}s",
        away.as_secs_f64(),
        via.ok,
        via.lost,
        via.longest_stall().as_secs_f64(),
        via.longest_stall().as_secs_f64() - away.as_secs_f64(),
        direct.ok,
        direct.lost,
        direct.longest_stall().as_secs_f64()
    );
}

/// The port refuses for about 2 s: the address moves to node 2, whose service starts 2 s later.
fn refused_two_seconds(lab: &Lab) -> Duration {
    let t0 = Instant::now();
    lab.move_logical(Host::Node1, Host::Node2, true);
    std::thread::sleep(Duration::from_secs(2).saturating_sub(t0.elapsed()));
    lab.start_redis(Host::Node2);
    t0.elapsed()
}

/// The address is absent for about 2 s, then appears on node 2 (whose service runs).
fn absent_two_seconds(lab: &Lab) -> Duration {
    lab.start_redis(Host::Node2);
    let t0 = Instant::now();
    lab.del_logical(Host::Node1);
    std::thread::sleep(Duration::from_secs(2));
    let away = t0.elapsed();
    lab.add_logical(Host::Node2, true);
    away
}

/// Through staybound with a 5 s client timeout, a fault of about 2 s loses no request, and the longest
/// stall is the time away plus at most the recovery pacing and retry step.
fn loses_nothing(tag: &str, label: &str, fault: fn(&Lab) -> Duration) {
    for _ in 0..runs() {
        let Some((via, direct, away)) = ride(tag, Duration::from_secs(5), fault) else { return };
        show(label, &via, &direct, away);
        assert_eq!(via.lost, 0, "no request lost through staybound");
        assert!(
            via.longest_stall() <= away + Duration::from_millis(300) + margin() / 4,
            "stall {:?} for {:?} away",
            via.longest_stall(),
            away
        );
    }
}

#[test]
fn port_refused_two_seconds_loses_nothing() {
    loses_nothing("refuse5", "port refused 2 s, client timeout 5 s", refused_two_seconds);
}

#[test]
fn address_absent_two_seconds_loses_nothing() {
    loses_nothing("absent5", "address absent 2 s, client timeout 5 s", absent_two_seconds);
}

#[test]
fn port_refused_two_seconds_with_a_short_client_timeout_loses_little() {
    for _ in 0..runs() {
        let Some((via, direct, away)) = ride("refuse2", Duration::from_secs(2), refused_two_seconds) else { return };
        show("port refused 2 s, client timeout 2 s", &via, &direct, away);
        assert!(via.lost <= 5, "{} lost through staybound", via.lost);
    }
}
