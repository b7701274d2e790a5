//! A real client and server: redis-server (Debian's package) behind staybound, driven by redis-cli and
//! redis-benchmark; what the client sees through staybound equals what it sees direct.

use crate::support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::proxy::*;

struct Redis(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn redis_server() -> (Redis, SocketAddr) {
    let addr = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is needed (Debian: apt-get install redis-server redis-tools)");
    let redis = Redis(child, dir);
    eventually("redis-server accepts", Duration::from_secs(10), || std::net::TcpStream::connect(addr).is_ok()).await;
    (redis, addr)
}

fn cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli is needed (Debian: apt-get install redis-tools)");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_staybound_equals_direct() {
    let (_redis, direct) = redis_server().await;
    let proxy = Proxy::start(&format!(
        "[[service]]\nname = \"redis\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{direct}\"\n[service.probe]\nmode = \"send-expect\"\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"\n"
    ))
    .await;
    let via = proxy.addr("redis");
    let script: &[&[&str]] = &[
        &["SET", "k", "v"],
        &["GET", "k"],
        &["INCR", "n"],
        &["INCRBY", "n", "41"],
        &["RPUSH", "l", "a", "b", "c"],
        &["LRANGE", "l", "0", "-1"],
        &["HSET", "h", "f", "x"],
        &["HGETALL", "h"],
        &["GET", "missing"],
        &["DEL", "k", "n", "l", "h"],
    ];
    for (round, target) in
        [("direct", direct), ("via staybound", via)].into_iter().enumerate().map(|(i, (n, a))| ((i, n), a))
    {
        let outputs: Vec<String> = script.iter().map(|cmd| cli(target, cmd)).collect();
        assert_eq!(
            outputs,
            ["OK\n", "v\n", "1\n", "42\n", "3\n", "a\nb\nc\n", "1\n", "f\nx\n", "\n", "4\n"],
            "{round:?}"
        );
    }
    // A large value, both ways.
    let big = "x".repeat(2 << 20);
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &via.port().to_string(), "-x", "SET", "big"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(big.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n");
    assert_eq!(cli(via, &["STRLEN", "big"]), format!("{}\n", big.len()));

    // redis-benchmark through staybound: every request answered.
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &via.port().to_string(),
            "-n",
            "2000",
            "-c",
            "20",
            "-t",
            "set,get,incr,lpush",
            "--csv",
        ])
        .output()
        .expect("redis-benchmark");
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{csv} {}", String::from_utf8_lossy(&out.stderr));
    for test in ["SET", "GET", "INCR", "LPUSH"] {
        assert!(csv.contains(&format!("\"{test}\"")), "{test} ran: {csv}");
    }
    assert_eq!(
        cli(via, &["GET", "counter:__rand_int__"]).trim().parse::<u64>().unwrap(),
        2000,
        "every INCR arrived once"
    );
    assert_eq!(proxy.metric("staybound_failovers_total", &[("service", "redis"), ("signal", "probe")]), 0.0);
}
