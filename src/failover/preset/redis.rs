//! The redis preset's protocol, without I/O: the commands it sends (RESP arrays), a RESP2 reply parser,
//! and what the replies say of the node (logged in or not; ready, in which role; its `run_id`).

use crate::config::Role;

use super::Answer;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    /// `None`: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array.
    Array(Option<Vec<Value>>),
}

/// Deepest nesting of arrays taken: ROLE's reply is two deep; a deeper one is no reply the probe asked for.
const MAX_DEPTH: usize = 4;

/// The first reply in `buf` and how many bytes it took; `Ok(None)` while it is incomplete.
///
/// # Errors
/// The bytes are not RESP2 (another service answers on the port), or nest deeper than [`MAX_DEPTH`].
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, String> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], depth: usize) -> Result<Option<(Value, usize)>, String> {
    let Some(&kind) = buf.first() else { return Ok(None) };
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > 512 { Err("a RESP line longer than 512 bytes".into()) } else { Ok(None) };
    };
    let line = &buf[1..end];
    let text = || String::from_utf8_lossy(line).into_owned();
    let after = end + 2;
    let number = || -> Result<i64, String> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("{:?} is not a number", text()))
    };
    match kind {
        b'+' => Ok(Some((Value::Simple(text()), after))),
        b'-' => Ok(Some((Value::Error(text()), after))),
        b':' => Ok(Some((Value::Integer(number()?), after))),
        b'$' => match number()? {
            -1 => Ok(Some((Value::Bulk(None), after))),
            n if n < 0 => Err(format!("bulk length {n}")),
            n => {
                let n = usize::try_from(n).map_err(|_| format!("bulk length {n}"))?;
                let Some(total) = after.checked_add(n).and_then(|t| t.checked_add(2)) else {
                    return Err(format!("bulk length {n}"));
                };
                if buf.len() < total {
                    return Ok(None);
                }
                if &buf[after + n..total] != b"\r\n" {
                    return Err("a bulk string without its line end".into());
                }
                Ok(Some((Value::Bulk(Some(buf[after..after + n].to_vec())), total)))
            }
        },
        b'*' => match number()? {
            -1 => Ok(Some((Value::Array(None), after))),
            n if n < 0 => Err(format!("array length {n}")),
            _ if depth >= MAX_DEPTH => Err(format!("arrays nested deeper than {MAX_DEPTH}")),
            n => {
                let mut items = Vec::new();
                let mut at = after;
                for _ in 0..n {
                    match parse_at(&buf[at..], depth + 1)? {
                        Some((v, used)) => {
                            items.push(v);
                            at += used;
                        }
                        None => return Ok(None),
                    }
                }
                Ok(Some((Value::Array(Some(items)), at)))
            }
        },
        other => Err(format!("a reply starting with {:?}", char::from(other))),
    }
}

/// A command as a RESP array of bulk strings.
pub(crate) fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `AUTH [user] password`: with a user, an ACL login; without, the `requirepass` one.
pub(crate) fn auth(user: &str, password: &str) -> Vec<u8> {
    if user.is_empty() {
        command(&[b"AUTH", password.as_bytes()])
    } else {
        command(&[b"AUTH", user.as_bytes(), password.as_bytes()])
    }
}

/// The exchange of every interval, and how many replies it draws: `PING`, `ROLE` when a role is required,
/// and `INFO server` for the node's `run_id`.
pub(crate) fn request(role: Role) -> (Vec<u8>, usize) {
    let mut out = command(&[b"PING"]);
    if role == Role::Primary {
        out.extend(command(&[b"ROLE"]));
    }
    out.extend(command(&[b"INFO", b"server"]));
    (out, if role == Role::Primary { 3 } else { 2 })
}

/// Whether the login worked: `Err` says why not, in the server's words (which never hold the password).
pub(crate) fn login(reply: &Value) -> Result<(), String> {
    match reply {
        Value::Simple(s) if s == "OK" => Ok(()),
        Value::Error(e) => Err(format!("AUTH was refused: {e}")),
        other => Err(format!("AUTH got {other:?}")),
    }
}

/// What the replies to [`request`] say of the node.
pub(crate) fn verdict(role: Role, replies: &[Value]) -> Answer {
    match replies.first() {
        Some(Value::Simple(s)) if s == "PONG" => {}
        Some(Value::Error(e)) if e.starts_with("NOAUTH") => {
            return Answer::NotReady(format!(
                "PING was answered {e:?}: the server needs a login (set probe.password_file)"
            ));
        }
        Some(Value::Error(e)) => return Answer::NotReady(format!("PING was answered {e:?}")),
        other => return Answer::NotReady(format!("PING was answered {other:?}, not PONG")),
    }
    let (role_seen, info) = match role {
        Role::Any => (None, replies.get(1)),
        Role::Primary => match replies.get(1) {
            Some(Value::Array(Some(items))) => match items.first() {
                Some(Value::Bulk(Some(r))) if r == b"master" => (Some("primary"), replies.get(2)),
                Some(Value::Bulk(Some(r))) if r == b"slave" => return Answer::WrongRole { role: "replica".into() },
                Some(Value::Bulk(Some(r))) => {
                    return Answer::WrongRole { role: String::from_utf8_lossy(r).into_owned() };
                }
                other => return Answer::NotReady(format!("ROLE was answered with {other:?} first")),
            },
            Some(Value::Error(e)) => return Answer::NotReady(format!("ROLE was answered {e:?}")),
            other => return Answer::NotReady(format!("ROLE was answered {other:?}")),
        },
    };
    let identity = match info {
        Some(Value::Bulk(Some(text))) => run_id(text),
        // why: a user without INFO still probes; the node then has no name, and a move shows otherwise.
        _ => None,
    };
    Answer::Ready { identity, role: role_seen.map(String::from) }
}

/// The `run_id` line of an `INFO server` reply: a new one is another redis process.
pub(crate) fn run_id(info: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(info).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn parses_every_reply_kind_and_says_incomplete_at_every_cut() {
        let cases: Vec<(&[u8], Value)> = vec![
            (b"+PONG\r\n", Value::Simple("PONG".into())),
            (b"-NOAUTH Authentication required.\r\n", Value::Error("NOAUTH Authentication required.".into())),
            (b":42\r\n", Value::Integer(42)),
            (b"$5\r\nhe\r\no\r\n", bulk("he\r\no")),
            (b"$0\r\n\r\n", bulk("")),
            (b"$-1\r\n", Value::Bulk(None)),
            (b"*-1\r\n", Value::Array(None)),
            (b"*0\r\n", Value::Array(Some(vec![]))),
            (
                b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n",
                Value::Array(Some(vec![bulk("master"), Value::Integer(0), Value::Array(Some(vec![]))])),
            ),
            (
                b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:14\r\n",
                Value::Array(Some(vec![
                    bulk("slave"),
                    bulk("127.0.0.1"),
                    Value::Integer(6379),
                    bulk("connected"),
                    Value::Integer(14),
                ])),
            ),
        ];
        for (wire, want) in cases {
            let mut with_more = wire.to_vec();
            with_more.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(parse(&with_more), Ok(Some((want.clone(), wire.len()))), "{wire:?}");
            for cut in 0..wire.len() {
                assert_eq!(parse(&wire[..cut]), Ok(None), "{wire:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn refuses_what_is_not_resp() {
        for wire in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b":x\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"*-5\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(wire).is_err(), "{wire:?}");
        }
        assert!(parse(&[b'+'; 600]).is_err(), "a line without end is not waited for forever");
        assert_eq!(parse(b"$99999999999\r\n"), Ok(None), "a long bulk is incomplete, the caller caps it");
        assert!(parse(b"$18446744073709551615\r\n").is_err());
    }

    #[test]
    fn commands_are_resp_arrays() {
        assert_eq!(command(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(auth("", "p w"), b"*2\r\n$4\r\nAUTH\r\n$3\r\np w\r\n");
        assert_eq!(auth("probe", "pw"), b"*3\r\n$4\r\nAUTH\r\n$5\r\nprobe\r\n$2\r\npw\r\n");
        let (any, n) = request(Role::Any);
        assert_eq!((any.as_slice(), n), (&b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"[..], 2));
        let (primary, n) = request(Role::Primary);
        assert!(primary.windows(4).any(|w| w == b"ROLE"));
        assert_eq!(n, 3);
    }

    #[test]
    fn login_replies() {
        assert_eq!(login(&Value::Simple("OK".into())), Ok(()));
        let e = login(&Value::Error("WRONGPASS invalid username-password pair or user is disabled.".into()));
        assert!(e.unwrap_err().contains("WRONGPASS"));
        assert!(login(&Value::Integer(1)).is_err());
    }

    #[test]
    fn every_role_and_ping_reply_maps_to_an_answer() {
        let pong = Value::Simple("PONG".into());
        let info = bulk("# Server\r\nredis_version:7.0.15\r\nrun_id:0a1b2c\r\ntcp_port:6379\r\n");
        let role = |r: &str| Value::Array(Some(vec![bulk(r), Value::Integer(0), Value::Array(Some(vec![]))]));
        let ready =
            |role: Option<&str>| Answer::Ready { identity: Some("0a1b2c".into()), role: role.map(String::from) };
        // role = "any": PING and INFO.
        assert_eq!(verdict(Role::Any, &[pong.clone(), info.clone()]), ready(None));
        // role = "primary": PING, ROLE, INFO.
        assert_eq!(verdict(Role::Primary, &[pong.clone(), role("master"), info.clone()]), ready(Some("primary")));
        assert_eq!(
            verdict(Role::Primary, &[pong.clone(), role("slave"), info.clone()]),
            Answer::WrongRole { role: "replica".into() }
        );
        assert_eq!(
            verdict(Role::Primary, &[pong.clone(), role("sentinel"), info.clone()]),
            Answer::WrongRole { role: "sentinel".into() }
        );
        for bad_role in [Value::Error("NOPERM this user has no permissions".into()), Value::Integer(3), bulk("master")]
        {
            assert!(matches!(verdict(Role::Primary, &[pong.clone(), bad_role, info.clone()]), Answer::NotReady(_)));
        }
        assert!(matches!(
            verdict(Role::Primary, &[pong.clone(), Value::Array(Some(vec![])), info.clone()]),
            Answer::NotReady(_)
        ));
        // A PING that is not answered PONG: not ready, whatever else came.
        for ping in [
            Value::Error("LOADING Redis is loading the dataset in memory".into()),
            Value::Error("NOAUTH Authentication required.".into()),
            Value::Simple("OK".into()),
        ] {
            for r in [Role::Any, Role::Primary] {
                let Answer::NotReady(why) = verdict(r, &[ping.clone(), role("master"), info.clone()]) else {
                    panic!("{ping:?} is not ready")
                };
                assert!(!why.is_empty());
            }
        }
        assert!(verdict(Role::Any, &[Value::Error("NOAUTH x".into())]).is_not_ready_with("password_file"));
        // INFO refused (an ACL user without it): ready, without a name.
        assert_eq!(
            verdict(Role::Any, &[pong.clone(), Value::Error("NOPERM".into())]),
            Answer::Ready { identity: None, role: None }
        );
        assert!(matches!(verdict(Role::Any, &[]), Answer::NotReady(_)));
    }

    #[test]
    fn run_id_is_read_from_info() {
        assert_eq!(run_id(b"# Server\r\nrun_id:abc123\r\n").as_deref(), Some("abc123"));
        assert_eq!(run_id(b"# Server\nrun_id:abc\n").as_deref(), Some("abc"));
        assert_eq!(run_id(b"# Server\r\nredis_version:7\r\n"), None);
        assert_eq!(run_id(b"run_id:\r\n"), None);
        assert_eq!(run_id(b"run_id:a b\r\n"), None);
        assert_eq!(run_id(b"\xff\xfe"), None);
    }

    impl Answer {
        fn is_not_ready_with(&self, word: &str) -> bool {
            matches!(self, Answer::NotReady(why) if why.contains(word))
        }
    }
}
