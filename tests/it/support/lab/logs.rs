//! What a lab writes down and reads back: `lab.log` in [`Lab::dir`], a time-stamped journal of every
//! command and of the phases tests mark; each child's `*.stdout` and `*.stderr`; and the tail of every log,
//! printed when a test fails (by [`Lab`]'s `Drop`) or when a test asks.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::children::find;
use super::{Lab, lock};

impl Lab {
    /// Appends a time-stamped line to `lab.log` in [`Lab::dir`]; tests may
    /// use it to mark phases ("killing node1 now").
    pub fn note(&self, msg: &str) {
        if let Some(f) = lock(&self.journal).as_mut() {
            let _ = writeln!(f, "[+{:>9.3}s] {msg}", self.started.elapsed().as_secs_f64());
        }
    }

    /// Paths of the stdout and stderr files of tracked child `pid`.
    pub fn log_paths(&self, pid: u32) -> (PathBuf, PathBuf) {
        let mut children = lock(&self.children);
        let name = find(&mut children, pid).name.clone();
        (self.dir.join(format!("{name}.stdout")), self.dir.join(format!("{name}.stderr")))
    }

    /// stdout followed by stderr of tracked child `pid`, as text.
    pub fn read_log(&self, pid: u32) -> String {
        let (o, e) = self.log_paths(pid);
        let o = fs::read_to_string(o).unwrap_or_default();
        let e = fs::read_to_string(e).unwrap_or_default();
        format!("{o}{e}")
    }

    /// Prints the tail (last `lines` lines) of every log in [`Lab::dir`] to
    /// stderr, e.g. before failing an assertion.
    pub fn dump_logs(&self, lines: usize) {
        eprintln!("==== lab {} ({}) logs in {} ====", self.prefix, self.tag, self.dir.display());
        let mut files = log_files(&self.dir);
        files.sort();
        for f in files {
            let text = fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            eprintln!("---- {} ({} lines) ----", f.display(), all.len());
            for l in &all[start..] {
                eprintln!("{l}");
            }
        }
    }
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(log_files(&p).into_iter().filter(|f| f.extension().is_some_and(|x| x == "log")));
        } else if p.extension().is_some_and(|x| x == "log" || x == "stdout" || x == "stderr") {
            out.push(p);
        }
    }
    out
}
