//! Riding out a takeover on loopback: held clients, retries under the budget, the hold deadline, and
//! services that depend on others.

use crate::support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::proxy::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts an echo server on `addr` after `delay`: until then the port refuses.
fn listen_later(addr: SocketAddr, delay: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // why: this sleep is the scenario (a service that starts late), not a synchronisation.
        tokio::time::sleep(delay).await;
        let listener = TcpListener::bind(addr).await.unwrap();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

async fn client_round_trip(addr: SocketAddr, i: usize) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut c = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let msg = format!("hello from client {i}\n");
    // Sent at once, while the client is still held: it must arrive intact once the upstream is up.
    c.write_all(msg.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; msg.len()];
    c.read_exact(&mut buf).await.map_err(|e| format!("client {i}: {e}"))?;
    if buf != msg.as_bytes() {
        return Err(format!("client {i} got {:?}", String::from_utf8_lossy(&buf)));
    }
    Ok(t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_ride_out_a_two_second_refusal() {
    let up = closed_port();
    let _server = listen_later(up, Duration::from_secs(2));
    let proxy = Proxy::start(&format!(
        "[[service]]\nname = \"ride\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"connect\"\ninterval = \"1s\"\n"
    ))
    .await;
    let addr = proxy.addr("ride");
    let start = Instant::now();
    let clients: Vec<_> = (0..50).map(|i| tokio::spawn(client_round_trip(addr, i))).collect();
    let mut waits = Vec::new();
    for c in clients {
        waits.push(c.await.unwrap().expect("every client gets through"));
    }
    let all = start.elapsed();
    eprintln!("FIGURES 50 clients through a 2 s refusal: all done after {:.3}s", all.as_secs_f64());
    assert_eq!(
        proxy.metric("staybound_client_connections_total", &[("service", "ride"), ("outcome", "proxied")]),
        50.0
    );
    assert!(proxy.metric("staybound_hold_seconds_count", &[("service", "ride")]) >= 1.0);
    let refused =
        proxy.metric("staybound_upstream_connect_attempts_total", &[("service", "ride"), ("result", "refused")]);
    eprintln!("FIGURES refused connect attempts (probe and clients): {refused}");
    assert!(refused < 200.0, "no retry storm: {refused} refused attempts over 2 s for 50 clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_caps_blind_retries() {
    let up = closed_port();
    // Probe off: no detector news, so every retry is a blind one and the budget alone paces them.
    // 50 first attempts x 0.2 + 1/s x 2 s = 12 retries per 2 s window.
    let proxy = Proxy::start(&format!(
        "[[service]]\nname = \"budget\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"off\"\n[service.hold]\ndeadline = \"2s\"\nbudget_ratio = 0.2\nbudget_min_per_sec = 1\nbudget_window = \"2s\"\nbackoff_initial = \"20ms\"\nbackoff_max = \"100ms\"\n"
    ))
    .await;
    let addr = proxy.addr("budget");
    let clients: Vec<_> = (0..50).map(|i| tokio::spawn(client_round_trip(addr, i))).collect();
    for c in clients {
        assert!(c.await.unwrap().is_err(), "nothing listens: every client is refused at its deadline");
    }
    let attempts =
        proxy.metric("staybound_upstream_connect_attempts_total", &[("service", "budget"), ("result", "refused")]);
    let exhausted = proxy.metric("staybound_retry_budget_exhausted_total", &[("service", "budget")]);
    eprintln!(
        "FIGURES budget: {attempts} refused attempts for 50 clients over 2 s, {exhausted} retries refused by the budget"
    );
    // 50 first attempts plus at most 12 retries per 2 s window; the deadline spans at most two windows.
    assert!(attempts >= 50.0);
    assert!(attempts <= 50.0 + 2.0 * 12.0, "{attempts} attempts exceed the budget");
    assert!(exhausted > 0.0, "the budget refused retries and counted them");
    eventually("every client refused at its deadline is counted", Duration::from_secs(2), || {
        proxy.metric("staybound_client_connections_total", &[("service", "budget"), ("outcome", "refused_deadline")])
            == 50.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_holds_clients_until_its_upstream_is_up() {
    let db = closed_port();
    let app = echo_upstream().await;
    let proxy = Proxy::start(&format!(
        "[[service]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{db}\"\n[service.probe]\nmode = \"connect\"\ninterval = \"200ms\"\n\
         [[service]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{app}\"\ndepends_on = [\"db\"]\n[service.probe]\nmode = \"connect\"\ninterval = \"200ms\"\n"
    ))
    .await;
    let registry = proxy.instance.registry().clone();
    eventually("db is seen down", Duration::from_secs(5), || {
        proxy.metric("staybound_upstream_up", &[("service", "db")]) == 0.0
    })
    .await;
    let reasons = staybound::admin::not_ready(&registry);
    assert!(reasons.iter().any(|r| r.contains("app") && r.contains("dependency db")), "{reasons:?}");
    // A client of app is held although app's own upstream is up...
    let addr = proxy.addr("app");
    let client = tokio::spawn(client_round_trip(addr, 0));
    eventually("the app client is held", Duration::from_secs(5), || {
        proxy.metric("staybound_held_clients", &[("service", "app")]) == 1.0
    })
    .await;
    assert!(
        proxy.metric("staybound_upstream_connect_attempts_total", &[("service", "app"), ("result", "ok")]) > 0.0,
        "app's own upstream answers its probe"
    );
    // ...until db comes up.
    let _db = listen_later(db, Duration::ZERO);
    client.await.unwrap().expect("released once db is up");
    assert!(staybound::admin::not_ready(&registry).is_empty());
}

#[tokio::test]
async fn deadline_expiry_refuses_with_a_reset_and_counts() {
    let up = closed_port();
    let proxy = Proxy::start(&format!(
        "[[service]]\nname = \"late\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"off\"\n[service.hold]\ndeadline = \"250ms\"\n"
    ))
    .await;
    let t0 = Instant::now();
    let mut c = TcpStream::connect(proxy.addr("late")).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let (got, reset) = read_to_end(&mut c).await;
    assert!(got.is_empty());
    assert!(reset, "a refused client gets RST, as a refusing host would give it");
    assert!(t0.elapsed() >= Duration::from_millis(250), "held until its deadline");
    eventually("counted", Duration::from_secs(2), || {
        proxy.metric("staybound_client_connections_total", &[("service", "late"), ("outcome", "refused_deadline")])
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_clients_that_close_leave_at_once_and_cost_no_connect() {
    let up = closed_port();
    let proxy = Proxy::start(&format!(
        "[[service]]\nname = \"quit\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n[service.probe]\nmode = \"hold\"\n[service.hold]\ndeadline = \"30s\"\n"
    ))
    .await;
    let addr = proxy.addr("quit");
    let m = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("service", "quit")];
        labels.extend_from_slice(extra);
        proxy.metric(name, &labels)
    };
    eventually("the upstream is down", Duration::from_secs(5), || m("staybound_upstream_up", &[]) == 0.0).await;

    // Fifty clients are held during the takeover, then give up: half close (FIN), half abort (RST).
    let attempts_before = m("staybound_upstream_connect_attempts_total", &[("result", "refused")]);
    let held_from = Instant::now();
    let mut quitters = Vec::new();
    for _ in 0..50 {
        quitters.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually("50 clients held", Duration::from_secs(5), || m("staybound_held_clients", &[]) == 50.0).await;
    let start = Instant::now();
    for (i, q) in quitters.into_iter().enumerate() {
        if i % 2 == 1 {
            socket2::SockRef::from(&q).set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(q);
    }
    // Polled every millisecond (bounded), so the time measured is the gauge's, not the polling's.
    const STEP: Duration = Duration::from_millis(1);
    let mut left = None;
    for _ in 0..5000 {
        if m("staybound_held_clients", &[]) == 0.0 {
            left = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(STEP).await;
    }
    let left = left.expect("the held gauge is back to 0 within 5 s");
    let attempts = m("staybound_upstream_connect_attempts_total", &[("result", "refused")]) - attempts_before;
    let held_for = held_from.elapsed();
    eprintln!(
        "FIGURES 50 held clients that closed (25 FIN, 25 RST) left the held gauge at 0 after {:.1} ms; {attempts} refused connect attempts in the {:.0} ms they were there (the probe's)",
        left.as_secs_f64() * 1000.0,
        held_for.as_secs_f64() * 1000.0
    );
    assert!(left <= Duration::from_millis(200) + STEP, "the held gauge was back to 0 only after {left:?}");
    // While the host is down a held client waits for the detector and makes no attempt; the probe looks for
    // the host every 100 ms.
    let probe_at_most = (held_for.as_millis() / 100) as f64 + 2.0;
    assert!(attempts <= probe_at_most, "{attempts} connect attempts while 50 clients were held: more than the probe's");
    eventually("the 50 that closed are counted", Duration::from_secs(2), || {
        m("staybound_client_connections_total", &[("outcome", "client_gone")]) == 50.0
    })
    .await;

    // Two clients that sent a request stay held: one keeps its socket open, one half-closed it.
    let mut patient = TcpStream::connect(addr).await.unwrap();
    patient.write_all(b"patient request").await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"half-closed request").await.unwrap();
    half.shutdown().await.unwrap();
    eventually("2 clients held", Duration::from_secs(5), || m("staybound_held_clients", &[]) == 2.0).await;

    // The upstream comes back: only the probe and the two who waited connect.
    let accepts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind(up).await.unwrap();
    let counted = accepts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let mut buf = [0u8; 15];
    patient.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"patient request");
    let (got, reset) = read_to_end(&mut half).await;
    assert_eq!((got.as_slice(), reset), (&b"half-closed request"[..], false));
    let accepted = accepts.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("FIGURES the upstream accepted {accepted} connections when it came back (probe and 2 waiting clients)");
    // 2 for the waiting clients, at most 2 for the probe's staggered connects: none for the 50 that left.
    assert!(accepted <= 4, "no connect for the clients that left: {accepted} accepted");
    assert_eq!(m("staybound_client_connections_total", &[("outcome", "proxied")]), 2.0);
}

/// A redis-like node on one port: `+PONG` to each line, or `-LOADING ...` while it loads. `take_over`
/// models a takeover onto a node that accepts before it is ready.
struct LoadingNode {
    addr: SocketAddr,
    loading: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bumped to reset every open connection.
    reset: tokio::sync::watch::Sender<u64>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl LoadingNode {
    async fn start() -> LoadingNode {
        let mut node = LoadingNode {
            addr: closed_port(),
            loading: Default::default(),
            reset: tokio::sync::watch::channel(0).0,
            listener: None,
        };
        node.listen().await;
        node
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let (loading, reset) = (self.loading.clone(), self.reset.clone());
        self.listener = Some(tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (loading, mut reset) = (loading.clone(), reset.subscribe());
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    loop {
                        tokio::select! {
                            _ = reset.changed() => {
                                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                                return;
                            }
                            r = s.read(&mut buf) => match r {
                                Ok(n) if n > 0 => {
                                    let reply: &[u8] = if loading.load(std::sync::atomic::Ordering::SeqCst) {
                                        b"-LOADING Redis is loading the dataset in memory\r\n"
                                    } else {
                                        b"+PONG\r\n"
                                    };
                                    if s.write_all(reply).await.is_err() {
                                        return;
                                    }
                                }
                                _ => return,
                            },
                        }
                    }
                });
            }
        }));
    }

    /// The old node goes (its port refuses, its sessions are reset); once `gone_seen` says staybound saw
    /// it, the new node comes up on the same address, accepting but loading until `set_ready`.
    async fn take_over(&mut self, gone_seen: impl Future<Output = ()>) {
        if let Some(l) = self.listener.take() {
            l.abort();
            let _ = l.await;
        }
        self.reset.send_modify(|g| *g += 1);
        gone_seen.await;
        self.loading.store(true, std::sync::atomic::Ordering::SeqCst);
        self.listen().await;
    }

    fn set_ready(&self) {
        self.loading.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_accepts_before_it_is_ready_holds_clients_and_is_one_failover() {
    let mut node = LoadingNode::start().await;
    let proxy = Proxy::start(&format!(
        "[[service]]\nname = \"ready\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n[service.probe]\nmode = \"send-expect\"\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"\n",
        node.addr
    ))
    .await;
    let addr = proxy.addr("ready");
    let up = |p: &Proxy| p.metric("staybound_upstream_up", &[("service", "ready")]) == 1.0;
    eventually("the host is up", Duration::from_secs(5), || up(&proxy)).await;

    // A closed-loop client: one PING per new connection, every 50 ms, until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let client = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut replies: Vec<(Instant, String)> = Vec::new();
            for _ in 0..2000 {
                if stop.is_cancelled() {
                    break;
                }
                let one = async {
                    let mut s = TcpStream::connect(addr).await.ok()?;
                    s.write_all(b"PING\r\n").await.ok()?;
                    let mut buf = [0u8; 128];
                    let n = s.read(&mut buf).await.ok()?;
                    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
                };
                let reply = tokio::time::timeout(Duration::from_secs(30), one).await.ok().flatten();
                replies.push((Instant::now(), reply.unwrap_or_else(|| "(none)".into())));
                // why: the client's own pace, 20 requests a second.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            replies
        })
    };
    eventually("the client is served", Duration::from_secs(5), || {
        proxy.metric("staybound_client_connections_total", &[("service", "ready"), ("outcome", "proxied")]) >= 3.0
    })
    .await;

    let moved = Instant::now();
    node.take_over(eventually("staybound saw the node go", Duration::from_secs(5), || !up(&proxy))).await;
    eventually("the new node is seen not ready", Duration::from_secs(10), || {
        proxy.metric("staybound_upstream_not_ready", &[("service", "ready")]) == 1.0
    })
    .await;
    let status = staybound::admin::status_json(proxy.instance.registry());
    assert_eq!(status[0]["state"], "not-ready", "{status}");
    let note = status[0]["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("not ready") && note.contains("-LOADING"), "/status says why: {note}");
    // why: the scenario: the new node loads for 5 s after the takeover.
    tokio::time::sleep_until((moved + Duration::from_secs(5)).into()).await;
    node.set_ready();
    let ready_at = Instant::now();
    eventually("the host is up again", Duration::from_secs(10), || up(&proxy)).await;
    eventually("the client is served again", Duration::from_secs(10), || {
        proxy.metric("staybound_client_connections_total", &[("service", "ready"), ("outcome", "proxied")]) >= 10.0
    })
    .await;
    stop.cancel();
    let replies = client.await.unwrap();

    let loading = replies.iter().filter(|(_, r)| r.starts_with("-LOADING")).count();
    let pongs: Vec<Instant> = replies.iter().filter(|(_, r)| r == "+PONG").map(|(t, _)| *t).collect();
    let stall = pongs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let first_after = pongs.iter().find(|t| **t > ready_at).map(|t| *t - ready_at);
    let failovers: f64 = ["probe", "identity", "session_reset", "keepalive", "neighbor", "admin", "reload", "role"]
        .iter()
        .map(|s| proxy.metric("staybound_failovers_total", &[("service", "ready"), ("signal", s)]))
        .sum();
    eprintln!(
        "FIGURES not-ready node: {failovers} failover(s), {loading} -LOADING replies through staybound, {} +PONG, longest stall {:.3}s (the node loaded for 5 s), first +PONG {:.3}s after the node was ready",
        pongs.len(),
        stall.as_secs_f64(),
        first_after.unwrap_or_default().as_secs_f64()
    );
    assert_eq!(failovers, 1.0, "one takeover, one failover");
    assert_eq!(loading, 0, "no client is released to a node that is not ready");
    assert!(replies.iter().all(|(_, r)| r == "+PONG"), "every request answered by a ready node: {replies:?}");
}
