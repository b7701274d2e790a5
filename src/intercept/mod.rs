//! Transparent mode (`intercept = true`): this host's outbound TCP connections to a service's `upstream`
//! are redirected into its listener, so a legacy client that dials the logical host's address comes through
//! staybound without a change. Two ways, chosen by `[intercept] method`:
//!
//! * **nftables rules** (`nat`, the default; this file): a table of staybound's own (`inet staybound`).
//!   - **The rules** ([`ruleset`], no I/O): one nat chain on the `output` hook; staybound's own traffic
//!     returns first (its upstream and probe sockets carry the mark [`MARK`]; with `staybound setup
//!     --exempt-uid`, also every socket of that user, for a process that may not set marks), then one rule
//!     per service: TCP to the upstream address and port is sent to the listen address (`dnat`), or to this
//!     host's own address on the listen port (`redirect`) for a wildcard listen address. They go to `nft`
//!     through its JSON API (the `nftables` crate) in one transaction that replaces the whole table, so a new
//!     process (an upgrade, a restart after SIGKILL) takes over whatever was left without a gap.
//!   - **Removal**: on SIGTERM and SIGINT the table is deleted; after an upgrade the old process leaves it
//!     to the new one; after SIGKILL the next start replaces it, and `staybound cleanup` deletes it. Only
//!     the table named `staybound` is ever touched.
//! * **the connect hook** (`connect`): eBPF programs on a cgroup's `connect4`/`connect6` hooks rewrite the
//!   client's `connect()` itself, so no packet is translated (`connect_hook` writes them, `bpf` loads
//!   and attaches them through links that end with the process).
//!
//! **What was meant** ([`admit`], no I/O, either way): each accepted connection's original destination
//! (SO_ORIGINAL_DST; none after the connect hook, which made the client dial the listener) must be the
//! service's upstream (a redirected client) or the listen address itself; anything else came through a
//! rule that is not this service's and is refused, counted and logged.

mod bpf;
mod connect_hook;

pub use bpf::{Hook, cgroup2_root};

use std::net::{IpAddr, SocketAddr};

use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::config::{Config, ServiceConfig, UpstreamAddr};
use crate::sockopt::MARK;

/// The nftables table staybound owns (family `inet`): the only one it creates, replaces or deletes.
pub const TABLE: &str = "staybound";
/// Its one chain.
const CHAIN: &str = "output";
/// The nat priority of the output hook's destination NAT (`dstnat`).
const DSTNAT: i32 = -100;

/// One redirect: TCP to `upstream` goes to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub service: String,
    pub upstream: SocketAddr,
    pub to: SocketAddr,
}

/// The redirects of a config: each intercept service's upstream into its first listen address of the same
/// family with a fixed port (validation makes sure there is one).
pub fn redirects(config: &Config) -> Vec<Redirect> {
    config.services.iter().filter_map(redirect).collect()
}

fn redirect(s: &ServiceConfig) -> Option<Redirect> {
    if !s.intercept {
        return None;
    }
    let UpstreamAddr::Ip(upstream) = s.upstream else { return None };
    let to = s.listen.iter().find(|l| l.is_ipv4() == upstream.is_ipv4() && l.port() != 0)?;
    Some(Redirect { service: s.name.clone(), upstream, to: *to })
}

/// Which sockets are left alone besides those with [`MARK`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exempt {
    /// Every socket of this user (the user staybound runs as where it may not set socket marks).
    pub uid: Option<u32>,
}

fn add(obj: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(obj))
}

fn table() -> Table<'static> {
    Table { family: NfFamily::INet, name: TABLE.into(), handle: None }
}

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: name.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op: Operator::EQ })
}

fn rule(expr: Vec<Statement<'static>>, comment: String) -> NfObject<'static> {
    add(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: CHAIN.into(),
        expr: expr.into(),
        handle: None,
        index: None,
        comment: Some(comment.into()),
    }))
}

/// The whole table as one transaction: made if missing, emptied (deleted), made anew with its chain and
/// rules. Applied over a table left by another staybound it replaces that one at once. `pid` goes in the
/// rules' comments, so `nft list ruleset` says which process installed them.
pub fn ruleset(redirects: &[Redirect], exempt: Exempt, pid: u32) -> Nftables<'static> {
    let mut objects = vec![
        add(NfListObject::Table(table())),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        add(NfListObject::Table(table())),
        add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: CHAIN.into(),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Output),
            prio: Some(DSTNAT),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        })),
        rule(
            vec![eq(meta(MetaKey::Mark), Expression::Number(MARK)), Statement::Return(None)],
            format!("staybound pid {pid}: its own upstream and probe sockets"),
        ),
    ];
    if let Some(uid) = exempt.uid {
        objects.push(rule(
            vec![eq(meta(MetaKey::Skuid), Expression::Number(uid)), Statement::Return(None)],
            format!("staybound pid {pid}: every socket of uid {uid}, staybound's user"),
        ));
    }
    for r in redirects {
        let (l3, family) = match r.upstream.ip() {
            IpAddr::V4(_) => ("ip", NATFamily::IP),
            IpAddr::V6(_) => ("ip6", NATFamily::IP6),
        };
        let port = Expression::Number(u32::from(r.to.port()));
        // why: a wildcard listen address has no one address to send to; `redirect` picks this host's own
        // (loopback for a connection made here), which the wildcard listener takes.
        let nat = if r.to.ip().is_unspecified() {
            Statement::Redirect(Some(NAT { addr: None, family: None, port: Some(port), flags: None }))
        } else {
            Statement::DNAT(Some(NAT {
                addr: Some(Expression::String(r.to.ip().to_string().into())),
                family: Some(family),
                port: Some(port),
                flags: None,
            }))
        };
        objects.push(rule(
            vec![
                eq(field(l3, "daddr"), Expression::String(r.upstream.ip().to_string().into())),
                eq(field("tcp", "dport"), Expression::Number(u32::from(r.upstream.port()))),
                nat,
            ],
            format!("staybound pid {pid}: service {} {} -> {}", r.service, r.upstream, r.to),
        ));
    }
    Nftables { objects: objects.into() }
}

/// Deleting the table, whether it is there or not (made first, so the delete never fails for its absence).
pub(crate) fn removal() -> Nftables<'static> {
    Nftables {
        objects: vec![
            add(NfListObject::Table(table())),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        ]
        .into(),
    }
}

/// Installs (replaces) the table. Blocking: runs `nft -j -f -`.
///
/// # Errors
/// `nft` is missing, or refused the rules (no `CAP_NET_ADMIN`, no nat support).
pub fn install(redirects: &[Redirect], exempt: Exempt) -> Result<(), String> {
    nftables::helper::apply_ruleset(&ruleset(redirects, exempt, std::process::id())).map_err(|e| e.to_string())
}

/// Deletes the table if it is there. Blocking: runs `nft -j -f -`.
///
/// # Errors
/// `nft` is missing or refused (no `CAP_NET_ADMIN`).
pub fn remove() -> Result<(), String> {
    nftables::helper::apply_ruleset(&removal()).map_err(|e| e.to_string())
}

/// What `/status` shows of the rules: installed by this process, or why not.
#[derive(Debug, Default)]
pub struct Board {
    rules: std::sync::Mutex<Option<String>>,
}

impl Board {
    pub fn rules(&self) -> Option<String> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, rules: Option<String>) {
        *self.rules.lock().unwrap_or_else(|e| e.into_inner()) = rules;
    }
}

/// Where an accepted connection was headed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Redirected by this service's rule: it was meant for the upstream.
    Redirected,
    /// Made to the listen address itself.
    Direct,
    /// Redirected here by some other rule: not meant for this service.
    Refused,
}

/// Decides from the original destination (`None`: no NAT record, so it was not redirected) and the
/// connection's local address whether a connection accepted by an intercept service is one it serves.
pub(crate) fn admit(original: Option<SocketAddr>, upstream: SocketAddr, local: SocketAddr) -> Verdict {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    match original.map(canon) {
        None => Verdict::Direct,
        Some(o) if o == canon(upstream) => Verdict::Redirected,
        Some(o) if o == canon(local) => Verdict::Direct,
        Some(_) => Verdict::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_original_destination_decides() {
        let up = sa("198.18.0.100:6379");
        let local = sa("127.0.0.1:16379");
        assert_eq!(admit(Some(up), up, local), Verdict::Redirected);
        assert_eq!(admit(Some(sa("[::ffff:198.18.0.100]:6379")), up, local), Verdict::Redirected, "v4-mapped");
        assert_eq!(admit(None, up, local), Verdict::Direct, "no NAT record");
        assert_eq!(admit(Some(local), up, local), Verdict::Direct, "dialled the listener");
        for other in ["198.18.0.100:6380", "198.18.0.101:6379", "127.0.0.1:6379", "[2001:db8::1]:6379"] {
            assert_eq!(admit(Some(sa(other)), up, local), Verdict::Refused, "{other}");
        }
    }

    fn json(n: &Nftables<'_>) -> serde_json::Value {
        serde_json::to_value(n).unwrap()
    }

    #[test]
    fn the_ruleset_replaces_the_table_exempts_staybound_and_redirects_each_service() {
        let rs = [
            Redirect { service: "a".into(), upstream: sa("198.18.0.100:6379"), to: sa("127.0.0.1:16379") },
            Redirect { service: "b".into(), upstream: sa("[2001:db8::1]:5432"), to: sa("[::]:15432") },
        ];
        let v = json(&ruleset(&rs, Exempt::default(), 42));
        let objs = v["nftables"].as_array().unwrap();
        // add, delete, add: one transaction that works whether or not the table is there.
        assert_eq!(objs[0]["add"]["table"], serde_json::json!({"family": "inet", "name": "staybound"}));
        assert_eq!(objs[1]["delete"]["table"]["name"], "staybound");
        assert_eq!(objs[2]["add"]["table"]["name"], "staybound");
        let chain = &objs[3]["add"]["chain"];
        assert_eq!(
            (chain["type"].as_str(), chain["hook"].as_str(), chain["prio"].as_i64()),
            (Some("nat"), Some("output"), Some(-100))
        );
        let rules: Vec<&serde_json::Value> = objs.iter().filter_map(|o| o.get("add")?.get("rule")).collect();
        assert_eq!(rules.len(), 3, "the exemption and one per service");
        for r in &rules {
            assert_eq!(
                (r["family"].as_str(), r["table"].as_str(), r["chain"].as_str()),
                (Some("inet"), Some(TABLE), Some(CHAIN))
            );
            assert!(r["comment"].as_str().unwrap().starts_with("staybound pid 42"), "{r}");
        }
        assert_eq!(rules[0]["expr"][0]["match"]["left"]["meta"]["key"], "mark");
        assert_eq!(rules[0]["expr"][0]["match"]["right"], MARK);
        assert!(rules[0]["expr"][1].get("return").is_some(), "{}", rules[0]);
        let a = &rules[1]["expr"];
        assert_eq!(a[0]["match"]["left"]["payload"], serde_json::json!({"protocol": "ip", "field": "daddr"}));
        assert_eq!(a[0]["match"]["right"], "198.18.0.100");
        assert_eq!(a[1]["match"]["right"], 6379);
        assert_eq!(a[2]["dnat"], serde_json::json!({"addr": "127.0.0.1", "family": "ip", "port": 16379}));
        let b = &rules[2]["expr"];
        assert_eq!(b[0]["match"]["left"]["payload"]["protocol"], "ip6");
        assert_eq!(b[2]["redirect"], serde_json::json!({"port": 15432}), "a wildcard listen address");

        let v = json(&ruleset(&rs[..1], Exempt { uid: Some(65532) }, 7));
        let rules: Vec<&serde_json::Value> =
            v["nftables"].as_array().unwrap().iter().filter_map(|o| o.get("add")?.get("rule")).collect();
        assert_eq!(rules[1]["expr"][0]["match"]["left"]["meta"]["key"], "skuid");
        assert_eq!(rules[1]["expr"][0]["match"]["right"], 65532);
        assert_eq!(rules.len(), 3);
    }

    #[test]
    fn removal_touches_only_its_own_table() {
        let v = json(&removal());
        assert_eq!(
            v,
            serde_json::json!({"nftables": [
                {"add": {"table": {"family": "inet", "name": "staybound"}}},
                {"delete": {"table": {"family": "inet", "name": "staybound"}}},
            ]})
        );
    }

    #[test]
    fn only_intercept_services_with_an_address_are_redirected() {
        let text = "[[service]]\nname = \"a\"\nlisten = [\"[::1]:1\", \"127.0.0.1:0\", \"127.0.0.2:16379\"]\nupstream = \"198.18.0.100:6379\"\nintercept = true\n\
                    [[service]]\nname = \"b\"\nlisten = \"127.0.0.1:2\"\nupstream = \"198.18.0.100:2\"\n";
        let c = Config::from_toml_str(text, std::path::Path::new("t.toml")).unwrap();
        assert_eq!(
            redirects(&c),
            vec![Redirect { service: "a".into(), upstream: sa("198.18.0.100:6379"), to: sa("127.0.0.2:16379") }]
        );
    }
}
