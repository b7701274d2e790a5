//! A client that vanishes while data to it is in flight (its cable pulled: no FIN, no RST, no ACK) in the
//! namespace lab. Keep-alive cannot notice it (keep-alive probes wait while data is unacknowledged);
//! TCP_USER_TIMEOUT on the accepted client socket ends the session within `keepalive.user_timeout`. A
//! service with the user timeout off keeps the session, as the kernel would for ~15 minutes.

use crate::support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::lab::{Host, Lab};
use support::sidecar::BIN;
use support::wait::wait_until;

const ADMIN: &str = "127.0.0.1:9901";
const UPSTREAM_PORT: u16 = 7000;

fn active(lab: &Lab) -> serde_json::Value {
    let admin: SocketAddr = ADMIN.parse().unwrap();
    let body = lab.in_ns(Host::Client, || staybound::status::fetch(admin, "/status")).unwrap_or_else(|e| panic!("{e}"));
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc.as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["active_sessions"].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[test]
fn a_client_gone_with_data_in_flight_releases_its_session_after_the_user_timeout() {
    let Some(lab) = Lab::new("client-gone") else { return };
    // The upstream on node1 streams to every connection until it fails.
    let upstream = lab.listen_tcp(Host::Node1, SocketAddr::from((Host::Node1.addr(), UPSTREAM_PORT))).unwrap();
    std::thread::spawn(move || {
        for s in upstream.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let chunk = [b'x'; 4096];
                while s.write_all(&chunk).is_ok() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
    });
    let client_ip = Host::Client.addr();
    let up = SocketAddr::from((Host::Node1.addr(), UPSTREAM_PORT));
    let service = |name: &str, port: u16, user_timeout: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{client_ip}:{port}\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"off\"\n[service.keepalive]\nuser_timeout = \"{user_timeout}\"\n"
        )
    };
    let text = format!(
        "shutdown_grace = \"1s\"\n[admin]\nlisten = \"{ADMIN}\"\n{}{}",
        service("guarded", 7100, "2s"),
        service("unguarded", 7101, "0s")
    );
    let path = lab.dir().join("staybound.toml");
    std::fs::write(&path, text).unwrap();
    lab.spawn(Host::Client, &[BIN, "--log-format", "json", "run", "--config", path.to_str().unwrap()]);
    wait_until("staybound answers", Duration::from_secs(10), || {
        lab.in_ns(Host::Client, || staybound::status::fetch(ADMIN.parse().unwrap(), "/healthz")).is_ok()
    });

    // The legacy clients on node2 read everything, until their link goes.
    let stop = Arc::new(AtomicBool::new(false));
    for port in [7100, 7101] {
        let mut c = lab.connect_tcp(Host::Node2, SocketAddr::from((client_ip, port)), Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(0) = c.read(&mut buf) {
                    break;
                }
            }
        });
    }
    wait_until("both sessions stream", Duration::from_secs(5), || {
        let a = active(&lab);
        a["guarded"] == 1 && a["unguarded"] == 1
    });
    std::thread::sleep(Duration::from_millis(300));

    lab.link_down(Host::Node2);
    let t0 = Instant::now();
    wait_until("the guarded session ends", Duration::from_secs(30), || active(&lab)["guarded"] == 0);
    let released = t0.elapsed();
    let unguarded = active(&lab)["unguarded"].clone();
    eprintln!(
        "CLIENT GONE: with user_timeout 2s the session was released {:.2}s after the client's link went down; \
         with it off the session is still open ({unguarded})",
        released.as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
    assert!(released < Duration::from_secs(5), "user_timeout 2s plus margin: {released:?}");
    assert!(released >= Duration::from_millis(1500), "not before the user timeout: {released:?}");
    assert_eq!(unguarded, 1, "without the user timeout the vanished client pins its session");
}
