//! Probe presets against real servers in the namespace lab: the redis preset logs in to a redis with
//! `requirepass`, and a primary demoted with `REPLICAOF` while the address stays ends its sessions (signal
//! `role`) and holds new clients until it is primary again; a silent move is still caught within the
//! bound `check` computes.

use crate::support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::lab::{Host, Lab, REDIS_PORT};
use support::pg::{PG_PASSWORD, PG_PORT, Pg};
use support::sidecar::{Sidecar, margin, runs};
use support::wait::wait_until;

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

/// Waits until staybound is up with its preset having found the node in `role`.
fn wait_up_as(sc: &Sidecar<'_>, role: &str) {
    wait_until(&format!("staybound is up and the node said it is {role}"), Duration::from_secs(10), || {
        let st = sc.status();
        st["state"].as_str() == Some("up") && st["role"].as_str() == Some(role)
    });
}

const PRESET: &str =
    "[service.probe]\npreset = \"redis\"\nrole = \"primary\"\npassword_file = \"redis.pw\"\nneighbor = false\n";

#[test]
fn a_redis_primary_demoted_in_place_ends_its_sessions_with_signal_role_and_holds_clients_until_promoted() {
    for run in 0..runs() {
        let Some(lab) = redis_lab("preset-redis") else { return };
        let sc = Sidecar::start(&lab, PRESET);
        wait_up_as(&sc, "primary");
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
        wait_up_as(&sc, "primary");
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

/// The postgres preset's login and query, run from the client namespace against `ip`, with the preset
/// `probe` (a `[service.probe]` body) as the config reads it.
fn pg_probe(lab: &Lab, dir: &std::path::Path, ip: Ipv4Addr, probe: &str) -> staybound::failover::preset::Answer {
    probe_once(lab, dir, ip, PG_PORT, &format!("preset = \"postgres\"\n{probe}"))
}

/// One fresh exchange of the preset that `probe` (a `[service.probe]` body) configures, against `ip`:`port`
/// from the client namespace.
fn probe_once(
    lab: &Lab,
    dir: &std::path::Path,
    ip: Ipv4Addr,
    port: u16,
    probe: &str,
) -> staybound::failover::preset::Answer {
    let text = format!(
        "[[service]]\nname = \"pg\"\nlisten = \"127.0.0.1:1\"\nupstream = \"{ip}:{port}\"\n[service.probe]\n{probe}"
    );
    let config =
        staybound::config::Config::from_toml_str(&text, &dir.join("probe.toml")).unwrap_or_else(|e| panic!("{e}"));
    let preset = config.services[0].probe.preset.clone().unwrap();
    lab.in_ns(Host::Client, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect((ip, port)).await.unwrap();
            let mut stream = staybound::failover::probe::ProbeStream::new(tcp);
            staybound::failover::preset::exchange(&mut stream, &preset, Duration::from_secs(5), true)
                .await
                .unwrap_or_else(|e| panic!("exchange: {e:?}"))
        })
    })
}

#[test]
fn the_postgres_preset_logs_in_by_trust_md5_and_scram_and_reads_the_role() {
    use staybound::failover::preset::Answer;
    let tmp = tempfile::tempdir().unwrap();
    let Some(lab) = Lab::new("preset-pglogin") else { return };
    let pg = Pg::new(&lab, tmp.path());
    let data = pg.initdb("node1", &["host all trustuser 198.18.0.0/15 trust", "host all md5user 198.18.0.0/15 md5"]);
    pg.start(Host::Node1, &data);
    let node1 = Host::Node1.addr();
    let (ok, out) = pg.psql(
        Host::Client,
        &node1.to_string(),
        PG_PORT,
        "CREATE ROLE trustuser LOGIN; SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-pw-91';",
        Duration::from_secs(20),
    );
    assert!(ok, "{out}");
    for (file, text) in [("pg.pw", PG_PASSWORD), ("md5.pw", "md5-pw-91"), ("wrong.pw", "not-the-password")] {
        std::fs::write(tmp.path().join(file), format!("{text}\n")).unwrap();
    }
    let primary = |a: &Answer| matches!(a, Answer::Ready { role: Some(r), identity: Some(_) } if r == "primary");
    let scram = pg_probe(&lab, tmp.path(), node1, "role = \"primary\"\npassword_file = \"pg.pw\"\n");
    assert!(primary(&scram), "SCRAM-SHA-256 as postgres: {scram:?}");
    let md5 =
        pg_probe(&lab, tmp.path(), node1, "user = \"md5user\"\ndatabase = \"postgres\"\npassword_file = \"md5.pw\"\n");
    assert!(primary(&md5), "md5 as md5user: {md5:?}");
    let trust = pg_probe(&lab, tmp.path(), node1, "user = \"trustuser\"\ndatabase = \"postgres\"\n");
    assert!(primary(&trust), "trust as trustuser: {trust:?}");
    let wrong = pg_probe(&lab, tmp.path(), node1, "password_file = \"wrong.pw\"\n");
    let Answer::NotReady(why) = &wrong else { panic!("a wrong password is not ready: {wrong:?}") };
    assert!(why.contains("28P01") && !why.contains("not-the-password"), "{why}");
    let none = pg_probe(&lab, tmp.path(), node1, "");
    assert!(matches!(&none, Answer::NotReady(why) if why.contains("password_file")), "{none:?}");
    eprintln!("postgres logins: scram {scram:?}; md5 {md5:?}; trust {trust:?}; wrong password {wrong:?}");
}

const PG_PRESET: &str = "[service.probe]\npreset = \"postgres\"\nrole = \"primary\"\npassword_file = \"pg.pw\"\n";

#[test]
fn a_silent_move_to_a_postgres_standby_holds_writes_until_promote_and_none_fails_read_only() {
    for run in 0..runs() {
        let read_only = postgres_move(run, true, false);
        assert_eq!(read_only, 0, "no write through staybound failed read-only");
    }
}

/// Without the neighbour watch the move is found by the probe's next exchange: writes on connections made
/// before that reach the standby. Measured, not held to zero.
#[test]
fn a_silent_move_to_a_postgres_standby_without_the_neighbour_watch() {
    for run in 0..runs() {
        postgres_move(run, false, false);
    }
}

/// The same over TLS: the probe's session (and the clients', end to end) to a server verified against the
/// CA file, found by the probe alone (no neighbour watch).
#[test]
fn a_silent_move_to_a_postgres_standby_over_tls() {
    for run in 0..runs() {
        let read_only = postgres_move(run, false, true);
        eprintln!("over TLS: {read_only} writes failed read-only");
    }
}

/// One silent move of the address from a postgres primary to its standby, with a long query and a writer
/// through staybound; returns how many writes failed read-only.
fn postgres_move(run: usize, neighbor: bool, tls: bool) -> usize {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    {
        let tmp = tempfile::tempdir().unwrap();
        let Some(lab) = Lab::new("preset-pgmove") else { return 0 };
        let pg = Pg::new(&lab, tmp.path());
        let data1 = pg.initdb("node1", &[]);
        let mut preset = format!("{PG_PRESET}neighbor = {neighbor}\n");
        if tls {
            let logical = support::lab::LOGICAL.to_string();
            let (ca, crt, key) = support::pg::make_certs(tmp.path(), "move", &[&logical]);
            pg.ssl(&data1, &crt, &key);
            std::fs::copy(&ca, lab.dir().join("ca.crt")).unwrap();
            preset.push_str("tls = true\ntls_ca_file = \"ca.crt\"\n");
        }
        pg.start(Host::Node1, &data1);
        let node1 = Host::Node1.addr().to_string();
        let (ok, out) =
            pg.psql(Host::Client, &node1, PG_PORT, "CREATE TABLE w (at timestamptz)", Duration::from_secs(20));
        assert!(ok, "{out}");
        let data2 = pg.basebackup(Host::Node2, "node2", Host::Node1.addr());
        pg.start(Host::Node2, &data2);
        lab.add_logical(Host::Node1, true);
        std::fs::write(lab.dir().join("pg.pw"), format!("{PG_PASSWORD}\n")).unwrap();
        let sc = Sidecar::start_to(&lab, PG_PORT, &preset);
        wait_up_as(&sc, "primary");
        let st = sc.status();
        assert_eq!((st["preset"].as_str(), st["role"].as_str()), (Some("postgres"), Some("primary")), "{st}");
        assert!(!sc.get("/status").contains(PG_PASSWORD) && !lab.read_log(sc.pid).contains(PG_PASSWORD));
        let bound = sc.bounds().silent_move.0;
        let via = sc.listen();
        let via_ip = via.ip().to_string();

        // A session through staybound, busy in a long query on node 1.
        let pg_sleep = {
            let (tx, rx) = mpsc::channel();
            let (lab_ns, ip) = (lab.ns_name(Host::Client).to_string(), via_ip.clone());
            let (pgpass, psql) = (format!("PGPASSWORD={PG_PASSWORD}"), support::pg::bin("psql"));
            std::thread::spawn(move || {
                let conn = format!("host={ip} port={} user=postgres dbname=postgres", via.port());
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &lab_ns, "env", &pgpass, &psql, &conn, "-X", "-c", "SELECT pg_sleep(60)"])
                    .output()
                    .unwrap();
                let _ = tx.send((Instant::now(), String::from_utf8_lossy(&out.stderr).trim().to_string()));
            });
            rx
        };
        wait_until("the long query runs on node 1", Duration::from_secs(10), || {
            pg.psql(
                Host::Client,
                &node1,
                PG_PORT,
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'",
                Duration::from_secs(10),
            )
            .1 == "1"
        });

        // A writer through staybound: one INSERT per new connection, one after the other.
        let stop = Arc::new(AtomicBool::new(false));
        let (wtx, writes) = mpsc::channel::<(Instant, Instant, bool, String)>();
        let writer = {
            let stop = stop.clone();
            let ns = lab.ns_name(Host::Client).to_string();
            let (pgpass, psql) = (format!("PGPASSWORD={PG_PASSWORD}"), support::pg::bin("psql"));
            let conn = format!("host={via_ip} port={} user=postgres dbname=postgres connect_timeout=30", via.port());
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let began = Instant::now();
                    let out = std::process::Command::new("timeout")
                        .args([
                            "40",
                            "ip",
                            "netns",
                            "exec",
                            &ns,
                            "env",
                            &pgpass,
                            &psql,
                            &conn,
                            "-X",
                            "-q",
                            "-v",
                            "ON_ERROR_STOP=1",
                        ])
                        .args(["-c", "INSERT INTO w VALUES (now())"])
                        .output()
                        .unwrap();
                    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    let _ = wtx.send((began, Instant::now(), out.status.success(), text));
                }
            })
        };
        let mut all = Vec::new();
        for _ in 0..5 {
            let w = writes.recv_timeout(Duration::from_secs(20)).expect("a write before the move");
            assert!(w.2, "writes work before the move: {}", w.3);
            all.push(w);
        }

        let t0 = Instant::now();
        lab.move_logical(Host::Node1, Host::Node2, true);
        let (t1, how) = pg_sleep.recv_timeout(Duration::from_secs(15)).expect("the long query's session ended");
        let noticed = t1.duration_since(t0);
        wait_until("staybound holds clients: node 2 is a standby", Duration::from_secs(5), || {
            let st = sc.status();
            st["state"].as_str() == Some("not-ready") && st["role"].as_str() == Some("standby")
        });
        wait_until("a write is held", Duration::from_secs(10), || {
            sc.metric("staybound_held_clients", &[("service", "redis")]) >= 1.0
        });
        let promote = Instant::now();
        pg.promote(Host::Node2, &data2);
        let mut served = None;
        let mut after = 0;
        while after < 5 {
            let w = writes.recv_timeout(Duration::from_secs(30)).expect("writes go on");
            if w.2 && w.1 > promote {
                served = served.or(Some(w.1.duration_since(promote)));
                after += 1;
            }
            all.push(w);
        }
        let served = served.expect("a write after promote");
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        all.extend(writes.try_iter());
        sc.wait_state("up", Duration::from_secs(5));
        let read_only = all.iter().filter(|w| w.3.contains("read-only")).count();
        let failed = all.iter().filter(|w| !w.2).count();
        let (ok, on2) = pg.psql(
            Host::Client,
            &Host::Node2.addr().to_string(),
            PG_PORT,
            "SELECT count(*) FROM w WHERE at > now() - interval '1 minute'",
            Duration::from_secs(10),
        );
        assert!(ok, "{on2}");
        eprintln!(
            "FIGURES postgres silent move (neighbour watch {}{}) run {run}: the long query's session ended {:.3}s after the move ({how:?}; \
             bound {:.1}s); first write served {:.3}s after pg_ctl promote; writes {} ({} failed, {} of them read-only); \
             last_failover {}",
            if neighbor { "on" } else { "off" },
            if tls { ", TLS" } else { "" },
            noticed.as_secs_f64(),
            bound.as_secs_f64(),
            served.as_secs_f64(),
            all.len(),
            failed,
            read_only,
            sc.status()["last_failover"]
        );
        for w in all.iter().filter(|w| !w.2) {
            eprintln!("  failed write: {}", w.3);
        }
        assert!(noticed <= bound + margin(), "noticed after {noticed:?}, bound {bound:?}");
        // why: a connection made in the moment the move is decided may be ended with the old epoch (the
        // client sees the server close it, and a real client reconnects); no write fails in the database.
        for w in all.iter().filter(|w| !w.2 && !w.3.contains("read-only")) {
            assert!(
                w.3.contains("server closed the connection"),
                "a write failed other than by its session ending: {}",
                w.3
            );
        }
        read_only
    }
}

#[test]
fn the_presets_speak_tls_verified_against_the_ca_file() {
    use staybound::failover::preset::Answer;
    let tmp = tempfile::tempdir().unwrap();
    let Some(lab) = Lab::new("preset-tls") else { return };
    let pg = Pg::new(&lab, tmp.path());
    let node1 = Host::Node1.addr();
    let node2 = Host::Node2.addr();
    let (ca, crt, key) = support::pg::make_certs(tmp.path(), "good", &[&node1.to_string(), &node2.to_string()]);
    let (other_ca, _, _) = support::pg::make_certs(tmp.path(), "other", &[&node1.to_string()]);
    // Only TLS logins for postgres over TCP: a probe that did not speak TLS would be refused.
    let data = pg.initdb("node1", &["hostnossl all postgres 198.18.0.0/15 reject"]);
    pg.ssl(&data, &crt, &key);
    pg.start(Host::Node1, &data);
    std::fs::write(tmp.path().join("pg.pw"), format!("{PG_PASSWORD}\n")).unwrap();
    let (ca_s, other_s) = (ca.to_str().unwrap(), other_ca.to_str().unwrap());
    let tls = pg_probe(
        &lab,
        tmp.path(),
        node1,
        &format!("role = \"primary\"\npassword_file = \"pg.pw\"\ntls = true\ntls_ca_file = \"{ca_s}\"\n"),
    );
    assert!(matches!(&tls, Answer::Ready { role: Some(r), .. } if r == "primary"), "TLS and SCRAM: {tls:?}");
    let plain = pg_probe(&lab, tmp.path(), node1, "password_file = \"pg.pw\"\n");
    assert!(matches!(&plain, Answer::NotReady(why) if why.contains("no encryption")), "without TLS: {plain:?}");
    let other = pg_probe(
        &lab,
        tmp.path(),
        node1,
        &format!("password_file = \"pg.pw\"\ntls = true\ntls_ca_file = \"{other_s}\"\n"),
    );
    assert!(matches!(&other, Answer::NotReady(why) if why.starts_with("TLS:")), "another CA: {other:?}");

    // redis with TLS only (and a password): the preset's session is TLS from the first byte.
    let (crt_s, key_s) = (crt.to_str().unwrap(), key.to_str().unwrap());
    lab.start_redis_with(
        Host::Node2,
        &[
            "--port",
            "0",
            "--tls-port",
            "6379",
            "--tls-cert-file",
            crt_s,
            "--tls-key-file",
            key_s,
            "--tls-ca-cert-file",
            ca_s,
            "--tls-auth-clients",
            "no",
            "--requirepass",
            REDIS_PASSWORD,
        ],
    );
    std::fs::write(tmp.path().join("redis.pw"), format!("{REDIS_PASSWORD}\n")).unwrap();
    let redis = |ca: &str| {
        probe_once(
            &lab,
            tmp.path(),
            node2,
            REDIS_PORT,
            &format!(
                "preset = \"redis\"\nrole = \"primary\"\npassword_file = \"redis.pw\"\ntls = true\ntls_ca_file = \"{ca}\"\n"
            ),
        )
    };
    let good = redis(ca_s);
    let bad = redis(other_s);
    eprintln!(
        "TLS: postgres {tls:?}; without TLS {plain:?}; another CA {other:?}; redis {good:?}; redis, another CA {bad:?}"
    );
    assert!(
        matches!(&good, Answer::Ready { role: Some(r), identity: Some(_) } if r == "primary"),
        "redis over TLS: {good:?}"
    );
    assert!(matches!(&bad, Answer::NotReady(why) if why.starts_with("TLS:")), "redis, another CA: {bad:?}");
}
