//! The binary as operators run it: exit codes, config errors that say where and what, `check`, and a
//! SIGTERM drain.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_staybound");

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

const OK: &str = "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:15000\"\nupstream = \"127.0.0.1:6379\"\n";

#[test]
fn bad_configs_exit_78_with_line_and_key() {
    // (config, line the error is on, text the message must name)
    let cases: Vec<(String, usize, &str)> = vec![
        (format!("{OK}idel = \"1s\"\n"), 5, "idel"),
        (format!("{OK}[service.keepalive]\nidle = \"5x\"\n"), 6, "keepalive.idle"),
        (format!("{OK}[service.keepalive]\nidle = \"5\"\n"), 6, "unit"),
        (format!("{OK}[service.keepalive]\nidle = \"1500ms\"\n"), 6, "whole number of seconds"),
        (format!("{OK}[service.keepalive]\ncount = 0\n"), 6, "keepalive.count"),
        (format!("{OK}[service.keepalive]\ncount = 500\n"), 6, "keepalive.count"),
        (format!("{OK}[service.keepalive]\nclient_idle = \"never\"\n"), 6, "client_idle"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n".into(), 1, "upstream"),
        ("[[service]]\nname = \"a\"\nupstream = \"127.0.0.1:1\"\n".into(), 1, "listen"),
        ("[[service]]\nname = \"a\"\nlisten = []\nupstream = \"127.0.0.1:1\"\n".into(), 3, "listen"),
        ("[[service]]\nname = \"a\"\nlisten = \"localhost:1\"\nupstream = \"127.0.0.1:1\"\n".into(), 3, "listen"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1\"\n".into(), 4, "upstream"),
        (
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"host_with_underscore:80\"\n".into(),
            4,
            "upstream",
        ),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"10.0.0.1:0\"\n".into(), 4, "upstream"),
        ("[[service]]\nname = \"Bad Name\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n".into(), 2, "name"),
        (format!("{OK}{}", OK.replace("15000", "15001")), 5, "duplicate name"),
        (format!("{OK}source = \"not-an-ip\"\n"), 5, "source"),
        (format!("{OK}source = \"::1\"\n"), 5, "address family"),
        (format!("{OK}protocol = \"sctp\"\n"), 5, "protocol"),
        (format!("{OK}on_failover = \"explode\"\n"), 5, "on_failover"),
        (format!("{OK}max_connections = 0\n"), 5, "max_connections"),
        (format!("{OK}depends_on = [\"ghost\"]\n"), 5, "ghost"),
        (format!("{OK}depends_on = [\"a\"]\n"), 5, "itself"),
        (format!("{OK}[service.probe]\nmode = \"send-expect\"\n"), 6, "send"),
        (format!("{OK}[service.probe]\nidentity = \"no group\"\n"), 6, "capture group"),
        (format!("{OK}[service.probe]\nidentity = \"(unclosed\"\n"), 6, "regex"),
        (format!("{OK}[service.probe]\nidentity = \"(a{{0,100}}){{0,100}}b\"\n"), 6, "KiB"),
        (format!("{OK}[service.probe]\nsend = \"\\\\q\"\nmode = \"send-expect\"\n"), 6, "escape"),
        (format!("{OK}[service.probe]\nfall = 0\n"), 6, "fall"),
        (format!("{OK}[service.hold]\nbackoff_initial = \"2s\"\nbackoff_max = \"1s\"\n"), 7, "backoff_max"),
        (format!("{OK}[service.hold]\nbudget_ratio = -1.0\n"), 6, "budget_ratio"),
        (format!("{OK}[service.udp]\nmax_flows = 10\n"), 1, "applies only to protocol"),
        (
            "[[service]]\nname = \"u\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:53\"\nupstream = \"127.0.0.1:53\"\n[service.udp]\nreply_from = [\"0.0.0.0/0\"]\n".into(),
            7,
            "udp.reply_from: \"0.0.0.0/0\" is every address",
        ),
        ("[admin]\nlisten = \"nowhere\"\n".to_string() + OK, 2, "admin.listen"),
        ("[admin]\nlisten = \"0.0.0.0:9901\"\n".to_string() + OK, 2, "admin.token_file: missing"),
        ("[admin]\nlisten = \"[::]:9901\"\n".to_string() + OK, 2, "not loopback"),
        ("[admin]\ntoken_file = \"/nonexistent/admin.token\"\n".to_string() + OK, 2, "cannot be read"),
        ("[admin]\ntoken_file = \"/dev/null\"\n".to_string() + OK, 2, "admin.token_file"),
        ("[admin]\nfailover_rate = \"fast\"\n".to_string() + OK, 2, "admin.failover_rate"),
        ("[admin]\nfailover_rate = 1\n".to_string() + OK, 2, "admin.failover_rate"),
        ("shutdown_grace = 30\n".to_string() + OK, 1, "shutdown_grace"),
        ("[[service]\nname = \"a\"\n".into(), 1, ""),
        (String::new(), 1, "service"),
        (
            format!(
                "{}depends_on = [\"b\"]\n{}depends_on = [\"a\"]\n",
                OK,
                OK.replace("\"a\"", "\"b\"").replace("15000", "15001")
            ),
            1,
            "dependency cycle: a -> b -> a",
        ),
    ];
    assert!(cases.len() >= 20);
    for (text, line, what) in &cases {
        let (code, _out, err) = check(text);
        assert_eq!(code, 78, "config:\n{text}\nstderr:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(&format!("bad.toml:{line}:")), "config:\n{text}\nwanted line {line} in:\n{err}");
        assert!(err.contains(what), "config:\n{text}\nwanted {what:?} in:\n{err}");
    }
}

#[test]
fn check_says_the_token_is_set_and_never_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = "5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0";
    std::fs::write(dir.path().join("admin.token"), format!("{token}\n")).unwrap();
    let path = dir.path().join("s.toml");
    // A relative token_file is taken from the config file's directory.
    std::fs::write(&path, format!("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"admin.token\"\n{OK}")).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("token set (from ") && stdout.contains("per 1s"), "{stdout}");
    assert!(!stdout.contains(token) && !stderr.contains(token), "{stdout}{stderr}");
    std::fs::write(dir.path().join("admin.token"), "").unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "an empty token file is a config error: {stderr}");
    assert!(
        stderr.contains("s.toml:3:") && stderr.contains("admin.token_file") && stderr.contains("empty"),
        "{stderr}"
    );
}

#[test]
fn check_shows_a_transparent_service_and_whose_ports_its_upstream_leg_shares() {
    let shared = format!("{OK}intercept = true\n");
    let (code, stdout, stderr) = check(&shared);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("transparent: this host's TCP to 127.0.0.1:6379 is redirected"), "{stdout}");
    assert!(stdout.contains("share this host's ephemeral ports to 127.0.0.1:6379"), "{stdout}");
    let (code, stdout, stderr) = check(&format!("{shared}source = \"127.0.0.2\"\n"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("source          127.0.0.2 (bound before connect)"), "{stdout}");
    assert!(!stdout.contains("ephemeral ports"), "{stdout}");
}

#[test]
fn check_shows_the_connect_hook_and_no_shared_ports() {
    let text =
        format!("{OK}intercept = true\n[intercept]\nmethod = \"connect\"\ncgroup = \"/sys/fs/cgroup/legacy.slice\"\n");
    let (code, stdout, stderr) = check(&text);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .contains("is sent to the listener at connect() by the connect hook on cgroup /sys/fs/cgroup/legacy.slice"),
        "{stdout}"
    );
    assert!(!stdout.contains("ephemeral ports"), "the client dials the listener, not the upstream: {stdout}");
    let (code, _, stderr) = check(&format!("{OK}[intercept]\nmethod = \"bpf\"\ncgroup = \"sys/fs/cgroup\"\n"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("intercept.method") && stderr.contains("\"bpf\" is not one of \"nat\", \"connect\""),
        "{stderr}"
    );
    assert!(stderr.contains("intercept.cgroup") && stderr.contains("not an absolute path"), "{stderr}");
    let (code, _, stderr) = check(&format!("{OK}[intercept]\nmethod = \"bpf\"\ncgroup = \"/sys/fs/cgroup\"\n"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("1 problem") && !stderr.contains("only the connect method"),
        "one problem, not two: {stderr}"
    );
    let (code, _, stderr) = check(&format!("{OK}[intercept]\ncgroup = \"/sys/fs/cgroup\"\n"));
    assert_eq!(code, 78);
    assert!(stderr.contains("only the connect method uses a cgroup"), "{stderr}");
}

#[test]
fn several_problems_are_reported_together() {
    let (code, _, err) =
        check("[[service]]\nname = \"a\"\nlisten = \"x\"\nupstream = \"y\"\n[service.hold]\ndeadline = \"soon\"\n");
    assert_eq!(code, 78);
    assert!(err.contains("3 problems"), "{err}");
}

#[test]
fn usage_errors_exit_64() {
    let out = Command::new(BIN).args(["run", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN).args(["run", "--config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "--config without a file");
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn without_config_the_default_file_is_read_and_named() {
    let default = Path::new(staybound::cli::DEFAULT_CONFIG);
    if default.exists() {
        eprintln!("{} exists on this machine: the missing-file message is not checked", default.display());
        return;
    }
    for args in [&["run"][..], &["check"][..], &[][..]] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        assert!(err.contains("/etc/staybound/staybound.toml") && err.contains("--config"), "{args:?}: {err}");
    }
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("staybound") && text.contains("check"), "{shell}: {text}");
    }
    let out = Command::new(BIN).arg("man").output().unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && page.contains(".TH staybound 1"), "{page}");
    assert!(page.contains("completions") && page.contains("status"), "every subcommand is named: {page}");
}

#[test]
fn a_busy_admin_port_fails_the_start_once_and_before_any_service_listens() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nlisten = \"{}\"\n[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n",
            busy.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = Command::new(BIN).args(["run", "--config"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "said once: {err}");
    assert!(!err.contains("listening"), "no service said it listens: {err}");
}

#[test]
fn the_image_ships_a_loopback_only_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY") && l.ends_with(" /etc/staybound/staybound.toml"))
        .expect("the Dockerfile copies a default config");
    let src = copy.split_whitespace().nth(1).unwrap();
    let config = staybound::config::Config::load(&root.join(src)).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.admin.listen.ip().is_loopback(), "{src}: admin on {}", config.admin.listen);
    for s in &config.services {
        for addr in &s.listen {
            assert!(addr.ip().is_loopback(), "{src}: service {} listens on {addr}", s.name);
        }
    }
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(report.contains("worst case to notice"), "{report}");
            seen += 1;
        }
    }
    assert!(seen >= 2, "config/ holds the example and the minimal config");
}

/// A staybound child and the listen address of its one service.
fn spawn(text: &str) -> (support::process::Running, SocketAddr) {
    let sb = support::process::Running::start(text);
    let listen = sb.listens().into_values().next().and_then(|v| v.first().copied()).expect("one listener");
    (sb, listen)
}

#[test]
fn sigterm_lets_a_session_in_flight_finish_refuses_new_ones_and_exits_0() {
    // An upstream that answers a request only when told to.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut req = [0u8; 3];
        s.read_exact(&mut req).unwrap();
        go_rx.recv().unwrap();
        s.write_all(b"done").unwrap();
    });
    let (mut sb, listen) = spawn(&format!(
        "shutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"drain\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"off\"\n"
    ));
    let mut client = TcpStream::connect(listen).unwrap();
    client.write_all(b"req").unwrap();
    // Wait until the session is proxying (its request reached the upstream side).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = staybound::status::fetch(sb.admin, "/status").unwrap();
        if body.contains("\"active_sessions\":1") {
            break;
        }
        assert!(Instant::now() < deadline, "session never became active: {body}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    Command::new("kill").args(["-TERM", &sb.child.id().to_string()]).status().unwrap();
    // New connects are refused once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(listen) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(Instant::now() < deadline, "listener still open after SIGTERM");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert!(sb.child.try_wait().unwrap().is_none(), "still draining while a session is in flight");
    go_tx.send(()).unwrap();
    let mut reply = Vec::new();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"done");
    server.join().unwrap();
    let status = loop {
        if let Some(s) = sb.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(6), "did not exit within the grace period");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sigterm_ends_a_session_that_outlives_the_grace() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap();
    let (mut sb, listen) = spawn(&format!(
        "shutdown_grace = \"300ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"grace\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"off\"\n"
    ));
    let mut client = TcpStream::connect(listen).unwrap();
    client.write_all(b"x").unwrap();
    let (_held, _) = upstream.accept().unwrap();
    let t0 = Instant::now();
    Command::new("kill").args(["-TERM", &sb.child.id().to_string()]).status().unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = client.read_to_end(&mut buf);
    let status = sb.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5), "ended after the grace, took {:?}", t0.elapsed());
}
