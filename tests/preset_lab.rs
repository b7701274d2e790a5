//! Probe presets against real servers in the namespace lab: the redis preset logs in to a redis with
//! `requirepass`, and a primary demoted with `REPLICAOF` while the address stays ends its sessions (signal
//! `role`) and holds new clients until it is primary again; a silent move is still caught within the
//! bound `check` computes.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::lab::{Host, Lab, REDIS_PORT, wait_until};
use support::sidecar::{Sidecar, margin, runs};

const REDIS_PASSWORD: &str = "lab-probe-pass-7f3a";

/// `redis-cli` with the lab's password against `ip`, from the client namespace; its output.
fn cli(lab: &Lab, ip: Ipv4Addr, args: &[&str]) -> String {
    let (ip, port) = (ip.to_string(), REDIS_PORT.to_string());
    let mut argv = vec!["redis-cli", "--no-auth-warning", "-a", REDIS_PASSWORD, "-h", &ip, "-p", &port];
    argv.extend_from_slice(args);
    let out = lab.try_exec_timeout(Host::Client, &argv, Duration::from_secs(10));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One RESP command and its reply, on a session of a legacy client.
fn ask(s: &mut TcpStream, args: &[&str]) -> String {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or_else(|e| panic!("reply to {args:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A legacy client that logs in, checks its session and then waits idle for its server (as a pooled
/// connection does); reports when and how the session ended.
fn idle_client(lab: &Lab, to: SocketAddr) -> mpsc::Receiver<(Instant, String)> {
    let mut s = lab.connect_tcp(Host::Client, to, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ask(&mut s, &["AUTH", REDIS_PASSWORD]), "+OK\r\n");
    assert_eq!(ask(&mut s, &["PING"]), "+PONG\r\n");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let what = match s.read(&mut buf) {
            Ok(0) => "eof".to_string(),
            Ok(n) => format!("data {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".to_string(),
            Err(e) => format!("error {e}"),
        };
        let _ = tx.send((Instant::now(), what));
    });
    rx
}

/// Whether `INFO errorstats` of the redis at `ip` counts a failed login.
fn login_errors(lab: &Lab, ip: Ipv4Addr) -> Vec<String> {
    cli(lab, ip, &["INFO", "errorstats"])
        .lines()
        .filter(|l| l.contains("NOAUTH") || l.contains("WRONGPASS"))
        .map(String::from)
        .collect()
}

fn redis_lab(tag: &str) -> Option<Lab> {
    let lab = Lab::new(tag)?;
    let auth = ["--requirepass", REDIS_PASSWORD, "--masterauth", REDIS_PASSWORD];
    lab.start_redis_with(Host::Node1, &auth);
    lab.start_redis_with(Host::Node2, &auth);
    lab.add_logical(Host::Node1, true);
    std::fs::write(lab.dir().join("redis.pw"), format!("{REDIS_PASSWORD}\n")).unwrap();
    Some(lab)
}

const PRESET: &str =
    "[service.probe]\npreset = \"redis\"\nrole = \"primary\"\npassword_file = \"redis.pw\"\nneighbor = false\n";

#[test]
fn a_redis_primary_demoted_in_place_ends_its_sessions_with_signal_role_and_holds_clients_until_promoted() {
    for run in 0..runs() {
        let Some(lab) = redis_lab("preset-redis") else { return };
        let sc = Sidecar::start(&lab, PRESET);
        sc.wait_state("up", Duration::from_secs(5));
        let st = sc.status();
        let node1 = cli(&lab, Host::Node1.addr(), &["INFO", "server"]);
        let run_id = node1.lines().find_map(|l| l.strip_prefix("run_id:")).unwrap().trim().to_string();
        assert_eq!((st["preset"].as_str(), st["role"].as_str()), (Some("redis"), Some("primary")), "{st}");
        assert_eq!(st["identity"].as_str(), Some(run_id.as_str()), "identity is node 1's run_id: {st}");
        assert!(!sc.get("/status").contains(REDIS_PASSWORD) && !lab.read_log(sc.pid).contains(REDIS_PASSWORD));
        let interval = sc.config.services[0].probe.interval;

        let via = idle_client(&lab, sc.listen());
        wait_until("the probe has asked ROLE twice", Duration::from_secs(5), || {
            cli(&lab, Host::Node1.addr(), &["INFO", "commandstats"])
                .lines()
                .any(|l| l.starts_with("cmdstat_role:calls=") && !l.starts_with("cmdstat_role:calls=1,"))
        });
        let t0 = Instant::now();
        assert_eq!(cli(&lab, Host::Node1.addr(), &["REPLICAOF", &Host::Node2.addr().to_string(), "6379"]).trim(), "OK");
        let (t1, how) = via.recv_timeout(Duration::from_secs(10)).expect("the idle session through staybound ended");
        let noticed = t1.duration_since(t0);
        assert_eq!(how, "reset", "ended by staybound");
        wait_until("the failover is counted", Duration::from_secs(2), || {
            sc.metric("staybound_failovers_total", &[("service", "redis"), ("signal", "role")]) == 1.0
        });
        let st = sc.status();
        assert_eq!((st["state"].as_str(), st["role"].as_str()), (Some("not-ready"), Some("replica")), "{st}");
        assert_eq!(st["last_failover"]["cause"].as_str(), Some("role"), "{st}");
        assert!(st["note"].as_str().is_some_and(|n| n.contains("replica")), "{st}");

        // A new client is held while node 1 is a replica; it is served once node 1 is primary again.
        let (tx, held) = mpsc::channel();
        let listen = sc.listen();
        let ns = lab.ns_name(Host::Client).to_string();
        std::thread::spawn(move || {
            let mut s = support::lab::connect_in_ns(&ns, listen, Duration::from_secs(3)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let auth = ask(&mut s, &["AUTH", REDIS_PASSWORD]);
            let served = Instant::now();
            let set = ask(&mut s, &["SET", "k", "v"]);
            let _ = tx.send((served, auth, set));
        });
        wait_until("the new client is held", Duration::from_secs(5), || {
            sc.metric("staybound_held_clients", &[("service", "redis")]) == 1.0
        });
        assert!(held.try_recv().is_err(), "not served while node 1 is a replica");
        let promoted = Instant::now();
        assert_eq!(cli(&lab, Host::Node1.addr(), &["REPLICAOF", "NO", "ONE"]).trim(), "OK");
        let (served, auth, set) = held.recv_timeout(Duration::from_secs(10)).expect("the held client is served");
        assert_eq!((auth.as_str(), set.as_str()), ("+OK\r\n", "+OK\r\n"), "it logs in and writes");
        sc.wait_state("up", Duration::from_secs(2));
        assert_eq!(sc.epoch(), 2, "one epoch for the demotion, none for the promotion");
        assert_eq!(login_errors(&lab, Host::Node1.addr()), Vec::<String>::new(), "the probe logged in every time");
        eprintln!(
            "FIGURES redis demotion run {run}: the idle session through staybound ended ({how}) {:.3}s after \
             REPLICAOF (probe interval {:.1}s); the held client was served {:.3}s after REPLICAOF NO ONE",
            noticed.as_secs_f64(),
            interval.as_secs_f64(),
            served.duration_since(promoted).as_secs_f64()
        );
        assert!(noticed <= interval + margin(), "noticed after {noticed:?}, probe interval {interval:?}");
    }
}

#[test]
fn a_silent_move_is_caught_within_the_bound_with_the_redis_preset() {
    for run in 0..runs() {
        let Some(lab) = redis_lab("preset-move") else { return };
        let sc = Sidecar::start(&lab, PRESET);
        sc.wait_state("up", Duration::from_secs(5));
        let bound = sc.bounds().silent_move.0;
        let via = idle_client(&lab, sc.listen());
        let t0 = Instant::now();
        lab.move_logical(Host::Node1, Host::Node2, true);
        let (t1, how) = via.recv_timeout(Duration::from_secs(10)).expect("the session through staybound ended");
        let noticed = t1.duration_since(t0);
        sc.wait_state("up", Duration::from_secs(5));
        let node2 = cli(&lab, Host::Node2.addr(), &["INFO", "server"]);
        let run_id = node2.lines().find_map(|l| l.strip_prefix("run_id:")).unwrap().trim().to_string();
        wait_until("the identity is node 2's", Duration::from_secs(3), || {
            sc.status()["identity"].as_str() == Some(run_id.as_str())
        });
        assert_eq!(sc.epoch(), 2);
        assert_eq!(login_errors(&lab, Host::Node2.addr()), Vec::<String>::new());
        eprintln!(
            "FIGURES redis preset silent move run {run}: the session through staybound ended ({how}) after {:.3}s \
             (bound {:.1}s)",
            noticed.as_secs_f64(),
            bound.as_secs_f64()
        );
        assert!(noticed <= bound + margin(), "noticed after {noticed:?}, bound {bound:?}");
    }
}
