//! The connect hook's I/O: loads the programs [`super::connect_hook`] writes into the kernel and attaches
//! them to a cgroup through BPF links that this process holds. A link lives as long as its descriptor, so
//! the redirect ends with the process however it ends (exit, SIGKILL, a crash): nothing is left for
//! `staybound cleanup`, and no other program on the cgroup is touched. A reload swaps the programs in place
//! (`BPF_LINK_UPDATE`), with no moment in which a connect goes unredirected.
//!
//! why: the `bpf(2)` calls are made here by hand. The crates that load eBPF programs (aya, libbpf-rs)
//! load them from an ELF object compiled by a BPF toolchain, or build libbpf's C; these programs are a few
//! dozen instructions written at run time from the config, which three commands of `bpf(2)` load and attach.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::Redirect;
use super::connect_hook::{self, Family, Insn};

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_LINK_UPDATE: libc::c_int = 29;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// `union bpf_attr` as `BPF_PROG_LOAD` reads it (the fields up to `expected_attach_type`).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as `BPF_LINK_CREATE` and `BPF_LINK_UPDATE` read it: four `u32`s, then zeros.
#[repr(C)]
#[derive(Default)]
struct Link {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    _rest: [u64; 4],
}

/// `bpf(cmd, attr, sizeof attr)`; the new descriptor for the commands that make one.
#[allow(unsafe_code)]
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, borrowed mutably for the whole
    // call and passed with its exact size; the kernel reads (and for some commands writes) only that many
    // bytes. Any pointers inside it (instructions, licence, log) point to buffers the caller keeps alive
    // across this call, with their lengths beside them, and the kernel keeps none of them after it returns.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<libc::c_void>(), size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

#[allow(unsafe_code)]
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: `fd` was just returned by `bpf(2)` for a new object; nothing else owns or has closed it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads one hook's program; on refusal the verifier's last lines say why.
fn load(family: Family, insns: &[Insn]) -> io::Result<OwnedFd> {
    // The licence the kernel checks helpers against: the project's (these programs call none that is GPL-only).
    let license = c"Apache-2.0";
    let (name, attach) = match family {
        Family::V4 => (&b"staybound_c4"[..], BPF_CGROUP_INET4_CONNECT),
        Family::V6 => (&b"staybound_c6"[..], BPF_CGROUP_INET6_CONNECT),
    };
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name);
    let attr = |log: &mut Vec<u8>, level: u32| ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: level,
        log_size: if level > 0 { log.len() as u32 } else { 0 },
        log_buf: if level > 0 { log.as_mut_ptr() as u64 } else { 0 },
        prog_name,
        expected_attach_type: attach,
        ..ProgLoad::default()
    };
    let mut none = Vec::new();
    match bpf(BPF_PROG_LOAD, &mut attr(&mut none, 0)) {
        Ok(fd) => owned(fd),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(io::Error::new(
            e.kind(),
            format!("{e}: loading a cgroup program needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)"),
        )),
        Err(e) => {
            let mut log = vec![0u8; 1 << 16];
            let again = bpf(BPF_PROG_LOAD, &mut attr(&mut log, 1));
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            let tail: Vec<&str> = text.lines().rev().take(4).collect();
            match again {
                Ok(fd) => owned(fd),
                Err(_) => Err(io::Error::new(e.kind(), format!("{e}; the verifier: {}", tail.join(" | ")))),
            }
        }
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
#[allow(unsafe_code)]
pub(crate) fn netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the socket is live for the call; `cookie` and `len` are on our stack with `len` its exact size,
    // and the kernel writes at most `len` bytes into it.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(cookie) }
}

/// The cgroup v2 hierarchy's root: where the hook goes when the config names no cgroup, so that it covers
/// every process of this host (in staybound's network namespace).
///
/// # Errors
/// `/proc/self/mounts` cannot be read, or no cgroup2 file system is mounted.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mounts")?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system is mounted"))
}

/// From the text of `/proc/self/mounts`: the cgroup2 mount nearest the file system's root (a hybrid host has
/// it at /sys/fs/cgroup/unified, a cgroup v2 host at /sys/fs/cgroup). The kernel writes a space, tab,
/// newline or backslash in a path as an octal escape (`\040`).
fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(unescape_mount_path(at)))
        })
        .min_by_key(|p| p.components().count())
}

fn unescape_mount_path(at: &str) -> String {
    at.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The two links (one per family) this process holds on its cgroup.
#[derive(Debug)]
pub struct Hook {
    cgroup: PathBuf,
    links: [OwnedFd; 2],
}

impl Hook {
    /// Loads both programs and attaches them to `cgroup`.
    ///
    /// # Errors
    /// The cgroup cannot be opened, or the kernel refused a program or the link (the message says which).
    pub fn attach(cgroup: &Path, redirects: &[Redirect]) -> io::Result<Hook> {
        let dir = std::fs::File::open(cgroup)
            .map_err(|e| io::Error::new(e.kind(), format!("cgroup {}: {e}", cgroup.display())))?;
        let netns = netns_cookie()?;
        let mut links = Vec::with_capacity(2);
        for (family, attach) in [(Family::V4, BPF_CGROUP_INET4_CONNECT), (Family::V6, BPF_CGROUP_INET6_CONNECT)] {
            let prog = load(family, &connect_hook::program(family, redirects, netns))?;
            let mut attr = Link { a: prog.as_raw_fd() as u32, b: dir.as_raw_fd() as u32, c: attach, ..Link::default() };
            let link = bpf(BPF_LINK_CREATE, &mut attr)
                .map_err(|e| io::Error::new(e.kind(), format!("attaching to cgroup {}: {e}", cgroup.display())))?;
            links.push(owned(link)?);
        }
        let links: [OwnedFd; 2] = links.try_into().map_err(|_| io::Error::other("two links"))?;
        Ok(Hook { cgroup: cgroup.to_path_buf(), links })
    }

    /// Swaps both programs for ones that redirect `redirects`, in place.
    ///
    /// # Errors
    /// The kernel refused a new program or the swap; the old programs then stay.
    pub fn update(&self, redirects: &[Redirect]) -> io::Result<()> {
        let netns = netns_cookie()?;
        let progs =
            [Family::V4, Family::V6].map(|family| load(family, &connect_hook::program(family, redirects, netns)));
        for (link, prog) in self.links.iter().zip(progs) {
            let prog = prog?;
            let mut attr = Link { a: link.as_raw_fd() as u32, b: prog.as_fd().as_raw_fd() as u32, ..Link::default() };
            bpf(BPF_LINK_UPDATE, &mut attr)?;
        }
        Ok(())
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_nearest_the_root_is_found_hybrid_or_not() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let v2 = "proc /proc proc rw 0 0\n\
                  cgroup2 /run/x/deeper/cg cgroup2 rw 0 0\n\
                  cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(cgroup2_mount(v2), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n"), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\nshort line\n"), None);
        assert_eq!(cgroup2_mount(""), None);
    }
}
