//! `staybound status`: reads `/status` from a running staybound's admin endpoint and prints a table.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Where to reach an admin endpoint listening on `admin`: a wildcard address (`0.0.0.0`, `::`) is reached
/// through loopback of its family, and named so in `Host`, which the endpoint checks.
pub fn reach(admin: SocketAddr) -> SocketAddr {
    match admin.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin.port()),
        IpAddr::V6(v6) if v6.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), admin.port()),
        _ => admin,
    }
}

/// Fetches `path` from the admin endpoint with a plain HTTP/1.0 GET.
///
/// # Errors
/// Connection, timeout or a non-200 answer.
pub fn fetch(admin: SocketAddr, path: &str) -> Result<String, String> {
    let admin = reach(admin);
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach the admin endpoint at {admin}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("reading from {admin}: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("a malformed HTTP answer")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(format!("{admin}{path} answered {status}: {}", body.trim()));
    }
    Ok(body.to_string())
}

/// The table `staybound status` prints for a `/status` document.
///
/// # Errors
/// A document that is not the expected JSON.
pub fn table(json: &str) -> Result<String, String> {
    let doc: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("/status is not JSON: {e}"))?;
    let list = doc.as_array().ok_or("/status is not a list")?;
    let mut rows = vec![[
        "SERVICE".to_string(),
        "STATE".into(),
        "EPOCH".into(),
        "IDENTITY".into(),
        "LAST FAILOVER".into(),
        "CAUSE".into(),
        "DETECTION".into(),
        "SESSIONS".into(),
        "HELD".into(),
    ]];
    for s in list {
        let str_of = |k: &str| s.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
        let num_of = |k: &str| s.get(k).map(|v| v.to_string()).unwrap_or("-".into());
        let last = s.get("last_failover").filter(|v| !v.is_null());
        let (when, cause, detection) = match last {
            Some(f) => (
                f.get("time").and_then(|v| v.as_str()).unwrap_or("-").to_string(),
                f.get("cause").and_then(|v| v.as_str()).unwrap_or("-").to_string(),
                f.get("detection_seconds").and_then(|v| v.as_f64()).map_or("-".into(), |d| format!("{:.3}s", d)),
            ),
            None => ("never".into(), "-".into(), "-".into()),
        };
        rows.push([
            str_of("name"),
            str_of("state"),
            num_of("epoch"),
            str_of("identity"),
            when,
            cause,
            detection,
            num_of("active_sessions"),
            num_of("held_clients"),
        ]);
    }
    let widths: Vec<usize> = (0..9).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    let mut notes: Vec<String> = list
        .iter()
        .filter_map(|s| Some(format!("{}: {}", s.get("name")?.as_str()?, s.get("note")?.as_str()?)))
        .collect();
    notes.extend(list.iter().filter(|s| s.get("split_brain").and_then(|v| v.as_bool()) == Some(true)).filter_map(
        |s| {
            Some(format!(
                "{}: split brain: the upstream address flaps between two link-layer addresses; epochs are damped",
                s.get("name")?.as_str()?
            ))
        },
    ));
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for n in notes {
        out.push_str(&format!("\nnote: {n}\n"));
    }
    for s in list {
        let name = s.get("name").and_then(|n| n.as_str()).unwrap_or("?");
        if let Some(destroy) = s.pointer("/guard/destroy").and_then(|d| d.as_str()) {
            let last = s.pointer("/guard/last_epoch_end").filter(|l| l.is_object()).map_or(String::new(), |l| {
                format!("; last epoch end (epoch {}): {} destroyed, {} failed", l["epoch"], l["destroyed"], l["failed"])
            });
            out.push_str(&format!("\nguard: {name}: destroying sockets {destroy}{last}\n"));
        }
        if let Some(rules) = s.pointer("/intercept/rules").and_then(|r| r.as_str()) {
            out.push_str(&format!("\nintercept: {name}: rules {rules}\n"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_and_intercept_services_get_a_line_each() {
        let json = r#"[{"name":"g","state":"up","epoch":2,"guard":{"destroy":"allowed (sock_diag SOCK_DESTROY works here)","last_epoch_end":{"epoch":1,"destroyed":3,"failed":0}},"intercept":null},
                      {"name":"t","state":"up","epoch":1,"guard":null,"intercept":{"rules":"installed by this process: nftables table inet staybound, 1 redirect(s)"}},
                      {"name":"p","state":"up","epoch":1,"guard":null,"intercept":null}]"#;
        let t = table(json).unwrap();
        assert!(t.contains("guard: g: destroying sockets allowed (sock_diag SOCK_DESTROY works here); last epoch end (epoch 1): 3 destroyed, 0 failed"), "{t}");
        assert!(t.contains("intercept: t: rules installed by this process"), "{t}");
        assert!(!t.contains("guard: p") && !t.contains("intercept: p"), "{t}");
    }

    #[test]
    fn a_wildcard_admin_address_is_reached_through_loopback() {
        let at = |s: &str| reach(s.parse().unwrap()).to_string();
        assert_eq!(at("0.0.0.0:9901"), "127.0.0.1:9901");
        assert_eq!(at("[::]:9901"), "[::1]:9901");
        assert_eq!(at("10.1.2.3:9901"), "10.1.2.3:9901");
    }
}
