//! The benchmark's `plain` contender: the smallest tokio TCP proxy, as a reference floor for what a
//! proxy built on tokio costs per request. Not a product: no config, timeouts, limits or metrics.
//!
//! Accepts on LISTEN, connects to UPSTREAM for each client and runs `tokio::io::copy_bidirectional`
//! until both directions end, on a multi-thread runtime with WORKERS worker threads (default 1, as the
//! benchmark runs staybound with `workers = 1` and HAProxy with one thread).
//!
//! ```sh
//! cargo build --release --example plain_proxy
//! target/release/examples/plain_proxy 127.0.0.1:16000 127.0.0.1:6379 [WORKERS]
//! ```

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: plain_proxy LISTEN UPSTREAM [WORKERS]");
        std::process::exit(2);
    };
    let workers = args.next().map_or(Ok(1), |w| w.parse()).map_err(std::io::Error::other)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut server = TcpStream::connect(&upstream).await?;
                // why: the same Nagle setting as staybound and HAProxy on both sides, so small replies
                // are not held back.
                client.set_nodelay(true)?;
                server.set_nodelay(true)?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await
            });
        }
    })
}
