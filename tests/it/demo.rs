//! `staybound demo` end to end: the client through staybound loses nothing, the direct one does, and the
//! whole demonstration stays within its time bound.
#![cfg(feature = "demo")]

use std::time::{Duration, Instant};

/// The number after `prefix` in the report's summary line.
fn lost(summary: &str, prefix: &str) -> usize {
    let rest =
        &summary[summary.find(prefix).unwrap_or_else(|| panic!("no {prefix:?} in {summary:?}")) + prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no count after {prefix:?} in {summary:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_through_staybound_loses_nothing_and_the_direct_one_does() {
    let started = Instant::now();
    let report = staybound::demo::run(1).await.unwrap_or_else(|e| panic!("the demo failed: {e:#}"));
    let took = started.elapsed();
    let summary =
        report.lines().find(|l| l.starts_with("summary:")).unwrap_or_else(|| panic!("no summary in:\n{report}"));
    assert_eq!(lost(summary, "through staybound lost "), 0, "the client through staybound lost requests:\n{report}");
    assert!(lost(summary, "direct lost ") >= 1, "the direct client lost nothing, so the demo shows nothing:\n{report}");
    assert!(took < Duration::from_secs(30), "the demo took {took:?}:\n{report}");
}
