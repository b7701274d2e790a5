//! Fuzzes the probe's reply matching and the probe-bytes escapes:
//! * `failover::probe::contains(haystack, needle)`: agrees with a plain reference search; an empty needle
//!   and any slice of the haystack are always found;
//! * `failover::probe::identity_of(&ProbeConfig, reply)` with a `send-expect` probe whose identity regex
//!   comes from the input (at most 64 bytes, compiled with `config::compile_identity` as validation does,
//!   within its program-size limit; skipped when refused or when it has other than one capture group)
//!   and a reply of at most 64 KiB: an identity it returns is a substring of the reply read as lossy
//!   UTF-8, and a probe without an identity regex returns none;
//! * `config::unescape` / `escape_bytes`: `unescape(&escape_bytes(b)) == Ok(b)` for all bytes `b`,
//!   `escape_bytes` writes printable ASCII only, and `unescape` of any text does not panic (and what it
//!   decodes survives the round trip).
//!
//! Must never panic. Input layout: byte 0 = regex length (mod 65); byte 1 = needle length (low 7 bits;
//! the top bit means "take the needle from the reply", at an offset given by the regex's first byte);
//! then the regex, the needle, and the rest is the reply.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use staybound::config::{Config, ProbeConfig, ProbeMode, compile_identity, escape_bytes, unescape};
use staybound::failover::probe::{contains, identity_of};

const MAX_REGEX: usize = 64;
const MAX_REPLY: usize = 64 * 1024;

fn reference_contains(haystack: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        if haystack[i..].starts_with(needle) {
            return true;
        }
        i += 1;
    }
    false
}

/// A `send-expect` probe as validation builds it (so fields added to `ProbeConfig` later get their
/// defaults here too), with the identity regex and `expect` of this run.
fn probe(identity: Option<regex_lite::Regex>, expect: &[u8]) -> ProbeConfig {
    static BASE: OnceLock<ProbeConfig> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let text = "[[service]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n\
                    [service.probe]\nmode = \"send-expect\"\nsend = \"INFO server\\\\r\\\\n\"\n";
        let config = Config::from_toml_str(text, Path::new("probe.toml")).expect("the base probe config is valid");
        config.services[0].probe.clone()
    });
    assert_eq!(base.mode, ProbeMode::SendExpect);
    ProbeConfig { identity, expect: expect.to_vec(), ..base.clone() }
}

fn check_escapes(bytes: &[u8]) {
    let shown = escape_bytes(bytes);
    assert!(shown.bytes().all(|b| (0x20..=0x7e).contains(&b)), "escape_bytes wrote a non-printable: {shown:?}");
    assert_eq!(unescape(&shown).as_deref(), Ok(bytes), "round trip of {bytes:?} via {shown:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&[regex_len, needle_len], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let regex_len = (usize::from(regex_len) % (MAX_REGEX + 1)).min(rest.len());
    let (regex_bytes, rest) = rest.split_at(regex_len);
    let from_reply = needle_len & 0x80 != 0;
    let needle_len = usize::from(needle_len & 0x7f);
    let (needle, reply) = if from_reply { (&[][..], rest) } else { rest.split_at(needle_len.min(rest.len())) };
    let reply = &reply[..reply.len().min(MAX_REPLY)];
    // The needle from the reply: a slice starting at an offset taken from the regex bytes.
    let needle = if from_reply {
        let start = regex_bytes.first().map_or(0, |&b| usize::from(b)).min(reply.len());
        let end = (start + needle_len).min(reply.len());
        &reply[start..end]
    } else {
        needle
    };

    // contains
    let found = contains(reply, needle);
    assert_eq!(found, reference_contains(reply, needle), "contains({reply:?}, {needle:?})");
    if from_reply {
        assert!(found, "a slice of the reply was not found in it: {needle:?}");
    }
    assert!(contains(reply, b""));

    // identity_of
    assert_eq!(identity_of(&probe(None, needle), reply), None);
    if let Ok(pattern) = std::str::from_utf8(regex_bytes)
        && let Ok(re) = compile_identity(pattern)
        && re.captures_len() == 2
    {
        let p = probe(Some(re), needle);
        if let Some(id) = identity_of(&p, reply) {
            let text = String::from_utf8_lossy(reply);
            assert!(text.contains(id.as_str()), "identity {id:?} is not in the reply {text:?}");
        }
    }

    // escapes
    check_escapes(reply);
    check_escapes(needle);
    let text = String::from_utf8_lossy(data);
    if let Ok(decoded) = unescape(&text) {
        check_escapes(&decoded);
    }
});
