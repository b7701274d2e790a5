//! The postgres preset's protocol, without I/O: the startup message, the login as the server asks for it
//! (trust, cleartext, md5 or SCRAM-SHA-256; the messages and SCRAM are `postgres-protocol`'s), the query
//! of every interval, and what its row says of the node (primary or standby, and which cluster it is).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;

use crate::config::Role;

use super::Answer;

/// The user a probe logs in as when `user` is empty.
pub(crate) const DEFAULT_USER: &str = "postgres";

/// Asked every interval: whether the node is in recovery (a standby), and which cluster and address it is.
pub(crate) const QUERY: &str = "SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system()), \
                                inet_server_addr(), inet_server_port()";

/// The startup message: protocol 3.0, the user, the database (the user's name when empty), and who asks.
///
/// # Errors
/// A user or database holding a NUL (the config refuses one; this is the error if it ever gets through).
pub(crate) fn startup(user: &str, database: &str) -> std::io::Result<BytesMut> {
    let user = if user.is_empty() { DEFAULT_USER } else { user };
    let database = if database.is_empty() { user } else { database };
    let mut buf = BytesMut::new();
    let params = [("user", user), ("database", database), ("application_name", "staybound-probe")];
    frontend::startup_message(params, &mut buf)?;
    Ok(buf)
}

/// The query of every interval, as a simple-query message.
pub(crate) fn query() -> BytesMut {
    let mut buf = BytesMut::new();
    frontend::query(QUERY, &mut buf).expect("the query holds no NUL");
    buf
}

/// What the login does after a message from the server.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send this and read on.
    Send(BytesMut),
    /// Read on.
    Wait,
    /// The server is ready for a query: logged in.
    Ready,
}

/// The login, one server message at a time.
pub(crate) struct Login<'a> {
    user: &'a str,
    password: Option<&'a str>,
    scram: Option<ScramSha256>,
}

impl<'a> Login<'a> {
    pub(crate) fn new(user: &'a str, password: Option<&'a str>) -> Login<'a> {
        Login { user: if user.is_empty() { DEFAULT_USER } else { user }, password, scram: None }
    }

    fn password(&self, method: &str) -> Result<&'a str, String> {
        self.password.ok_or_else(|| format!("the server asks for a password ({method}): set probe.password_file"))
    }

    /// What to do after `msg`; `Err` says why the login failed (in the server's words, never the password).
    pub(crate) fn step(&mut self, msg: Message) -> Result<Step, String> {
        let mut out = BytesMut::new();
        let io = |e: std::io::Error| e.to_string();
        match msg {
            Message::AuthenticationOk
            | Message::ParameterStatus(_)
            | Message::BackendKeyData(_)
            | Message::NoticeResponse(_) => return Ok(Step::Wait),
            Message::ReadyForQuery(_) => return Ok(Step::Ready),
            Message::ErrorResponse(body) => return Err(error_text(body.fields())),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(self.password("cleartext")?.as_bytes(), &mut out).map_err(io)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(self.user.as_bytes(), self.password("md5")?.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(io)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut scram = false;
                while let Some(m) = mechanisms.next().map_err(io)? {
                    scram |= m == SCRAM_SHA_256;
                }
                if !scram {
                    return Err("the server offers no SASL mechanism the probe speaks (SCRAM-SHA-256)".into());
                }
                // why: channel binding would tie the login to the TLS session; the probe does not ask for it,
                // and says so ("n"), which a server offering SCRAM-SHA-256-PLUS accepts.
                let s = ScramSha256::new(self.password("SCRAM-SHA-256")?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out).map_err(io)?;
                self.scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = self.scram.as_mut().ok_or("SCRAM continued before it began")?;
                s.update(body.data()).map_err(|e| format!("SCRAM: {e}"))?;
                frontend::sasl_response(s.message(), &mut out).map_err(io)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = self.scram.as_mut().ok_or("SCRAM ended before it began")?;
                // why: this checks the server's signature: a server that does not know the password is refused.
                s.finish(body.data()).map_err(|e| format!("SCRAM: the server's proof is wrong ({e})"))?;
                return Ok(Step::Wait);
            }
            Message::AuthenticationGss | Message::AuthenticationSspi | Message::AuthenticationGssContinue(_) => {
                return Err("the server asks for GSSAPI/SSPI, which the probe does not speak".into());
            }
            Message::AuthenticationKerberosV5 | Message::AuthenticationScmCredential => {
                return Err("the server asks for an authentication the probe does not speak".into());
            }
            _ => return Err("the server sent a message out of place during the login".into()),
        }
        Ok(Step::Send(out))
    }
}

/// An error response as a line: severity, SQLSTATE and message (`FATAL 57P03: the database system is
/// starting up`).
pub(crate) fn error_text(mut fields: ErrorFields<'_>) -> String {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    format!("{severity} {code}: {message}")
}

/// What the row of [`QUERY`] says of the node: `in_recovery` (`t`/`f`), the cluster's system identifier
/// and the server's address and port, as text (`None` for SQL NULL).
pub(crate) fn verdict(role: Role, row: &[Option<String>]) -> Answer {
    let field = |i: usize| row.get(i).and_then(|v| v.as_deref());
    let standby = match field(0) {
        Some("f") => false,
        Some("t") => true,
        other => return Answer::NotReady(format!("pg_is_in_recovery() said {other:?}")),
    };
    let node_role = if standby { "standby" } else { "primary" };
    if standby && role == Role::Primary {
        return Answer::WrongRole { role: node_role.into() };
    }
    // why: a standby made from a base backup shares its primary's system identifier; the address tells
    // apart the servers of one cluster reached through different addresses.
    let identity = match (field(1), field(2), field(3)) {
        (Some(sysid), Some(addr), Some(port)) => Some(format!("{sysid}@{addr}:{port}")),
        (Some(sysid), _, _) => Some(sysid.to_string()),
        _ => None,
    };
    Answer::Ready { identity, role: Some(node_role.into()) }
}

/// The text values of a data row.
pub(crate) fn row_values(
    body: &postgres_protocol::message::backend::DataRowBody,
) -> Result<Vec<Option<String>>, String> {
    let buf = body.buffer();
    let mut ranges = body.ranges();
    let mut values = Vec::new();
    while let Some(range) = ranges.next().map_err(|e| e.to_string())? {
        values.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend message from its tag and body.
    fn msg(tag: u8, body: &[u8]) -> Message {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[tag]);
        buf.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        buf.extend_from_slice(body);
        Message::parse(&mut buf).unwrap().unwrap()
    }

    fn auth(code: i32, rest: &[u8]) -> Message {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(rest);
        msg(b'R', &body)
    }

    fn sent(step: Result<Step, String>) -> Vec<u8> {
        match step {
            Ok(Step::Send(b)) => b.to_vec(),
            other => panic!("expected a message to send, got {other:?}"),
        }
    }

    #[test]
    fn startup_names_user_database_and_the_probe() {
        let s = startup("", "").unwrap();
        let text = String::from_utf8_lossy(&s[8..]).into_owned();
        assert_eq!(text, "user\0postgres\0database\0postgres\0application_name\0staybound-probe\0\0");
        assert_eq!(&s[4..8], &[0, 3, 0, 0], "protocol 3.0");
        let s = startup("probe", "").unwrap();
        assert!(s.windows(15).any(|w| w == b"database\0probe\0"), "the database defaults to the user's name");
        let s = startup("probe", "app").unwrap();
        assert!(s.windows(13).any(|w| w == b"database\0app\0"));
        assert_eq!(query()[0], b'Q');
    }

    #[test]
    fn every_login_the_server_may_ask_for() {
        // trust: AuthenticationOk, parameters, key data, then ready.
        let mut l = Login::new("", None);
        assert!(matches!(l.step(auth(0, b"")), Ok(Step::Wait)));
        assert!(matches!(l.step(msg(b'S', b"server_version\x0015.8\0")), Ok(Step::Wait)));
        assert!(matches!(l.step(msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2])), Ok(Step::Wait)));
        assert!(matches!(l.step(msg(b'Z', b"I")), Ok(Step::Ready)));
        // cleartext and md5 send the password message (md5: "md5" + md5(md5(password + user) + salt)).
        let mut l = Login::new("probe", Some("pw"));
        let clear = sent(l.step(auth(3, b"")));
        assert_eq!(clear, b"p\0\0\0\x07pw\0");
        let md5 = sent(l.step(auth(5, &[1, 2, 3, 4])));
        assert_eq!(md5[0], b'p');
        assert_eq!(&md5[5..8], b"md5");
        assert_eq!(&md5[5..md5.len() - 1], md5_hash(b"probe", b"pw", [1, 2, 3, 4]).as_bytes());
        // SASL: SCRAM-SHA-256 is chosen among the mechanisms; a server proof that is not one fails the login.
        let mut l = Login::new("probe", Some("pw"));
        let first = sent(l.step(auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")));
        assert_eq!(first[0], b'p');
        assert!(first.windows(13).any(|w| w == b"SCRAM-SHA-256"));
        assert!(first.windows(5).any(|w| w == b"n,,n="), "no channel binding, said so");
        assert!(l.step(auth(11, b"r=not-the-client-nonce,s=c2FsdA==,i=4096")).is_err(), "a nonce not ours");
        let mut l = Login::new("probe", Some("pw"));
        assert!(l.step(auth(10, b"OTHER\0\0")).unwrap_err().contains("SCRAM-SHA-256"));
        assert!(Login::new("p", None).step(auth(12, b"v=x")).is_err(), "a final before a beginning");
        assert!(Login::new("p", None).step(auth(11, b"r=x")).is_err(), "a continue before a beginning");
        // A password asked for and none set: said how to fix it.
        for code in [3, 5, 10] {
            let rest: &[u8] = match code {
                5 => &[1, 2, 3, 4],
                10 => b"SCRAM-SHA-256\0\0",
                _ => b"",
            };
            assert!(Login::new("p", None).step(auth(code, rest)).unwrap_err().contains("password_file"));
        }
        // GSS, SSPI, Kerberos: refused; an error response: its words.
        for code in [2, 7, 9] {
            assert!(Login::new("p", Some("pw")).step(auth(code, b"")).is_err());
        }
        let e = Login::new("p", Some("secret-pw"))
            .step(msg(b'E', b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"p\"\0\0"))
            .unwrap_err();
        assert_eq!(e, "FATAL 28P01: password authentication failed for user \"p\"");
        assert!(Login::new("p", None).step(msg(b'D', &[0, 0])).is_err(), "a data row is out of place");
    }

    #[test]
    fn every_row_maps_to_an_answer() {
        let row = |r: Option<&str>| {
            vec![r.map(String::from), Some("7301".into()), Some("198.18.0.100".into()), Some("5432".into())]
        };
        let id = Some("7301@198.18.0.100:5432".to_string());
        assert_eq!(
            verdict(Role::Primary, &row(Some("f"))),
            Answer::Ready { identity: id.clone(), role: Some("primary".into()) }
        );
        assert_eq!(
            verdict(Role::Any, &row(Some("f"))),
            Answer::Ready { identity: id.clone(), role: Some("primary".into()) }
        );
        assert_eq!(verdict(Role::Primary, &row(Some("t"))), Answer::WrongRole { role: "standby".into() });
        assert_eq!(verdict(Role::Any, &row(Some("t"))), Answer::Ready { identity: id, role: Some("standby".into()) });
        for bad in [None, Some("x"), Some("")] {
            for r in [Role::Any, Role::Primary] {
                assert!(matches!(verdict(r, &row(bad)), Answer::NotReady(_)), "{bad:?}");
            }
        }
        assert!(matches!(verdict(Role::Any, &[]), Answer::NotReady(_)));
        // No address (a Unix socket): the system identifier alone; none at all: no name.
        let unix = [Some("f".to_string()), Some("7301".into()), None, None];
        assert_eq!(
            verdict(Role::Any, &unix),
            Answer::Ready { identity: Some("7301".into()), role: Some("primary".into()) }
        );
        assert_eq!(
            verdict(Role::Any, &[Some("f".into())]),
            Answer::Ready { identity: None, role: Some("primary".into()) }
        );
    }

    #[test]
    fn a_data_row_reads_as_text_values() {
        let Message::DataRow(body) = msg(b'D', b"\0\x02\0\0\0\x01f\xff\xff\xff\xff") else { panic!() };
        assert_eq!(row_values(&body), Ok(vec![Some("f".to_string()), None]));
    }
}
