//! Probe bytes as written in the config: `\r \n \t \\ \xNN` escapes, decoded once at load.

/// Decodes `\r`, `\n`, `\t`, `\\`, `\0` and `\xNN`; anything else after a backslash is an error.
///
/// # Errors
/// A message naming the bad escape and its byte offset.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let Some(&kind) = bytes.get(i + 1) else {
            return Err(format!("a lone backslash at the end (offset {i})"));
        };
        match kind {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = bytes
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("\\x needs two hex digits (offset {i})"))?;
                out.push(hex);
                i += 2;
            }
            other => {
                return Err(format!(
                    "unknown escape \\{} (offset {i}); known: \\r \\n \\t \\0 \\\\ \\xNN",
                    other.escape_ascii()
                ));
            }
        }
        i += 2;
    }
    Ok(out)
}

/// Shows bytes the way the config writes them, for `check` and logs.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let raw = "PING\\r\\n\\x00\\xff\\\\";
        let bytes = unescape(raw).unwrap();
        assert_eq!(bytes, b"PING\r\n\x00\xff\\");
        assert_eq!(escape_bytes(&bytes), "PING\\r\\n\\x00\\xff\\\\");
    }

    #[test]
    fn bad_escapes() {
        assert!(unescape("\\q").is_err());
        assert!(unescape("\\x4").is_err());
        assert!(unescape("\\xzz").is_err());
        assert!(unescape("abc\\").is_err());
    }
}
