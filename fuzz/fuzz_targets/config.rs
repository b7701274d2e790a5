//! Fuzzes config validation with arbitrary bytes: `Config::from_toml_str` (TOML parse, every value check,
//! `[defaults]` merge, cross-service rules), then `check::report` and `failover::bounds::bounds`.
//!
//! Must hold, for every input that is UTF-8 (others are skipped, as `Config::load` refuses them):
//! * nothing panics (and nothing hangs: libFuzzer's `-timeout` catches that);
//! * on error, every `Problem` has line >= 1 and column >= 1 (inside the text), the error lists at least
//!   one problem and renders as a non-empty message;
//! * on success, `check::report(&config)` does not panic and every service's `bounds(svc)` is finite.
//!
//! Seeds: fuzz/seeds/config (the shipped configs and the bad configs of tests/it/cli.rs); dictionary:
//! fuzz/dict/toml.dict (the config's tables, keys and typical values).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = staybound_fuzz::check_config_text(text);
    }
});
