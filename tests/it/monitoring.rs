//! The shipped monitoring (`deploy/prometheus/staybound-rules.yml`, `deploy/grafana/staybound-dashboard.json`)
//! names only series a running staybound exports, and the rules pass `promtool` when it is installed.

use crate::support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use support::process::{Running, echo};

/// Every `staybound_*` name in a text.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("staybound_") {
        let tail = &rest[i..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The series names of a Prometheus exposition, and the metric families it declares.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            names.extend(typed.split_whitespace().next().map(str::to_string));
        } else if !line.starts_with('#') {
            names.extend(line.split(['{', ' ']).next().filter(|n| !n.is_empty()).map(str::to_string));
        }
    }
    names
}

#[test]
fn the_rules_and_the_dashboard_name_only_exported_series() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let rules = std::fs::read_to_string(root.join("prometheus/staybound-rules.yml")).unwrap();
    let dashboard = std::fs::read_to_string(root.join("grafana/staybound-dashboard.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = doc["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{}", panels.len());
    for p in panels {
        assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "panel {} has queries", p["title"]);
    }

    let up = echo();
    let sb = Running::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"watched\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n"
    ));
    let have = exported(&sb.get("/metrics"));
    let mut used = names_in(&rules);
    used.extend(names_in(&dashboard));
    let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    eprintln!("MONITORING: {} metric names used by the rules and the dashboard, all exported", used.len());
    assert!(
        missing.is_empty(),
        "named by the rules or the dashboard but not exported: {missing:?}\nexported: {have:?}"
    );
    for needed in ["staybound_failovers_total", "staybound_failover_detection_seconds_bucket", "staybound_held_clients"]
    {
        assert!(used.contains(needed), "{needed} is watched");
    }
}

#[test]
fn promtool_accepts_the_rules_and_their_tests() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIP: promtool is not installed (Debian package prometheus); the rules were not checked");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [["check", "rules", "staybound-rules.yml"], ["test", "rules", "staybound-rules.test.yml"]] {
        let out = Command::new("promtool").args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
