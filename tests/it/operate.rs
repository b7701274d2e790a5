//! Operating staybound: SIGHUP reload without dropping what is unaffected, a bad reload kept out, the
//! cluster manager's failover hook, `/readyz`, `/status` and `staybound status`, and every series present
//! from the start.

use crate::support;

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::process::{BIN, Running, echo, round_trip, svc};
use support::wait::wait_until as wait;

#[test]
fn reload_adds_changes_and_removes_while_a_session_keeps_flowing() {
    let up = echo();
    let head = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let sb = Running::start(&format!("{head}{}{}{}", svc("keep", up, ""), svc("change", up, ""), svc("gone", up, "")));
    let before = sb.listens();
    // `keep` is rewritten with its bound port, so the next reload can keep that address and add one.
    let keep_addr = before["keep"][0];
    let mut session = TcpStream::connect(before["keep"][0]).unwrap();
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    round_trip(&mut session, b"before the reload");
    let bytes_before = sb.metric("staybound_bytes_total", &[("service", "keep"), ("direction", "upstream")]);

    // `change` moves to a new listen address and a new limit; `gone` goes; `new` comes.
    std::fs::write(
        &sb.config,
        format!(
            "{head}{}{}{}",
            svc("keep", up, ""),
            svc("change", up, "max_connections = 5\n").replace("127.0.0.1:0", "127.0.0.2:0"),
            svc("new", up, "")
        ),
    )
    .unwrap();
    sb.signal("HUP");
    wait("the reload is counted", Duration::from_secs(5), || {
        sb.metric("staybound_config_reloads_total", &[("result", "ok")]) == 1.0
    });
    let after = sb.listens();
    assert_eq!(after["keep"], before["keep"], "an unchanged listener is not re-bound");
    assert_eq!(after["change"][0].ip().to_string(), "127.0.0.2", "a changed listen address is re-bound");
    assert!(!after.contains_key("gone"));
    let mut fresh = TcpStream::connect(after["new"][0]).unwrap();
    round_trip(&mut fresh, b"new service works");
    let mut moved = TcpStream::connect(after["change"][0]).unwrap();
    round_trip(&mut moved, b"changed service works");
    wait("the removed service's listener is closed", Duration::from_secs(5), || {
        TcpStream::connect(before["gone"][0]).is_err()
    });

    // A reload that keeps `keep`'s address and adds another reuses the bound socket (no EADDRINUSE).
    let keep_two = svc("keep", up, "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = [\"{keep_addr}\", \"127.0.0.3:0\"]"));
    std::fs::write(
        &sb.config,
        format!(
            "{head}{keep_two}{}{}",
            svc("change", up, "max_connections = 5\n").replace("127.0.0.1:0", "127.0.0.2:0"),
            svc("new", up, "")
        ),
    )
    .unwrap();
    sb.signal("HUP");
    wait("the second reload is counted", Duration::from_secs(5), || {
        sb.metric("staybound_config_reloads_total", &[("result", "ok")]) == 2.0
    });
    let two = sb.listens()["keep"].clone();
    assert_eq!(two.len(), 2);
    assert_eq!(two[0], keep_addr, "the kept address is still served");
    let mut extra = TcpStream::connect(two[1]).unwrap();
    round_trip(&mut extra, b"added address works");

    // The session on the unchanged service never noticed, and its bytes are still counted.
    round_trip(&mut session, b"after the reload");
    wait("bytes counted through the reload", Duration::from_secs(5), || {
        sb.metric("staybound_bytes_total", &[("service", "keep"), ("direction", "upstream")])
            == bytes_before + (b"after the reload".len() + b"added address works".len()) as f64
    });

    // A bad file is reported and counted; the running config stays.
    std::fs::write(&sb.config, "[[service]]\nname = 42\n").unwrap();
    sb.signal("HUP");
    wait("the bad reload is counted", Duration::from_secs(5), || {
        sb.metric("staybound_config_reloads_total", &[("result", "error")]) == 1.0
    });
    sb.wait_log("reload rejected: the running config stays", Duration::from_secs(5));
    round_trip(&mut session, b"still here");
    assert_eq!(sb.listens().len(), 3);
}

#[test]
fn the_failover_hook_ends_old_sessions_and_unknown_services_get_404() {
    let up = echo();
    let sb = Running::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{}", svc("hooked", up, "")));
    let listen = sb.listens()["hooked"][0];
    let mut session = TcpStream::connect(listen).unwrap();
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    round_trip(&mut session, b"epoch one");

    let hook = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .arg(format!("http://{}{path}", sb.admin))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(hook("/failover/hooked"), "202");
    assert_eq!(hook("/failover/nosuch"), "404");
    let mut buf = [0u8; 1];
    let ended = session.read(&mut buf);
    assert!(
        matches!(ended, Ok(0)) || ended.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{ended:?}"
    );
    wait("epoch 2", Duration::from_secs(5), || sb.metric("staybound_epoch", &[("service", "hooked")]) == 2.0);
    assert_eq!(sb.metric("staybound_failovers_total", &[("service", "hooked"), ("signal", "admin")]), 1.0);
    assert_eq!(sb.metric("staybound_sessions_reset_total", &[("service", "hooked"), ("reason", "failover")]), 1.0);

    // A new session works on the new epoch.
    let mut again = TcpStream::connect(listen).unwrap();
    round_trip(&mut again, b"epoch two");

    // `staybound status` prints the table operators read.
    let out = Command::new(BIN).args(["status", "--admin", &sb.admin.to_string()]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    // ...and finds the admin address in the config file when it is not given.
    let named = sb.config.with_file_name("named-admin.toml");
    std::fs::write(&named, format!("[admin]\nlisten = \"{}\"\n{}", sb.admin, svc("hooked", up, ""))).unwrap();
    let by_file = Command::new(BIN).args(["status", "--config"]).arg(&named).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&by_file.stdout), table, "{}", String::from_utf8_lossy(&by_file.stderr));
    let row = table.lines().find(|l| l.starts_with("hooked")).unwrap_or_else(|| panic!("{table}"));
    for want in ["up", " 2 ", "admin", "1 "] {
        assert!(row.contains(want), "{want:?} in {row:?}");
    }
    let ready = sb.get("/readyz");
    assert_eq!(ready, "ready\n");
}

#[test]
fn every_series_is_there_from_the_start() {
    let up = echo();
    let sb = Running::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{}", svc("fresh", up, "")));
    let text = sb.get("/metrics");
    for name in [
        "staybound_client_connections_total",
        "staybound_client_connections_active",
        "staybound_held_clients",
        "staybound_hold_seconds_bucket",
        "staybound_upstream_connect_attempts_total",
        "staybound_retry_budget_exhausted_total",
        "staybound_upstream_up",
        "staybound_epoch",
        "staybound_failovers_total",
        "staybound_failover_detection_seconds_bucket",
        "staybound_sessions_reset_total",
        "staybound_bytes_total",
        "staybound_udp_datagrams_total",
        "staybound_udp_dropped_total",
        "staybound_config_reloads_total",
        "staybound_upgrades_total",
        "staybound_admin_requests_refused_total",
        "staybound_session_capacity",
    ] {
        assert!(text.lines().any(|l| l.starts_with(name)), "{name} missing from:\n{text}");
        let base = name.trim_end_matches("_bucket");
        assert!(text.contains(&format!("# HELP {base} ")), "{base} has HELP text");
    }
    for signal in ["probe", "identity", "session_reset", "keepalive", "neighbor", "admin", "reload", "role"] {
        assert!(
            text.contains(&format!("staybound_failovers_total{{service=\"fresh\",signal=\"{signal}\"}} 0")),
            "{signal}"
        );
    }
    for outcome in ["proxied", "refused_limit", "refused_deadline", "refused_shutdown", "client_gone"] {
        assert!(
            text.contains(&format!("staybound_client_connections_total{{service=\"fresh\",outcome=\"{outcome}\"}} 0")),
            "{outcome}"
        );
    }
}

#[test]
fn an_upstream_never_up_since_start_is_named_and_is_not_a_failover() {
    let port = support::proxy::closed_port();
    let sb = Running::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"wrong\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{port}\"\n"
    ));
    let said =
        |needle: &str| sb.log.lock().unwrap().iter().any(|v| v["message"].as_str().is_some_and(|m| m.contains(needle)));
    wait("the log names the refusal", Duration::from_secs(5), || said("refused every connect since start"));
    let status: serde_json::Value = serde_json::from_str(&sb.get("/status")).unwrap();
    let note = status[0]["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("refused every connect since start: is the port right"), "{status}");
    assert_eq!(status[0]["state"], "failing-over");
    let out = Command::new(BIN).args(["status", "--admin", &sb.admin.to_string()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("note: wrong: upstream"), "the table shows it too");
    // A client is held meanwhile, and served once the upstream answers.
    let listen = sb.listens()["wrong"][0];
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        round_trip(&mut s, b"held, then served");
    });
    wait("the client is held", Duration::from_secs(5), || {
        sb.metric("staybound_held_clients", &[("service", "wrong")]) == 1.0
    });
    support::process::echo_on(std::net::TcpListener::bind(port).unwrap());
    client.join().expect("the held client is served once the upstream answers");
    wait("the note clears", Duration::from_secs(5), || {
        let status: serde_json::Value = serde_json::from_str(&sb.get("/status")).unwrap();
        status[0]["note"].is_null() && status[0]["state"] == "up"
    });
    assert!(said("the upstream answered for the first time since start"));
    assert!(!said("failover: the logical host moved"), "never reached is no failover");
    let failovers: f64 = ["probe", "identity", "session_reset", "keepalive", "neighbor", "admin"]
        .iter()
        .map(|s| sb.metric("staybound_failovers_total", &[("service", "wrong"), ("signal", s)]))
        .sum();
    assert_eq!((failovers, sb.metric("staybound_epoch", &[("service", "wrong")])), (0.0, 1.0));
}
