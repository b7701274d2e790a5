//! Processes the lab starts in the background in a host: forked from one long-lived spawner thread per lab
//! with `PR_SET_PDEATHSIG=SIGKILL`, so they die with the test process even when `Drop` never runs; tracked
//! by pid and signalled only while not reaped (never a recycled pid); stopped with SIGTERM, then SIGKILL.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use super::{EXEC_TIMEOUT, Host, Lab, lock};
use crate::support::wait::{poll, wait_until};

/// Signal numbers for [`Lab::signal`].
pub const SIGTERM: i32 = libc::SIGTERM;
/// See [`SIGTERM`].
pub const SIGKILL: i32 = libc::SIGKILL;
/// Freezes a process (a hung server: the kernel still completes TCP
/// handshakes into its backlog, but nothing is answered). See [`SIGTERM`].
pub const SIGSTOP: i32 = libc::SIGSTOP;
/// Resumes a process stopped with [`SIGSTOP`].
pub const SIGCONT: i32 = libc::SIGCONT;
pub(super) const KILL_GRACE: Duration = Duration::from_secs(5);

pub(super) struct Tracked {
    pub(super) pid: u32,
    pub(super) name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Tracked {
    /// Reaps the child if it has exited; never signals a reaped pid.
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }
}

/// A spawn request for the lab's spawner thread.
pub(super) struct SpawnReq {
    argv: Vec<String>,
    stdout: File,
    stderr: File,
    reply: mpsc::Sender<io::Result<Child>>,
}

impl Lab {
    /// Starts `args` inside `host` in the background and returns its pid
    /// (the pid of the program itself: `ip netns exec` execs it). stdout and
    /// stderr go to `NN-ROLE-PROGRAM.stdout|.stderr` in [`Lab::dir`]. The
    /// child is tracked and killed on drop. To set environment variables,
    /// start with `env`, e.g. `&["env", "RUST_LOG=debug", bin, ...]`.
    pub fn spawn(&self, host: Host, args: &[&str]) -> u32 {
        assert!(!args.is_empty(), "spawn: empty command");
        // Label logs by the program, skipping an `env K=V ...` prefix.
        let prog = args
            .iter()
            .find(|a| **a != "env" && !a.contains('='))
            .and_then(|a| Path::new(a).file_name())
            .and_then(|f| f.to_str())
            .unwrap_or("prog");
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{n:02}-{}-{prog}", host.role());
        let out_path = self.dir.join(format!("{name}.stdout"));
        let err_path = self.dir.join(format!("{name}.stderr"));
        let stdout = File::create(&out_path).unwrap_or_else(|e| panic!("{}: {e}", out_path.display()));
        let stderr = File::create(&err_path).unwrap_or_else(|e| panic!("{}: {e}", err_path.display()));
        let mut argv: Vec<String> =
            ["ip", "netns", "exec", self.ns_name(host)].iter().map(|s| (*s).to_owned()).collect();
        argv.extend(args.iter().map(|s| (*s).to_owned()));
        let (reply, rx) = mpsc::channel();
        let req = SpawnReq { argv: argv.clone(), stdout, stderr, reply };
        lock(&self.spawner).as_ref().expect("lab is shutting down").send(req).expect("lab spawner thread is gone");
        let child = rx
            .recv_timeout(EXEC_TIMEOUT)
            .expect("lab spawner thread did not answer")
            .unwrap_or_else(|e| panic!("spawn `{}`: {e}", argv.join(" ")));
        let pid = child.id();
        self.note(&format!("spawned pid {pid} [{name}]: {}", argv.join(" ")));
        lock(&self.children).push(Tracked { pid, name, child, status: None });
        pid
    }

    /// Whether tracked child `pid` is still running (reaps it if it exited).
    pub fn is_running(&self, pid: u32) -> bool {
        let mut children = lock(&self.children);
        let t = find(&mut children, pid);
        t.poll_exit().is_none()
    }

    /// Exit status of tracked child `pid` if it has exited.
    pub fn exit_status(&self, pid: u32) -> Option<ExitStatus> {
        let mut children = lock(&self.children);
        find(&mut children, pid).poll_exit()
    }

    /// Waits (bounded) for tracked child `pid` to exit on its own.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> ExitStatus {
        wait_until(&format!("pid {pid} exits"), timeout, || !self.is_running(pid));
        self.exit_status(pid).expect("exited")
    }

    /// Stops tracked child `pid`: SIGTERM, then SIGKILL if it has not
    /// exited within 5 s. Returns its exit status (already-exited children
    /// just report theirs). Panics if `pid` was not started by this lab.
    pub fn kill(&self, pid: u32) -> ExitStatus {
        self.signal(pid, SIGTERM);
        self.signal(pid, SIGCONT);
        if !poll(KILL_GRACE, || !self.is_running(pid)) {
            self.note(&format!("pid {pid} ignored SIGTERM for {KILL_GRACE:?}; SIGKILL"));
            self.signal(pid, SIGKILL);
        }
        self.wait_exit(pid, KILL_GRACE)
    }

    /// SIGKILLs tracked child `pid` at once (a crash) and reaps it.
    pub fn kill_hard(&self, pid: u32) -> ExitStatus {
        self.signal(pid, SIGKILL);
        self.wait_exit(pid, KILL_GRACE)
    }

    /// Sends `sig` to tracked child `pid` if it is still running (never to a
    /// reaped pid, so never to a recycled one).
    pub fn signal(&self, pid: u32, sig: i32) {
        let mut children = lock(&self.children);
        let t = find(&mut children, pid);
        if t.poll_exit().is_none() {
            self.note(&format!("signal {sig} -> pid {pid} [{}]", t.name));
            // SAFETY: kill(2) takes no pointers; `pid` is a child of ours that has not been reaped, so it
            // names that child and no recycled process.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    pub(super) fn children_alive(&self) -> Vec<u32> {
        lock(&self.children).iter_mut().filter_map(|c| c.poll_exit().is_none().then_some(c.pid)).collect()
    }
}

pub(super) fn spawner_loop(rx: mpsc::Receiver<SpawnReq>) {
    // Children are forked from this long-lived thread because
    // PR_SET_PDEATHSIG fires when the *thread* that forked them exits.
    while let Ok(req) = rx.recv() {
        let mut c = Command::new(&req.argv[0]);
        c.args(&req.argv[1..]).stdin(Stdio::null()).stdout(req.stdout).stderr(req.stderr);
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let _ = req.reply.send(c.spawn());
    }
}

pub(super) fn find(children: &mut [Tracked], pid: u32) -> &mut Tracked {
    children.iter_mut().find(|c| c.pid == pid).unwrap_or_else(|| panic!("pid {pid} was not started by this lab"))
}
