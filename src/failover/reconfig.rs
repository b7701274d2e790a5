//! What a reload changes for a running detector. The detector is never restarted while its service keeps its
//! name: it compares the settings it runs on with the new ones, part by part, and changes only what depends
//! on a part that changed. The parts are types (`Target`, `ProbePath`), so a setting the detector comes to
//! depend on is added to a part, not to a list kept by hand elsewhere.

use std::net::IpAddr;

use crate::config::{KeepaliveConfig, ProbeConfig, Protocol, ServiceConfig, UdpConfig, UpstreamAddr};

/// Where the logical host is and how it is reached.
#[derive(Debug, PartialEq)]
struct Target<'a> {
    upstream: &'a UpstreamAddr,
    source: Option<IpAddr>,
    freebind: bool,
    protocol: Protocol,
}

/// Everything the probe session (and the neighbour watch) is made and read with.
#[derive(Debug, PartialEq)]
struct ProbePath<'a> {
    target: Target<'a>,
    probe: &'a ProbeConfig,
    keepalive: &'a KeepaliveConfig,
    udp: &'a UdpConfig,
}

fn probe_path(s: &ServiceConfig) -> ProbePath<'_> {
    ProbePath {
        target: Target { upstream: &s.upstream, source: s.source, freebind: s.freebind, protocol: s.protocol },
        probe: &s.probe,
        keepalive: &s.keepalive,
        udp: &s.udp,
    }
}

/// What a new config changes for a detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// The upstream address changed: the sessions made to the old one end, a failover with signal `reload`.
    pub moved: bool,
    /// The probe session, its pacing or the neighbour watch must be made anew.
    pub reprobe: bool,
    /// The identity pattern changed: the node's name as read so far is forgotten (not a move).
    pub identity: bool,
}

impl Change {
    pub fn between(old: &ServiceConfig, new: &ServiceConfig) -> Change {
        Change {
            moved: old.upstream != new.upstream,
            reprobe: probe_path(old) != probe_path(new),
            identity: old.probe.identity.as_ref().map(|r| r.as_str())
                != new.probe.identity.as_ref().map(|r| r.as_str()),
        }
    }

    pub fn any(self) -> bool {
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
        assert_eq!(Change::between(&old, &new), Change { moved: true, reprobe: true, identity: false });
    }

    #[test]
    fn probe_settings_make_a_new_probe_without_a_move() {
        let old = service("", "");
        for probe in ["interval = \"500ms\"\n", "fall = 3\n", "neighbor = false\n"] {
            let c = Change::between(&old, &service("", probe));
            assert_eq!(c, Change { moved: false, reprobe: true, identity: false }, "{probe}");
        }
        let c = Change::between(&old, &service("[service.keepalive]\nidle = \"2s\"\n", ""));
        assert!(c.reprobe && !c.moved);
        let c = Change::between(&old, &service("", "identity = \"node=(\\\\w+)\"\n"));
        assert_eq!(c, Change { moved: false, reprobe: true, identity: true });
    }
}
