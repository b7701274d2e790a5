//! Transparent mode in the namespace lab: unmodified clients in the client namespace dial the logical host's
//! address itself; staybound's nftables rules send them through it. A client blocked in BLPOP learns of a
//! silent move within the bound `check` computes; a closed-loop client loses nothing through a 2 s
//! switchover; the server sees the configured `source`; the rules are gone after SIGTERM and SIGINT, replaced after a
//! SIGKILL and a restart, removed by `staybound cleanup`, and a table of someone else's is never touched.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::lab::{Host, LOGICAL, Lab, REDIS_PORT, SIGTERM};
use support::sidecar::{
    BIN, Blocked, Sidecar, announced_moves, assert_announced_within_200ms, margin, runs, two_nodes, upgrade,
    wait_blocked,
};
use support::transparent::{logical, silent_move, switchover_loses_nothing, with_source};
use support::wait::wait_until;

const TRANSPARENT: &str = "intercept = true\nsource = \"198.18.0.20\"\n[service.probe]\nneighbor = false\n";

/// The `nft -s list table` (without counter values) of `table` in the client namespace, if it exists.
fn table(lab: &Lab, family_table: &str) -> Option<String> {
    let mut args = vec!["nft", "-s", "list", "table"];
    args.extend(family_table.split(' '));
    let out = lab.try_exec(Host::Client, &args);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn a_client_dialling_the_logical_host_learns_of_a_silent_move_through_the_redirect() {
    for run in 0..runs() {
        let Some(lab) = two_nodes("intercept-move") else { return };
        with_source(&lab);
        let sc = Sidecar::start(&lab, TRANSPARENT);
        sc.wait_state("up", Duration::from_secs(5));
        let st = sc.status();
        let rules = st["intercept"]["rules"].as_str().unwrap_or("").to_string();
        assert!(rules.starts_with("installed by this process"), "{st}");
        // The unmodified client dials the logical host; the rule sends it to staybound.
        silent_move(&lab, &sc, "transparent", run);
    }
}

#[test]
fn a_closed_loop_client_dialling_the_logical_host_loses_nothing_through_a_two_second_switchover() {
    for run in 0..runs() {
        let Some(lab) = two_nodes("intercept-switch") else { return };
        with_source(&lab);
        switchover_loses_nothing(&lab, |lab| Sidecar::start(lab, TRANSPARENT), "transparent", run);
    }
}

#[test]
fn the_rules_go_with_staybound_and_leave_other_tables_alone() {
    let Some(lab) = two_nodes("intercept-rules") else { return };
    with_source(&lab);
    // Someone else's table, made first: it must come through untouched.
    lab.exec(Host::Client, &["nft", "add", "table", "inet", "unrelated"]);
    lab.exec(
        Host::Client,
        &["nft", "add", "chain", "inet", "unrelated", "out", "{ type filter hook output priority 0 ; }"],
    );
    lab.exec(Host::Client, &["nft", "add", "rule", "inet", "unrelated", "out", "tcp", "dport", "6379", "counter"]);
    let unrelated = table(&lab, "inet unrelated").expect("the unrelated table");

    // SIGTERM: no rule of staybound's remains.
    let sc = Sidecar::start(&lab, TRANSPARENT);
    sc.wait_state("up", Duration::from_secs(5));
    let ours = table(&lab, "inet staybound").expect("staybound's table is installed");
    assert!(ours.contains(&format!("staybound pid {}", sc.pid)), "{ours}");
    assert!(ours.contains("198.18.0.100") && ours.contains("dnat"), "{ours}");
    lab.signal(sc.pid, SIGTERM);
    assert!(lab.wait_exit(sc.pid, Duration::from_secs(10)).success());
    assert_eq!(table(&lab, "inet staybound"), None, "removed on SIGTERM");
    let ruleset = String::from_utf8_lossy(&lab.exec(Host::Client, &["nft", "list", "ruleset"]).stdout).to_string();
    assert!(!ruleset.contains("staybound"), "nothing of staybound's is left:\n{ruleset}");

    // SIGINT (stop at once) removes them too.
    let interrupted = Sidecar::start(&lab, TRANSPARENT);
    interrupted.wait_state("up", Duration::from_secs(5));
    assert!(table(&lab, "inet staybound").is_some());
    const SIGINT: i32 = 2;
    lab.signal(interrupted.pid, SIGINT);
    assert!(lab.wait_exit(interrupted.pid, Duration::from_secs(10)).success());
    assert_eq!(table(&lab, "inet staybound"), None, "removed on SIGINT");

    // SIGKILL leaves the table; the next start replaces it (one copy, the new process's).
    let killed = Sidecar::start(&lab, TRANSPARENT);
    killed.wait_state("up", Duration::from_secs(5));
    lab.kill_hard(killed.pid);
    let left = table(&lab, "inet staybound").expect("a SIGKILL leaves the rules");
    assert!(left.contains(&format!("staybound pid {}", killed.pid)));
    let again = Sidecar::start(&lab, TRANSPARENT);
    again.wait_state("up", Duration::from_secs(5));
    let now = table(&lab, "inet staybound").expect("installed again");
    assert!(!now.contains(&format!("staybound pid {}", killed.pid)), "the leftovers are replaced:\n{now}");
    assert_eq!(now.matches("dnat").count(), 1, "one redirect, not two:\n{now}");
    assert_eq!(now.matches(&format!("staybound pid {}", again.pid)).count(), 2, "{now}");
    lab.kill_hard(again.pid);

    // `staybound cleanup` removes what a killed staybound left, and only that.
    assert!(table(&lab, "inet staybound").is_some());
    let out = lab.exec(Host::Client, &[BIN, "cleanup"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(table(&lab, "inet staybound"), None, "removed by cleanup");
    let out = lab.exec(Host::Client, &[BIN, "cleanup"]);
    assert!(out.status.success(), "cleanup with nothing to remove is no error");
    assert_eq!(table(&lab, "inet unrelated").as_deref(), Some(unrelated.as_str()), "the unrelated table is intact");
}

#[test]
fn rules_set_up_beforehand_serve_a_proxy_without_capabilities() {
    let Some(lab) = two_nodes("intercept-init") else { return };
    with_source(&lab);
    // The init container's step: install the rules, exempting the user the proxy runs as, and exit.
    std::fs::write(
        lab.dir().join("setup.toml"),
        format!("[[service]]\nname = \"redis\"\nlisten = \"127.0.0.1:6379\"\nupstream = \"{LOGICAL}:{REDIS_PORT}\"\nintercept = true\n"),
    )
    .unwrap();
    let setup = lab.dir().join("setup.toml");
    let out = lab.exec(Host::Client, &[BIN, "setup", "--config", setup.to_str().unwrap(), "--exempt-uid", "65532"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rules = table(&lab, "inet staybound").expect("installed by setup");
    assert!(rules.contains("skuid 65532"), "{rules}");
    // The long-running proxy: user 65532, no capability at all. It can neither mark its sockets nor touch
    // the rules; its own connections pass by its user.
    let unprivileged =
        ["setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"];
    let sc = Sidecar::start_as(&lab, &unprivileged, "listen = \"127.0.0.1:6379\"\n", TRANSPARENT);
    sc.wait_state("up", Duration::from_secs(5));
    let st = sc.status();
    assert!(st["intercept"]["rules"].as_str().unwrap_or("").starts_with("not installed by this process"), "{st}");
    let blocked = Blocked::start(&lab, Host::Client, logical());
    wait_blocked(&lab, Host::Node1, 1);
    assert_eq!(sc.metric("staybound_client_connections_total", &[("service", "redis"), ("outcome", "proxied")]), 1.0);
    let t0 = Instant::now();
    lab.move_logical(Host::Node1, Host::Node2, true);
    let (t1, how) = blocked.ended(Duration::from_secs(10)).expect("the redirected client learned within 10 s");
    eprintln!(
        "FIGURES transparent, rules set up beforehand, proxy without capabilities: {how} after {:.3}s",
        t1.duration_since(t0).as_secs_f64()
    );
    assert!(t1.duration_since(t0) <= sc.bounds().silent_move.0 + margin());
    // The proxy cannot remove the rules: they stay for the namespace's life (or `staybound cleanup`).
    lab.signal(sc.pid, SIGTERM);
    assert!(lab.wait_exit(sc.pid, Duration::from_secs(10)).success());
    assert!(table(&lab, "inet staybound").is_some(), "left in place for the next proxy");
}

/// Stops a process staybound started (an upgrade's new process) if a test ends before it does.
struct Successor(i32);

impl Successor {
    fn alive(&self) -> bool {
        // why: signal 0 asks only whether the process exists (a zombie counts until its parent reaps it).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.0)).is_ok_and(|s| s.contains(") Z "))
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if self.alive() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[test]
fn an_upgrade_hands_the_rules_to_the_new_process_and_the_old_one_leaves_them() {
    let Some(lab) = two_nodes("intercept-upgrade") else { return };
    with_source(&lab);
    let sc = Sidecar::start(&lab, TRANSPARENT);
    sc.wait_state("up", Duration::from_secs(5));
    let new = Successor(upgrade(&lab, sc.pid));
    // The old process has no session to serve: it hands over and exits, leaving the table to the new one.
    assert!(lab.wait_exit(sc.pid, Duration::from_secs(15)).success());
    let rules = table(&lab, "inet staybound").expect("the rules stay through the upgrade");
    assert!(rules.contains(&format!("staybound pid {}", new.0)), "the new process's rules:\n{rules}");
    assert!(!rules.contains(&format!("staybound pid {}", sc.pid)), "{rules}");
    // A client dialling the logical host still comes through (Blocked checks PING first).
    let blocked = Blocked::start(&lab, Host::Client, logical());
    wait_blocked(&lab, Host::Node1, 1);
    drop(blocked);
    // The new process removes them on SIGTERM.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new.0), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the new process exits", Duration::from_secs(10), || !new.alive());
    assert_eq!(table(&lab, "inet staybound"), None, "removed by the process that owned them last");
}

#[test]
fn an_announced_move_ends_the_redirected_session_within_200ms() {
    let Some(lab) = two_nodes("intercept-garp") else { return };
    with_source(&lab);
    // The neighbour watch on (the default): the takeover's gratuitous ARP is the sign. The address moves back
    // and forth within seconds here, which is no split brain to damp (as in the neighbour lab).
    let sc = Sidecar::start(
        &lab,
        "intercept = true\nsource = \"198.18.0.20\"\n[service.probe]\nsplit_brain_window = \"0s\"\n",
    );
    sc.wait_state("up", Duration::from_secs(5));
    wait_until("the neighbour watch runs", Duration::from_secs(5), || sc.status()["neighbor_watch"] == "watching");
    let times = announced_moves(&lab, &sc, logical(), 3 * runs(), "FIGURES transparent, announced move");
    assert_announced_within_200ms(times);
}

#[test]
fn a_connection_redirected_here_for_another_address_is_refused_and_counted() {
    let Some(lab) = two_nodes("intercept-refuse") else { return };
    with_source(&lab);
    let sc = Sidecar::start(&lab, TRANSPARENT);
    sc.wait_state("up", Duration::from_secs(5));
    // Someone else's rule sends node 1's own address into staybound's listener: not this service's upstream.
    lab.exec(Host::Client, &["nft", "add", "table", "ip", "foreign"]);
    lab.exec(Host::Client, &["nft", "add", "chain", "ip", "foreign", "out", "{ type nat hook output priority -90 ; }"]);
    lab.exec(
        Host::Client,
        &[
            "nft",
            "add",
            "rule",
            "ip",
            "foreign",
            "out",
            "ip",
            "daddr",
            "198.18.0.1",
            "tcp",
            "dport",
            "6379",
            "dnat",
            "to",
            "127.0.0.1:6379",
        ],
    );
    let to = SocketAddr::from((Host::Node1.addr(), REDIS_PORT));
    let refused = lab.in_ns(Host::Client, || {
        use std::io::{Read, Write};
        // why: staybound's RST may beat connect()'s return on the same host: a refusal either way.
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n");
        let mut buf = [0u8; 16];
        s.read(&mut buf)
    });
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset) || matches!(refused, Ok(0)),
        "refused: {refused:?}"
    );
    wait_until("the refusal is counted", Duration::from_secs(5), || {
        sc.metric("staybound_intercept_refused_total", &[("service", "redis")]) == 1.0
    });
    assert_eq!(sc.metric("staybound_client_connections_total", &[("service", "redis"), ("outcome", "proxied")]), 0.0);
    let log = lab.read_log(sc.pid);
    assert!(log.contains("not meant for this service's upstream"), "logged");
    lab.exec(Host::Client, &["nft", "delete", "table", "ip", "foreign"]);
}
