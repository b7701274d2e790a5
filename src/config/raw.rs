//! The config file as written: serde structs that mirror the TOML, with the span of every value so
//! validation can point at file, line and column. Nothing here interprets a value; `validate` does.

use serde::Deserialize;
use toml::Spanned;

/// A value as written, with its byte range in the file.
pub(super) type S<T> = Spanned<T>;

/// A duration as written: a string with its unit. Its own type so that a bare number gets a message
/// that says how to write one, not only that a string was expected.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct DurationText(pub String);

impl std::fmt::Debug for DurationText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl DurationText {
    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration: a string with its unit, such as \"30s\" or \"250ms\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<DurationText, E> {
                Err(E::custom(format!(
                    "{n} has no unit: a duration is a string with its unit, such as \"{n}s\" or \"{n}ms\""
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<DurationText, E> {
                Err(E::custom(format!(
                    "{n} has no unit: a duration is a string with its unit, such as \"{n}s\" or \"{n}ms\""
                )))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub shutdown_grace: Option<S<DurationText>>,
    pub workers: Option<S<i64>>,
    pub admin: Option<RawAdmin>,
    pub intercept: Option<RawIntercept>,
    pub defaults: Option<RawDefaults>,
    #[serde(default)]
    pub service: Vec<S<RawService>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: Option<S<String>>,
    pub token_file: Option<S<String>>,
    pub failover_rate: Option<S<DurationText>>,
}

/// `[intercept]`: how the `intercept` services' connections are redirected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntercept {
    pub method: Option<S<String>>,
    pub cgroup: Option<S<String>>,
}

/// `[defaults]`: tables every service inherits key by key unless it sets the key itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub keepalive: Option<RawKeepalive>,
    pub probe: Option<RawProbe>,
    pub hold: Option<RawHold>,
    pub udp: Option<RawUdp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub name: Option<S<String>>,
    pub protocol: Option<S<String>>,
    /// An address, or a list of them.
    pub listen: Option<S<toml::Value>>,
    pub upstream: Option<S<String>>,
    pub source: Option<S<String>>,
    pub freebind: Option<S<bool>>,
    pub depends_on: Option<S<Vec<S<String>>>>,
    pub max_connections: Option<S<i64>>,
    pub backlog: Option<S<i64>>,
    pub on_failover: Option<S<String>>,
    pub idle_timeout: Option<S<DurationText>>,
    pub intercept: Option<S<bool>>,
    pub guard: Option<S<bool>>,
    pub keepalive: Option<RawKeepalive>,
    pub probe: Option<RawProbe>,
    pub hold: Option<RawHold>,
    pub udp: Option<RawUdp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeepalive {
    pub idle: Option<S<DurationText>>,
    pub interval: Option<S<DurationText>>,
    pub count: Option<S<i64>>,
    pub user_timeout: Option<S<DurationText>>,
    pub client_idle: Option<S<DurationText>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbe {
    pub mode: Option<S<String>>,
    pub interval: Option<S<DurationText>>,
    pub timeout: Option<S<DurationText>>,
    pub send: Option<S<String>>,
    pub expect: Option<S<String>>,
    pub identity: Option<S<String>>,
    pub fall: Option<S<i64>>,
    pub rise: Option<S<i64>>,
    pub neighbor: Option<S<bool>>,
    pub split_brain_window: Option<S<DurationText>>,
    pub preset: Option<S<String>>,
    pub role: Option<S<String>>,
    pub user: Option<S<String>>,
    pub password_file: Option<S<String>>,
    pub database: Option<S<String>>,
    pub tls: Option<S<bool>>,
    pub tls_ca_file: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHold {
    pub deadline: Option<S<DurationText>>,
    pub connect_timeout: Option<S<DurationText>>,
    pub backoff_initial: Option<S<DurationText>>,
    pub backoff_max: Option<S<DurationText>>,
    pub budget_ratio: Option<S<f64>>,
    pub budget_min_per_sec: Option<S<i64>>,
    pub budget_window: Option<S<DurationText>>,
    pub release_rate: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUdp {
    pub reply_from: Option<S<Vec<S<String>>>>,
    pub flow_idle: Option<S<DurationText>>,
    pub max_flows: Option<S<i64>>,
    pub max_flows_per_source: Option<S<i64>>,
}

/// Takes each key from `own` when set there, else from `inherited`.
pub(super) trait Inherit {
    fn inherit(own: Option<Self>, inherited: Option<&Self>) -> Self
    where
        Self: Sized;
}

macro_rules! inherit_keys {
    ($ty:ident { $($key:ident),* }) => {
        impl Inherit for $ty {
            fn inherit(own: Option<Self>, inherited: Option<&Self>) -> Self {
                let own = own.unwrap_or_default();
                Self { $($key: own.$key.or_else(|| inherited.and_then(|d| d.$key.clone())),)* }
            }
        }
    };
}

inherit_keys!(RawKeepalive { idle, interval, count, user_timeout, client_idle });
inherit_keys!(RawProbe {
    mode,
    interval,
    timeout,
    send,
    expect,
    identity,
    fall,
    rise,
    neighbor,
    split_brain_window,
    preset,
    role,
    user,
    password_file,
    database,
    tls,
    tls_ca_file
});
inherit_keys!(RawHold {
    deadline,
    connect_timeout,
    backoff_initial,
    backoff_max,
    budget_ratio,
    budget_min_per_sec,
    budget_window,
    release_rate
});
inherit_keys!(RawUdp { reply_from, flow_idle, max_flows, max_flows_per_source });
