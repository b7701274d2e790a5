//! What the config targets (`config`, `config_structured`) check of one TOML text, shared by both.

pub mod structured;

use std::path::Path;
use std::time::Duration;

use staybound::config::Config;

/// No valid config can produce a detection bound near this: validation caps every duration (the largest,
/// keep-alive `idle + interval * count`, is under 50 days). A bound beyond it means an unchecked value.
pub const BOUND_CEILING: Duration = Duration::from_secs(365 * 24 * 3600);

/// Validates `text` the way `staybound check` does and asserts what must hold of the outcome:
/// * an error has at least one problem, each at line >= 1 and column >= 1, inside the text, with a
///   non-empty message, and the error renders as a non-empty message;
/// * a valid config has a non-empty `check` report, and every service's worst-case bounds are computed
///   without panicking (no `Duration` overflow) and stay below [`BOUND_CEILING`].
/// Returns whether the config was valid (for corpus statistics).
pub fn check_config_text(text: &str) -> bool {
    match Config::from_toml_str(text, Path::new("fuzz.toml")) {
        Err(e) => {
            let problems = e.problems();
            assert!(!problems.is_empty(), "an invalid config with no problem listed: {e}");
            let lines: Vec<&str> = text.split('\n').collect();
            for p in problems {
                assert!(p.line >= 1, "line 0: {p:?}");
                assert!(p.column >= 1, "column 0: {p:?}");
                assert!(p.line <= lines.len(), "line past the end of the text ({} lines): {p:?}", lines.len());
                let width = lines[p.line - 1].chars().count();
                assert!(p.column <= width + 1, "column past the end of line {} ({width} chars): {p:?}", p.line);
                assert!(!p.message.trim().is_empty(), "empty message: {p:?}");
            }
            let rendered = e.to_string();
            assert!(!rendered.trim().is_empty(), "the error renders as nothing: {e:?}");
            false
        }
        Ok(config) => {
            let report = staybound::check::report(&config);
            assert!(!report.is_empty(), "empty check report");
            for svc in &config.services {
                let b = staybound::failover::bounds::bounds(svc);
                for (what, (d, why)) in
                    [("silent_move", &b.silent_move), ("black_hole", &b.black_hole), ("connect", &b.connect)]
                {
                    assert!(d.as_secs_f64().is_finite(), "{}: {what} is not finite: {d:?}", svc.name);
                    assert!(*d <= BOUND_CEILING, "{}: {what} = {d:?} ({why}) is beyond any valid setting", svc.name);
                    assert!(!why.is_empty(), "{}: {what} has no reason", svc.name);
                }
                let _ = b.warnings();
            }
            true
        }
    }
}
