//! The admin endpoint, safe to expose: the failover hook's bearer token (re-read on reload), `Host` and
//! `Origin` checks against DNS rebinding and cross-site posts, the hook's rate per service, a connection
//! budget of its own that slow clients cannot exhaust, and HTTP done right (405 with `Allow`, HEAD, JSON
//! errors). Every refusal is counted.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::process::{Running, echo};
use support::wait::wait_until as wait;

const TOKEN: &str = "c0ffee0123456789abcdef0123456789";

/// An answer: status, head (lower-cased header lines), body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The `error` of a JSON error body.
    fn error(&self) -> String {
        assert_eq!(self.header("content-type").as_deref(), Some("application/json"), "{}", self.head);
        let v: serde_json::Value =
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON: {e}: {}", self.body));
        v["error"].as_str().unwrap_or_else(|| panic!("no error in {}", self.body)).to_string()
    }
}

/// One request, with `Host: admin` unless `headers` names another; `headers` are full lines.
fn http(admin: SocketAddr, method: &str, path: &str, headers: &[&str]) -> Answer {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        req.push_str(&format!("Host: {admin}\r\n"));
    }
    for h in headers {
        req.push_str(&format!("{h}\r\n"));
    }
    req.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut text = Vec::new();
    s.read_to_end(&mut text).unwrap();
    let text = String::from_utf8_lossy(&text).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("malformed answer: {text:?}"));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Answer { status, head: head.to_string(), body: body.to_string() }
}

fn svc(name: &str, up: SocketAddr) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"connect\"\n"
    )
}

fn refused(sb: &Running, reason: &str) -> f64 {
    sb.metric("staybound_admin_requests_refused_total", &[("reason", reason)])
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

#[test]
fn the_hook_needs_the_token_and_a_reload_reads_a_new_one() {
    let up = echo();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let head = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\nfailover_rate = \"0s\"\n",
        token_file.display()
    );
    let sb = Running::start(&format!("{head}{}", svc("guarded", up)));
    for reason in ["unauthorized", "forbidden_origin", "forbidden_host", "rate_limited", "connection_limit"] {
        assert_eq!(refused(&sb, reason), 0.0, "{reason} is there from the start, at 0");
    }

    assert!(sb.metric("staybound_session_capacity", &[]) > 0.0, "the open-file limit's capacity is published");
    let logged = format!("{:?}", sb.log.lock().unwrap());
    assert!(!logged.contains(TOKEN), "the token is never logged");
    let listening = sb.wait_log("admin endpoint listening", Duration::from_secs(1));
    assert_eq!(listening["hook_token"], "set");

    let failovers = || sb.metric("staybound_failovers_total", &[("service", "guarded"), ("signal", "admin")]);
    let a = http(sb.admin, "POST", "/failover/guarded", &[]);
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.error().contains("no bearer token"), "{}", a.body);
    assert_eq!(a.header("www-authenticate").as_deref(), Some("Bearer realm=\"staybound\""));
    let a = http(sb.admin, "POST", "/failover/guarded", &[&bearer("c0ffee0123456789abcdef012345678X")]);
    assert_eq!((a.status, a.error().contains("wrong bearer token")), (401, true), "{}", a.body);
    let a = http(sb.admin, "POST", "/failover/nosuch", &[]);
    assert_eq!(a.status, 401, "the token comes before the name: strangers learn no service names");
    assert_eq!(refused(&sb, "unauthorized"), 3.0);
    assert_eq!(failovers(), 0.0);

    let a = http(sb.admin, "POST", "/failover/guarded", &[&bearer(TOKEN)]);
    assert_eq!(a.status, 202, "{}", a.body);
    wait("the hook's failover", Duration::from_secs(5), || failovers() == 1.0);
    assert_eq!(http(sb.admin, "POST", "/failover/nosuch", &[&bearer(TOKEN)]).status, 404);

    // Reading endpoints stay open: Prometheus and kubelet send no token.
    assert_eq!(http(sb.admin, "GET", "/metrics", &[]).status, 200);

    // The notify script sends the token from a file, never on a command line.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/notify/staybound-failover.sh");
    let run = |token_file: Option<&Path>| {
        let mut cmd = Command::new(&script);
        cmd.arg("guarded").env("STAYBOUND_ADMIN", sb.admin.to_string()).env("STAYBOUND_RETRY_DELAY", "0");
        if let Some(f) = token_file {
            cmd.env("STAYBOUND_TOKEN_FILE", f);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, err) = run(Some(&token_file));
    assert_eq!(code, Some(0), "{err}");
    wait("the script's failover", Duration::from_secs(5), || failovers() == 2.0);
    // Without curl, over bash's /dev/tcp: the token goes on the inner shell's standard input.
    let bare = tempfile::tempdir().unwrap();
    for tool in ["bash", "timeout", "sleep", "dirname", "sed"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        std::os::unix::fs::symlink(path, bare.path().join(tool)).unwrap();
    }
    let out = Command::new(&script)
        .arg("guarded")
        .env("PATH", bare.path())
        .env("STAYBOUND_ADMIN", sb.admin.to_string())
        .env("STAYBOUND_TOKEN_FILE", &token_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    wait("the /dev/tcp failover", Duration::from_secs(5), || failovers() == 3.0);
    // keepalived's notify script, on a node gaining MASTER, hands the token file on.
    let state_dir = tempfile::tempdir().unwrap();
    let keepalived = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/notify/keepalived-notify.sh");
    let out = Command::new(&keepalived)
        .args(["--admin", &sb.admin.to_string(), "--token-file"])
        .arg(&token_file)
        .args(["guarded", "INSTANCE", "VI_DB", "MASTER", "100"])
        .env("STAYBOUND_NOTIFY_STATE_DIR", state_dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    wait("keepalived's failover", Duration::from_secs(5), || failovers() == 4.0);
    let (code, err) = run(None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("401") && err.contains("STAYBOUND_TOKEN_FILE"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");

    // A reload reads the token file again: the old token stops working, the new one works.
    let rotated = "feedface0123456789abcdef01234567";
    std::fs::write(&token_file, rotated).unwrap();
    sb.signal("HUP");
    wait("the reload", Duration::from_secs(5), || {
        sb.metric("staybound_config_reloads_total", &[("result", "ok")]) == 1.0
    });
    assert_eq!(http(sb.admin, "POST", "/failover/guarded", &[&bearer(TOKEN)]).status, 401);
    assert_eq!(http(sb.admin, "POST", "/failover/guarded", &[&bearer(rotated)]).status, 202);
    // An emptied token file is a bad reload: the running token stays.
    std::fs::write(&token_file, "\n").unwrap();
    sb.signal("HUP");
    wait("the bad reload", Duration::from_secs(5), || {
        sb.metric("staybound_config_reloads_total", &[("result", "error")]) == 1.0
    });
    assert_eq!(http(sb.admin, "POST", "/failover/guarded", &[&bearer(rotated)]).status, 202);
    let logged = format!("{:?}", sb.log.lock().unwrap());
    assert!(!logged.contains(TOKEN) && !logged.contains(rotated), "no token in the log");
}

#[test]
fn foreign_origins_and_hosts_are_refused() {
    let up = echo();
    let sb = Running::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{}", svc("site", up)));
    let port = sb.admin.port();
    // A web page posting to the hook from the operator's browser: refused, with or without a token set.
    let a = http(sb.admin, "POST", "/failover/site", &["Origin: http://example.invalid"]);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.error().contains("origin"), "{}", a.body);
    assert_eq!(http(sb.admin, "POST", "/failover/site", &["Origin: null"]).status, 403);
    // DNS rebinding: the browser names the attacker's host, even though it connects here.
    let a = http(sb.admin, "GET", "/status", &[&format!("Host: rebound.example.invalid:{port}")]);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.error().contains("Host"), "{}", a.body);
    assert_eq!(http(sb.admin, "GET", "/status", &["Host: localhost:1"]).status, 403, "another port");
    assert_eq!(refused(&sb, "forbidden_origin"), 2.0);
    assert_eq!(refused(&sb, "forbidden_host"), 2.0);
    assert_eq!(sb.metric("staybound_failovers_total", &[("service", "site"), ("signal", "admin")]), 0.0);

    // The endpoint's own names pass, on loopback with the usual aliases.
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        assert_eq!(http(sb.admin, "GET", "/healthz", &[&format!("Host: {host}")]).status, 200, "{host}");
    }
    let a = http(sb.admin, "POST", "/failover/site", &[&format!("Origin: http://127.0.0.1:{port}")]);
    assert_eq!(a.status, 202, "same origin: {}", a.body);
}

#[test]
fn a_hundred_hook_calls_in_a_second_make_one_failover_per_rate() {
    let up = echo();
    let sb = Running::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{}", svc("storm", up)));
    let t0 = Instant::now();
    let (mut accepted, mut limited) = (0, 0);
    for i in 0..100u32 {
        let a = http(sb.admin, "POST", "/failover/storm", &[]);
        match a.status {
            202 => accepted += 1,
            429 => {
                limited += 1;
                let secs: u64 = a.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
                assert!((1..=1).contains(&secs), "{secs}");
                assert!(a.error().contains("failover_rate"), "{}", a.body);
            }
            other => panic!("{other}: {}", a.body),
        }
        // Spread over one second.
        let next = t0 + Duration::from_millis(10 * u64::from(i + 1));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let took = t0.elapsed();
    eprintln!("ADMIN RATE: 100 hook calls in {took:?}: {accepted} accepted (202), {limited} refused (429)");
    assert!((1..=2).contains(&accepted), "{accepted}");
    assert_eq!(accepted + limited, 100);
    assert_eq!(refused(&sb, "rate_limited"), f64::from(limited));
    wait("the failovers", Duration::from_secs(5), || {
        sb.metric("staybound_failovers_total", &[("service", "storm"), ("signal", "admin")]) == f64::from(accepted)
    });
}

#[test]
fn methods_head_and_error_bodies() {
    let up = echo();
    let sb = Running::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{}", svc("web", up)));
    for path in ["/healthz", "/metrics", "/readyz", "/status"] {
        let a = http(sb.admin, "POST", path, &[]);
        assert_eq!((a.status, a.header("allow").as_deref()), (405, Some("GET, HEAD")), "{path}");
        assert!(a.error().contains("GET, HEAD"), "{}", a.body);
        let get = http(sb.admin, "GET", path, &[]);
        let head = http(sb.admin, "HEAD", path, &[]);
        assert_eq!((head.status, head.body.as_str()), (get.status, ""), "{path}: HEAD has no body");
        assert_eq!(head.header("content-type"), get.header("content-type"), "{path}");
        if path != "/metrics" {
            // /metrics may grow between the two requests.
            assert_eq!(head.header("content-length"), Some(get.body.len().to_string()), "{path}");
        }
    }
    let a = http(sb.admin, "GET", "/failover/web", &[]);
    assert_eq!((a.status, a.header("allow").as_deref()), (405, Some("POST")));
    a.error();
    let a = http(sb.admin, "DELETE", "/status", &[]);
    assert_eq!((a.status, a.header("allow").as_deref()), (405, Some("GET, HEAD")));
    let a = http(sb.admin, "GET", "/nowhere", &[]);
    assert_eq!(a.status, 404);
    assert!(a.error().contains("/failover/{service}"), "{}", a.body);
    let a = http(sb.admin, "POST", "/failover/nosuch", &[]);
    assert_eq!(a.status, 404);
    assert!(a.error().contains("nosuch"), "{}", a.body);
    let a = http(sb.admin, "HEAD", "/healthz", &[]);
    assert_eq!((a.status, a.body.as_str(), a.header("content-length").as_deref()), (200, "", Some("3")));
}

#[test]
fn slow_clients_cannot_lock_out_the_admin_endpoint() {
    const SLOW: usize = 2000;
    const CAP: usize = 64;
    let up = echo();
    let sb = Running::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{}", svc("busy", up)));
    let data = sb.listens()["busy"][0];
    let mut slow: Vec<TcpStream> = (0..SLOW).map(|_| TcpStream::connect(sb.admin).unwrap()).collect();
    // Each sends its request one byte a second, for as long as the test runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
    let stop_writer = stop.clone();
    let writer = std::thread::spawn(move || {
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut writers = writers;
        for byte in request.iter().cycle() {
            for w in &mut writers {
                let _ = w.write_all(&[*byte]);
            }
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until {
                if stop_writer.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    wait("the connections beyond the budget are closed and counted", Duration::from_secs(10), || {
        refused(&sb, "connection_limit") >= (SLOW - CAP) as f64
    });
    let t0 = Instant::now();
    let a = http(sb.admin, "GET", "/healthz", &[]);
    let took = t0.elapsed();
    // The data path relays meanwhile: a round trip through the TCP service to its echo upstream.
    let t1 = Instant::now();
    let mut c = TcpStream::connect(data).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"still relaying\n").unwrap();
    let mut back = [0u8; 15];
    c.read_exact(&mut back).unwrap();
    let round_trip = t1.elapsed();
    eprintln!(
        "ADMIN BUDGET: with {SLOW} slow clients open, a fresh /healthz answered in {took:?} (goal < 100 ms); a \
         round trip through the TCP service took {round_trip:?}"
    );
    assert_eq!((a.status, a.body.as_str()), (200, "ok\n"));
    assert!(took < Duration::from_millis(100), "{took:?}");
    assert_eq!(&back, b"still relaying\n");
    let evicted = refused(&sb, "connection_limit");
    // The slow connections that were closed read EOF (or a reset) at once; the rest are still open.
    let mut closed = 0;
    for s in &mut slow {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => closed += 1,
        }
    }
    eprintln!("ADMIN BUDGET: {closed} of {SLOW} slow connections closed, connection_limit counted {evicted}");
    assert!(closed >= SLOW - CAP, "{closed}");
    assert!(evicted >= (SLOW - CAP + 1) as f64, "the fresh client made room too: {evicted}");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[test]
fn status_reaches_an_admin_endpoint_on_a_wildcard_address() {
    let up = echo();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let sb = Running::start(&format!(
        "[admin]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"{}\"\n{}",
        token_file.display(),
        svc("wild", up)
    ));
    assert!(sb.admin.ip().is_unspecified(), "{}", sb.admin);
    // The address as the config names it: `status` goes through loopback, with a Host the endpoint accepts.
    let out = Command::new(support::process::BIN).args(["status", "--admin", &sb.admin.to_string()]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("wild"), "{stdout}{stderr}");
    assert_eq!(refused(&sb, "forbidden_host"), 0.0);
}
