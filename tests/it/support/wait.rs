//! Bounded waiting from a plain thread: poll a condition outside the test (a child's log, a metric, a
//! namespace's state) until it holds, with a deadline and a cap on the number of polls. Async tests use
//! `proxy::eventually`.

use std::thread;
use std::time::{Duration, Instant};

const MAX_POLLS: u32 = 100_000;

/// Poll `f` until it returns true; panics mentioning `what` after `timeout`.
///
/// Bounded in time and in number of polls; the poll interval backs off from
/// 1 ms to 50 ms, so short waits stay short.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    if let Err(e) = poll_until(timeout, &mut f) {
        panic!("timed out after {timeout:?} ({e} polls) waiting until {what}");
    }
}

/// Like [`wait_until`] but returns `false` on timeout instead of panicking.
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    poll_until(timeout, &mut f).is_ok()
}

fn poll_until(timeout: Duration, f: &mut dyn FnMut() -> bool) -> Result<(), u32> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    for n in 0..MAX_POLLS {
        if f() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(n + 1);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Err(MAX_POLLS)
}
