//! Worst-case detection times computed from a service's settings: how long, at most, before a client
//! blocked on a session learns that (a) the logical host moved silently and the new node answers RST,
//! (b) the host went black (no answer at all), and (c) how long a new connect that cannot complete takes
//! to be noticed. `staybound check` prints them; the lab tests hold staybound to them.

use std::time::Duration;

use crate::config::{ProbeMode, ServiceConfig};
use crate::failover::probe::probe_keepalive;

/// Settings above this are flagged by `check`.
pub(crate) const WARN_ABOVE: Duration = Duration::from_secs(10);

/// Worst cases, each with what bounds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    pub silent_move: (Duration, String),
    pub black_hole: (Duration, String),
    pub connect: (Duration, String),
}

impl Bounds {
    pub fn warnings(&self) -> Vec<String> {
        [
            ("a silent move", &self.silent_move),
            ("a black-holed host", &self.black_hole),
            ("a connect that cannot complete", &self.connect),
        ]
        .iter()
        .filter(|(_, (d, _))| *d > WARN_ABOVE)
        .map(|(what, (d, why))| {
            format!("{what} is noticed only after {} ({why}); shorten it below {}", fmt(*d), fmt(WARN_ABOVE))
        })
        .collect()
    }
}

pub fn fmt(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Computes the bounds of one service.
pub fn bounds(svc: &ServiceConfig) -> Bounds {
    let ka = &svc.keepalive;
    let p = &svc.probe;
    let extra_falls = p.fall.saturating_sub(1);
    // A session's own keep-alive: an RST from the new node comes back to the first probe after `idle`.
    let session_rst = (ka.idle, format!("each session's keep-alive probes after {} idle", fmt(ka.idle)));
    // A session's own keep-alive against silence: aborted by TCP_USER_TIMEOUT, or after `count` probes.
    let session_silent = if ka.user_timeout.is_zero() {
        ka.idle + ka.interval * ka.count
    } else {
        let mut t = ka.idle;
        while t < ka.user_timeout {
            t += ka.interval;
        }
        t
    };
    let session_silent = (session_silent, "each session's keep-alive and user_timeout".to_string());
    let (probe_move, probe_black) = match p.mode {
        ProbeMode::KeepOpen => {
            let pk = probe_keepalive(p, ka);
            let per = p.timeout + Duration::from_millis(100);
            (
                Some((pk.idle, format!("the probe connection draws an RST with a keep-alive every {}", fmt(pk.idle)))),
                Some((
                    pk.idle + pk.interval + per * extra_falls,
                    format!(
                        "no ACK on the probe connection for {} + {}, fall = {}",
                        fmt(pk.idle),
                        fmt(pk.interval),
                        p.fall
                    ),
                )),
            )
        }
        ProbeMode::SendExpect => {
            let per = p.timeout + Duration::from_millis(250);
            (
                Some((p.interval, format!("a probe request every {} draws the new node's RST", fmt(p.interval)))),
                Some((
                    p.interval + p.timeout + per * extra_falls,
                    format!(
                        "no reply within {} after a request every {}, fall = {}",
                        fmt(p.timeout),
                        fmt(p.interval),
                        p.fall
                    ),
                )),
            )
        }
        ProbeMode::Connect => (
            None,
            Some((
                p.interval + p.timeout + (p.timeout + p.interval.min(Duration::from_millis(250))) * extra_falls,
                format!(
                    "a connect every {} not answered within {}, fall = {}",
                    fmt(p.interval),
                    fmt(p.timeout),
                    p.fall
                ),
            )),
        ),
        ProbeMode::Off => (None, None),
    };
    let pick = |a: Option<(Duration, String)>, b: (Duration, String)| match a {
        Some(a) if a.0 <= b.0 => a,
        _ => b,
    };
    Bounds {
        silent_move: pick(probe_move, session_rst),
        black_hole: pick(probe_black, session_silent),
        connect: (svc.ride_out.connect_timeout, "hold.connect_timeout of each attempt".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn svc(extra: &str) -> ServiceConfig {
        let text = format!("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n{extra}");
        Config::from_toml_str(&text, Path::new("t.toml")).unwrap().services.remove(0)
    }

    #[test]
    fn defaults_notice_a_silent_move_within_a_second() {
        let b = bounds(&svc(""));
        assert_eq!(b.silent_move.0, Duration::from_secs(1));
        assert_eq!(b.black_hole.0, Duration::from_secs(2));
        assert_eq!(b.connect.0, Duration::from_secs(1));
        assert!(b.warnings().is_empty());
    }

    #[test]
    fn slow_settings_warn() {
        let b = bounds(&svc(
            "[service.probe]\nmode = \"off\"\n[service.keepalive]\nidle = \"30s\"\nuser_timeout = \"0s\"\n",
        ));
        assert_eq!(b.silent_move.0, Duration::from_secs(30));
        assert_eq!(b.black_hole.0, Duration::from_secs(33));
        assert_eq!(b.warnings().len(), 2);
    }
}
