//! Commands the lab runs to completion: in a host's namespace (`ip netns exec`) or `ip` itself, with stdin
//! closed and output captured, killed (SIGKILL) when they outlive their time bound, each one written to
//! the lab's journal. A setup step panics when it fails; a test's own command returns its output.

use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Host, Lab, SIGKILL};
use crate::support::wait::poll;

/// Default upper bound for one command run by [`Lab::exec`] / [`Lab::try_exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(20);

impl Lab {
    /// Runs `args` inside `host` (`ip netns exec NS args...`), bounded by
    /// [`EXEC_TIMEOUT`]; panics with stdout/stderr unless it exits 0.
    /// Use for setup steps.
    pub fn exec(&self, host: Host, args: &[&str]) -> Output {
        self.checked(self.ns_cmd(host, args), EXEC_TIMEOUT)
    }

    /// Like [`Lab::exec`] but returns the output whatever the exit status.
    /// On timeout the command is SIGKILLed, its status shows signal 9 and
    /// stderr ends with a `[lab] timed out` line.
    pub fn try_exec(&self, host: Host, args: &[&str]) -> Output {
        self.try_exec_timeout(host, args, EXEC_TIMEOUT)
    }

    /// [`Lab::try_exec`] with an explicit time bound.
    pub fn try_exec_timeout(&self, host: Host, args: &[&str], timeout: Duration) -> Output {
        self.run_logged(self.ns_cmd(host, args), timeout)
    }

    fn ns_cmd(&self, host: Host, args: &[&str]) -> Command {
        assert!(!args.is_empty(), "empty command");
        let mut c = cmd("ip", &["netns", "exec", self.ns_name(host)]);
        c.args(args);
        c
    }

    /// Runs `ip` (use `-n NS` to target a namespace) with `line` split on
    /// whitespace (no argument the lab passes contains spaces).
    pub(super) fn ip(&self, line: &str) -> Output {
        let args: Vec<&str> = line.split_whitespace().collect();
        self.checked(cmd("ip", &args), EXEC_TIMEOUT)
    }

    pub(super) fn checked(&self, c: Command, timeout: Duration) -> Output {
        let shown = show(&c);
        let out = self.run_logged(c, timeout);
        if !out.status.success() {
            panic!(
                "lab {}: `{shown}` failed ({})\nstdout: {}\nstderr: {}",
                self.prefix,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        out
    }

    pub(super) fn run_logged(&self, c: Command, timeout: Duration) -> Output {
        let shown = show(&c);
        let t = Instant::now();
        let out = run(c, timeout);
        self.note(&format!("{shown} -> {} in {:?}", out.status, t.elapsed()));
        out
    }
}

pub(super) fn cmd(prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

fn show(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(' ') {
            let _ = write!(s, " '{a}'");
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// Runs `c` to completion with stdin closed, capturing output, killing it
/// (SIGKILL) if it outlives `timeout`.
pub(super) fn run(mut c: Command, timeout: Duration) -> Output {
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let shown = show(&c);
    let mut child = match c.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Output {
                status: ExitStatus::from_raw(127 << 8),
                stdout: Vec::new(),
                stderr: format!("[lab] cannot run `{shown}`: {e}").into_bytes(),
            };
        }
    };
    // Readers report EOF on a channel: the pipes close when the command
    // exits, so completion is awaited as an event, not polled.
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let pipes: [(bool, Box<dyn Read + Send>); 2] =
        [(true, Box::new(child.stdout.take().expect("piped"))), (false, Box::new(child.stderr.take().expect("piped")))];
    for (is_out, mut pipe) in pipes {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut b = Vec::new();
            let _ = pipe.read_to_end(&mut b);
            let _ = tx.send((is_out, b));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut eofs = 0;
    while eofs < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => stdout = b,
            Ok((false, b)) => stderr = b,
            Err(_) => break,
        }
        eofs += 1;
    }
    // Pipes are closed, so the process is exiting (or it closed them
    // itself): wait for it within what is left of the deadline.
    let mut status = None;
    let finished = poll(deadline.saturating_duration_since(Instant::now()), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !finished {
        let _ = child.kill();
        status = child.wait().ok();
        // Collect what the readers got, now that the pipes are closing.
        while let Ok((is_out, b)) = rx.recv_timeout(Duration::from_secs(1)) {
            if is_out { stdout = b } else { stderr = b }
        }
        stderr.extend_from_slice(format!("\n[lab] timed out after {timeout:?}: `{shown}`\n").as_bytes());
    }
    Output { status: status.unwrap_or_else(|| ExitStatus::from_raw(SIGKILL)), stdout, stderr }
}

pub(super) fn find_in_path(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Path::new(prog).is_file().then(|| PathBuf::from(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).map(|d| d.join(prog)).find(|p| p.is_file())
}

pub(super) fn require_tool(prog: &str, package: &str) {
    if find_in_path(prog).is_none() {
        panic!("`{prog}` not found: install Debian package `{package}`");
    }
}
