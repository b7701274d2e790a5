//! PostgreSQL servers in the lab: clusters made with `initdb` in a temp directory owned by the `postgres`
//! user, each server started in a node's namespace as that user (`setpriv`, which execs, so the pid the lab
//! tracks is the postmaster's), stopped with a fast shutdown when the guard drops. Needs Debian's
//! `postgresql` package (the binaries under /usr/lib/postgresql/VERSION/bin). A test process killed
//! before its guard drops leaves its postmasters running: the parent-death signal the lab sets does not
//! survive the change of user (`pgrep -u postgres -a postgres` finds them, each with its temp directory).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::lab::{Host, Lab};
use super::wait::wait_until;

/// The port every lab postgres listens on.
pub const PG_PORT: u16 = 5432;
/// The superuser's password (SCRAM-SHA-256), also the probe's.
pub const PG_PASSWORD: &str = "lab-pg-pass-51c2";
/// SIGINT: a postgres fast shutdown (SIGTERM would wait for every session to end).
const SIGINT: i32 = libc::SIGINT;

/// The newest installed server's binary `name`.
pub fn bin(name: &str) -> String {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| p.file_name().and_then(|f| f.to_str()).and_then(|v| v.parse::<u32>().ok()));
    let path = versions.last().map(|v| v.join("bin").join(name));
    match path {
        Some(p) if p.exists() => p.to_str().unwrap().to_string(),
        _ => panic!("{name} not found under /usr/lib/postgresql/*/bin: apt-get install postgresql"),
    }
}

/// `argv` run as the postgres user (setpriv execs it: same pid).
fn as_postgres<'a>(argv: &[&'a str]) -> Vec<&'a str> {
    let mut out = vec!["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"];
    out.extend_from_slice(argv);
    out
}

/// The lab's postgres servers; each is stopped (fast shutdown) when this drops. Declare it after the lab
/// so it drops first.
pub struct Pg<'a> {
    pub lab: &'a Lab,
    /// The temp directory holding every cluster (traversable by the postgres user).
    pub root: PathBuf,
    running: std::sync::Mutex<Vec<(Host, u32)>>,
}

impl<'a> Pg<'a> {
    /// A place for clusters under `root` (a temp directory the caller owns and removes).
    pub fn new(lab: &'a Lab, root: &Path) -> Pg<'a> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pw = root.join("superuser.pw");
        std::fs::write(&pw, format!("{PG_PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        Pg { lab, root: root.to_path_buf(), running: std::sync::Mutex::new(Vec::new()) }
    }

    /// An empty directory `name` owned by the postgres user, mode 0700.
    pub fn dir(&self, name: &str) -> String {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.to_str().unwrap().to_string();
        let out = std::process::Command::new("chown").args(["postgres:postgres", &d]).output().unwrap();
        assert!(out.status.success(), "chown {d}: {}", String::from_utf8_lossy(&out.stderr));
        self.lab.exec(Host::Client, &["chmod", "0700", &d]);
        d
    }

    /// A new cluster `name`: superuser `postgres` with [`PG_PASSWORD`] (SCRAM-SHA-256), reachable over TCP
    /// from the lab's addresses with `hba` lines before the default SCRAM one (and replication).
    pub fn initdb(&self, name: &str, hba: &[&str]) -> String {
        let data = self.dir(name);
        let pwfile = format!("--pwfile={}", self.root.join("superuser.pw").display());
        let initdb = bin("initdb");
        let argv = as_postgres(&[
            &initdb,
            "-D",
            &data,
            "-U",
            "postgres",
            &pwfile,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        ]);
        self.lab.exec(Host::Client, &argv);
        let conf = format!(
            "listen_addresses = '*'\nport = {PG_PORT}\nunix_socket_directories = '{data}'\nfsync = off\n\
             shared_buffers = 16MB\nmax_connections = 40\nwal_level = replica\nmax_wal_senders = 4\n"
        );
        append(&format!("{data}/postgresql.conf"), &conf);
        let mut lines: Vec<String> = hba.iter().map(|l| (*l).to_string()).collect();
        lines.push("host all all 198.18.0.0/15 scram-sha-256".into());
        lines.push("host replication all 198.18.0.0/15 scram-sha-256".into());
        // why: pg_hba.conf is read top down: the test's lines must come before initdb's own.
        let path = format!("{data}/pg_hba.conf");
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{}\n{old}", lines.join("\n"))).unwrap();
        data
    }

    /// Turns TLS on for the cluster in `data` with the certificate and key in PEM (copied into it, owned
    /// by the postgres user; the key 0600 as postgres requires).
    pub fn ssl(&self, data: &str, cert_pem: &Path, key_pem: &Path) {
        for (from, to) in [(cert_pem, "server.crt"), (key_pem, "server.key")] {
            let dest = format!("{data}/{to}");
            std::fs::copy(from, &dest).unwrap();
            self.lab.exec(Host::Client, &["chown", "postgres:postgres", &dest]);
            self.lab.exec(Host::Client, &["chmod", "0600", &dest]);
        }
        append(
            &format!("{data}/postgresql.conf"),
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        );
    }

    /// A standby of the server at `primary` made with `pg_basebackup -R` (streaming replication,
    /// `standby.signal`).
    pub fn basebackup(&self, host: Host, name: &str, primary: std::net::Ipv4Addr) -> String {
        let data = self.dir(name);
        let (pgpass, bb, ip) = (format!("PGPASSWORD={PG_PASSWORD}"), bin("pg_basebackup"), primary.to_string());
        let argv = as_postgres(&["env", &pgpass, &bb, "-h", &ip, "-U", "postgres", "-D", &data, "-R", "-X", "stream"]);
        self.lab.exec(host, &argv);
        assert!(Path::new(&data).join("standby.signal").exists(), "pg_basebackup -R wrote standby.signal");
        // why: the copy names the primary's socket directory (its data directory), and holds the primary's
        // socket lock file from there; the last setting in the file wins.
        append(&format!("{data}/postgresql.conf"), &format!("unix_socket_directories = '{data}'\n"));
        let _ = std::fs::remove_file(Path::new(&data).join(format!(".s.PGSQL.{PG_PORT}.lock")));
        data
    }

    /// Starts the server of `data` on `host` and waits (bounded) until it accepts connections.
    pub fn start(&self, host: Host, data: &str) -> u32 {
        let postgres = bin("postgres");
        let pid = self.lab.spawn(host, &as_postgres(&[&postgres, "-D", data]));
        self.running.lock().unwrap().push((host, pid));
        let (ready, ip, port) = (bin("pg_isready"), host.addr().to_string(), PG_PORT.to_string());
        wait_until(&format!("postgres on {} accepts connections", host.role()), Duration::from_secs(30), || {
            assert!(self.lab.is_running(pid), "postgres on {} exited: see {}", host.role(), self.lab.dir().display());
            self.lab.try_exec(host, &[&ready, "-q", "-h", &ip, "-p", &port]).status.success()
        });
        pid
    }

    /// `pg_ctl promote` of the standby in `data`, waiting until it is promoted.
    pub fn promote(&self, host: Host, data: &str) {
        let pg_ctl = bin("pg_ctl");
        let out = self.lab.exec(host, &as_postgres(&[&pg_ctl, "promote", "-w", "-D", data]));
        assert!(out.status.success(), "pg_ctl promote: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `psql` from `from` to `ip`:`port` as the superuser; its output (stdout and stderr) and success.
    pub fn psql(&self, from: Host, ip: &str, port: u16, sql: &str, timeout: Duration) -> (bool, String) {
        let (pgpass, psql) = (format!("PGPASSWORD={PG_PASSWORD}"), bin("psql"));
        let conn = format!("host={ip} port={port} user=postgres dbname=postgres connect_timeout=30");
        let argv = ["env", &pgpass, &psql, &conn, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql];
        let out = self.lab.try_exec_timeout(from, &argv, timeout);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text.trim().to_string())
    }
}

impl Drop for Pg<'_> {
    fn drop(&mut self) {
        for (_, pid) in self.running.lock().unwrap().drain(..) {
            if self.lab.is_running(pid) {
                self.lab.signal(pid, SIGINT);
                let _ = super::wait::poll(Duration::from_secs(10), || !self.lab.is_running(pid));
            }
        }
    }
}

fn append(path: &str, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A CA and a server certificate it signed for `ips` (subject alternative names), made with `openssl` in
/// `dir`: returns (CA certificate, server certificate, server key), PEM files.
pub fn make_certs(dir: &Path, name: &str, ips: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (ca_key, ca, key, csr, crt, ext) =
        (p("ca.key"), p("ca.crt"), p("server.key"), p("server.csr"), p("server.crt"), p("ext.cnf"));
    let san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
    std::fs::write(&ext, format!("subjectAltName = {}\n", san.join(","))).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let subj_ca = format!("/CN={name} lab CA");
    let mut a = vec!["req", "-x509", "-days", "2", "-subj", &subj_ca];
    let (ca_key_s, ca_s) = (s(&ca_key), s(&ca));
    a.extend(ec);
    a.extend(["-keyout", &ca_key_s, "-out", &ca_s]);
    run(&a);
    let (key_s, csr_s, crt_s, ext_s) = (s(&key), s(&csr), s(&crt), s(&ext));
    let mut a = vec!["req", "-new", "-subj", "/CN=staybound lab server"];
    a.extend(ec);
    a.extend(["-keyout", &key_s, "-out", &csr_s]);
    run(&a);
    run(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &csr_s,
        "-CA",
        &ca_s,
        "-CAkey",
        &ca_key_s,
        "-CAcreateserial",
        "-out",
        &crt_s,
        "-extfile",
        &ext_s,
    ]);
    (ca, crt, key)
}
