//! Fuzzes config validation with well-formed TOML: the input is decoded (with `arbitrary`) into a document
//! of staybound's own tables and keys (`[admin]`, `[defaults.*]`, `[[service]]`, `[service.*]`), whose
//! values are mostly of the right type and near the edges of their ranges (durations with every unit,
//! ports 0 and 65535, CIDR prefixes past the maximum, escapes, regexes, names that repeat or depend on each
//! other), so runs get past the TOML parser and into value checks, `[defaults]` merging and the
//! cross-service rules far more often than raw bytes do.
//!
//! Must hold: the same as the `config` target (see `staybound_fuzz::check_config_text`): no panic; on
//! error every `Problem` has line >= 1 and column >= 1 and the message renders non-empty; on success
//! `check::report` works and every service's bounds are finite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use staybound_fuzz::structured::{Doc, render};

fuzz_target!(|doc: Doc| {
    let _ = staybound_fuzz::check_config_text(&render(&doc));
});
