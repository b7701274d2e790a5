//! What a reload changes for a running detector. The detector is never restarted while its service keeps its
//! name: it compares the settings it runs on with the new ones, part by part, and changes only what depends
//! on a part that changed. The parts are types (`Target`, `ProbePath`), so a setting the detector comes to
//! depend on is added to a part, not to a list kept by hand elsewhere; the probe's own settings are split
//! between the path and its pacing by an exhaustive pattern, so a new one cannot be left out.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::{KeepaliveConfig, ProbeConfig, ProbeMode, Protocol, ServiceConfig, UdpConfig, UpstreamAddr};

/// Where the logical host is and how it is reached.
#[derive(Debug, PartialEq)]
struct Target<'a> {
    upstream: &'a UpstreamAddr,
    source: Option<IpAddr>,
    freebind: bool,
    protocol: Protocol,
}

/// Everything the probe session is made and read with, but its pacing.
#[derive(Debug, PartialEq)]
struct ProbePath<'a> {
    target: Target<'a>,
    mode: ProbeMode,
    send: &'a [u8],
    expect: &'a [u8],
    identity: Option<&'a str>,
    preset: Option<&'a crate::config::Preset>,
    keepalive: &'a KeepaliveConfig,
    udp: &'a UdpConfig,
}

fn probe_path(s: &ServiceConfig) -> ProbePath<'_> {
    // why: no `..`, so a setting added to the probe must be placed here: in the path, or in the pacing.
    let ProbeConfig {
        mode,
        interval: _,
        timeout: _,
        send,
        expect,
        identity,
        fall: _,
        rise: _,
        neighbor: _,
        split_brain_window: _,
        preset,
    } = &s.probe;
    ProbePath {
        target: Target { upstream: &s.upstream, source: s.source, freebind: s.freebind, protocol: s.protocol },
        mode: *mode,
        send,
        expect,
        identity: identity.as_ref().map(|r| r.as_str()),
        preset: preset.as_ref(),
        keepalive: &s.keepalive,
        udp: &s.udp,
    }
}

/// The probe's pacing: the probe connection's keep-alive follows it, and takes a new one in place. (`fall` and
/// `rise` are the state machine's, set on every reload; `neighbor` is the watch's, see `Change::neighbor`.)
fn pacing(p: &ProbeConfig) -> (Duration, Duration) {
    (p.interval, p.timeout)
}

/// What a new config changes for a detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Change {
    /// The upstream address changed: the sessions made to the old one end, a failover with signal `reload`.
    pub moved: bool,
    /// The probe session and the neighbour watch must be made anew.
    pub reprobe: bool,
    /// Only the probe's interval or timeout changed: the probe connection keeps going with a new keep-alive, so a
    /// move under way is still caught by it (a new session would reach the new node and see nothing).
    pub retune: bool,
    /// Only the neighbour watch is switched on or off.
    pub neighbor: bool,
    /// The identity pattern changed: the node's name as read so far is forgotten (not a move).
    pub identity: bool,
}

impl Change {
    pub(super) fn between(old: &ServiceConfig, new: &ServiceConfig) -> Change {
        let reprobe = probe_path(old) != probe_path(new);
        Change {
            moved: old.upstream != new.upstream,
            reprobe,
            retune: !reprobe && pacing(&old.probe) != pacing(&new.probe),
            neighbor: !reprobe && old.probe.neighbor != new.probe.neighbor,
            identity: old.probe.identity.as_ref().map(|r| r.as_str())
                != new.probe.identity.as_ref().map(|r| r.as_str()),
        }
    }

    pub(super) fn any(self) -> bool {
        self != Change::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn service(extra: &str, probe: &str) -> ServiceConfig {
        let text = format!(
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.2:5432\"\n{extra}[service.probe]\nmode = \"hold\"\n{probe}"
        );
        Config::from_toml_str(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}")).services.remove(0)
    }

    #[test]
    fn settings_of_the_data_path_change_nothing_in_the_detector() {
        let old = service("", "");
        for extra in [
            "max_connections = 7\n",
            "idle_timeout = \"5m\"\n",
            "on_failover = \"close\"\n",
            "backlog = 16\n",
            "[service.hold]\ndeadline = \"20s\"\n",
        ] {
            assert_eq!(Change::between(&old, &service(extra, "")), Change::default(), "{extra}");
        }
    }

    #[test]
    fn a_new_address_is_a_move_and_a_new_probe() {
        let old = service("", "");
        let mut new = service("", "");
        new.upstream = UpstreamAddr::Ip("127.0.0.3:5432".parse().unwrap());
        assert_eq!(Change::between(&old, &new), Change { moved: true, reprobe: true, ..Change::default() });
    }

    #[test]
    fn probe_settings_make_a_new_probe_without_a_move() {
        let old = service("", "");
        let mut connect = service("", "");
        connect.probe.mode = ProbeMode::Connect;
        let mut send = service("", "");
        send.probe.send = b"PING\r\n".to_vec();
        for new in [connect, send] {
            assert_eq!(Change::between(&old, &new), Change { reprobe: true, ..Change::default() }, "{:?}", new.probe);
        }
        let c = Change::between(&old, &service("[service.keepalive]\nidle = \"2s\"\n", ""));
        assert!(c.reprobe && !c.moved);
        let c = Change::between(&old, &service("", "identity = \"node=(\\\\w+)\"\n"));
        assert_eq!(c, Change { reprobe: true, identity: true, ..Change::default() });
    }

    #[test]
    fn the_probe_pacing_retunes_the_held_session_in_place() {
        let old = service("", "");
        for probe in ["interval = \"500ms\"\n", "timeout = \"800ms\"\n"] {
            let c = Change::between(&old, &service("", probe));
            assert_eq!(c, Change { retune: true, ..Change::default() }, "{probe}");
        }
        let c = Change::between(&old, &service("", "neighbor = false\n"));
        assert_eq!(c, Change { neighbor: true, ..Change::default() });
        // fall and rise are the state machine's thresholds, set on every reload.
        assert_eq!(Change::between(&old, &service("", "fall = 3\nrise = 2\n")), Change::default());
    }
}
