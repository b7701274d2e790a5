//! Upgrade without a failover: on SIGUSR2 the running process starts the binary it was started from (read
//! from disk again, so a package's new file) with the same command line, and hands it every listening socket
//! over a Unix socket with SCM_RIGHTS, as HAProxy's `expose-fd listeners` and Envoy's hot restart do. The new
//! process asks for them as it starts, takes each one whose configured address and protocol its config still
//! names, starts accepting, and says so; only then does the old process stop accepting. The listening socket is
//! one kernel object shared by both processes, so a connect in between waits in its queue for whichever
//! accepts first: none is refused. The old process then serves its open sessions (its detector with them) until
//! they end or `shutdown_grace` runs out, and exits.
//!
//! The rendezvous is an abstract Unix socket with a random name given to the new process in
//! `STAYBOUND_UPGRADE_FROM`; the old process hands the sockets only to a peer whose pid (SO_PEERCRED) is the
//! child it started. The exchange: the new process sends `listeners\n`; the old one sends the inventory (a
//! length-prefixed JSON list of [`Handed`]) and then the descriptors in that order, at most [`BATCH`] per
//! message; the new process answers `ready\n` once it accepts. Anything else, or the new process exiting, and
//! the old one kills it and keeps running.

use std::ffi::{OsStr, OsString};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, getsockopt, recvmsg, sendmsg, sockopt};
use serde::{Deserialize, Serialize};

/// The environment variable that tells a new process where to ask for the sockets.
pub const ENV: &str = "STAYBOUND_UPGRADE_FROM";
/// Descriptors per message (the kernel takes at most 253, SCM_MAX_FD).
pub const BATCH: usize = 200;
const REQUEST: &[u8] = b"listeners\n";
const READY: &[u8] = b"ready\n";

/// What a handed socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tcp,
    Udp,
    Admin,
}

/// One handed socket, as the inventory describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    pub kind: Kind,
    /// The service that had it (empty for the admin endpoint).
    pub service: String,
    /// The address as configured (port 0 stays 0).
    pub addr: SocketAddr,
    /// The address as bound.
    pub local: SocketAddr,
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UpgradeError(String);

fn err(what: &str) -> impl FnOnce(io::Error) -> UpgradeError + '_ {
    move |e| UpgradeError(format!("{what}: {e}"))
}

/// The binary a process was started from, as a path to start again: `argv0` made absolute against the working
/// directory at start, or looked up in `path` (PATH) when it has no slash. Not `/proc/self/exe`: once a package
/// has replaced the file, that names the old, deleted one.
pub fn started_from(
    argv0: &OsStr,
    cwd: &Path,
    path: Option<&OsStr>,
    exists: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    let p = Path::new(argv0);
    if argv0.is_empty() {
        return None;
    }
    if p.components().count() > 1 || p.is_absolute() {
        return Some(if p.is_absolute() { p.to_path_buf() } else { cwd.join(p) });
    }
    std::env::split_paths(path?)
        .map(|dir| if dir.is_absolute() { dir } else { cwd.join(dir) })
        .map(|d| d.join(p))
        .find(|c| exists(c))
}

/// A new process started to take over, not handed anything yet.
pub struct Successor {
    child: Child,
    listener: UnixListener,
}

impl Successor {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts `binary` with `args`, told where to ask for the sockets.
///
/// # Errors
/// The rendezvous socket cannot be made, or the binary cannot be started.
pub fn spawn(binary: &Path, args: &[OsString]) -> Result<Successor, UpgradeError> {
    let name = format!("staybound-upgrade-{}-{:016x}", std::process::id(), fastrand::u64(..));
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).map_err(err("the rendezvous name"))?;
    let listener = UnixListener::bind_addr(&addr).map_err(err("the rendezvous socket"))?;
    listener.set_nonblocking(true).map_err(err("the rendezvous socket"))?;
    let child = Command::new(binary)
        .args(args)
        .env(ENV, &name)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| UpgradeError(format!("cannot start {}: {e}", binary.display())))?;
    Ok(Successor { child, listener })
}

/// Hands `sockets` to the successor when it asks, and waits until it says it accepts, for at most `within`.
/// Blocking. On failure the successor is killed and reaped, and the caller keeps running.
///
/// # Errors
/// Why the successor did not take over.
pub fn hand_over(mut s: Successor, sockets: &[(Handed, OwnedFd)], within: Duration) -> Result<u32, UpgradeError> {
    let r = exchange(&mut s, sockets, Instant::now() + within);
    if r.is_err() {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
    r.map(|()| s.child.id())
}

fn exchange(s: &mut Successor, sockets: &[(Handed, OwnedFd)], deadline: Instant) -> Result<(), UpgradeError> {
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let stream = loop {
        match s.listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(status) = s.child.try_wait().map_err(err("the new process"))? {
                    return Err(UpgradeError(format!(
                        "the new process exited before it asked for the sockets ({status})"
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(UpgradeError("the new process did not ask for the sockets in time".into()));
                }
                // why: a blocking thread waiting for one connect or the child's exit, whichever comes first;
                // 20 ms is nothing next to a process start.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err("the rendezvous socket")(e)),
        }
    };
    stream.set_nonblocking(false).map_err(err("the handover socket"))?;
    let peer = getsockopt(&stream, sockopt::PeerCredentials).map_err(|e| err("SO_PEERCRED")(e.into()))?;
    if u32::try_from(peer.pid()).ok() != Some(s.child.id()) {
        return Err(UpgradeError(format!(
            "process {} asked for the sockets, not the new process {}: refused",
            peer.pid(),
            s.child.id()
        )));
    }
    stream.set_read_timeout(Some(left())).map_err(err("the handover socket"))?;
    let mut req = [0u8; REQUEST.len()];
    (&stream).read_exact(&mut req).map_err(err("reading the request"))?;
    if req != REQUEST {
        return Err(UpgradeError(format!("unexpected request {:?}", String::from_utf8_lossy(&req))));
    }
    send(&stream, sockets).map_err(err("sending the sockets"))?;
    stream.set_read_timeout(Some(left())).map_err(err("the handover socket"))?;
    let mut ready = [0u8; READY.len()];
    match (&stream).read_exact(&mut ready) {
        Ok(()) if ready == READY => Ok(()),
        Ok(()) => Err(UpgradeError(format!("unexpected answer {:?}", String::from_utf8_lossy(&ready)))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(UpgradeError("the new process took the sockets but did not start (see its log)".into()))
        }
        Err(e) => Err(err("waiting for the new process to accept")(e)),
    }
}

fn send(stream: &UnixStream, sockets: &[(Handed, OwnedFd)]) -> io::Result<()> {
    let list: Vec<&Handed> = sockets.iter().map(|(h, _)| h).collect();
    let json = serde_json::to_vec(&list)?;
    let len = u32::try_from(json.len()).map_err(|_| io::Error::other("inventory too large"))?;
    let mut w = stream;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&json)?;
    for batch in sockets.chunks(BATCH) {
        let fds: Vec<RawFd> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        // why: one byte carries each batch; the receiver reads one byte per message, so batches never merge.
        let sent = sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(b"F")], &cmsg, MsgFlags::empty(), None)?;
        if sent != 1 {
            return Err(io::Error::other("short send of a batch of descriptors"));
        }
    }
    Ok(())
}

/// The new process's end of a handover.
pub struct Handover {
    stream: UnixStream,
}

impl Handover {
    /// Tells the old process that this one accepts: it stops accepting and drains.
    ///
    /// # Errors
    /// The old process is gone.
    pub fn ready(self) -> io::Result<()> {
        (&self.stream).write_all(READY)
    }
}

/// Asks the process at rendezvous `name` for its listening sockets. Blocking, for at most `within`.
///
/// # Errors
/// The old process cannot be reached or sends something else than the protocol.
pub fn take_over(name: &OsStr, within: Duration) -> Result<(Handover, Vec<(Handed, OwnedFd)>), UpgradeError> {
    use std::os::unix::ffi::OsStrExt;
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).map_err(err("the rendezvous name"))?;
    let stream = UnixStream::connect_addr(&addr).map_err(err("connecting to the old process"))?;
    stream.set_read_timeout(Some(within)).map_err(err("the handover socket"))?;
    (&stream).write_all(REQUEST).map_err(err("asking for the sockets"))?;
    let mut len = [0u8; 4];
    (&stream).read_exact(&mut len).map_err(err("reading the inventory"))?;
    let mut json = vec![0u8; u32::from_be_bytes(len) as usize];
    (&stream).read_exact(&mut json).map_err(err("reading the inventory"))?;
    let list: Vec<Handed> = serde_json::from_slice(&json).map_err(|e| UpgradeError(format!("a bad inventory: {e}")))?;
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(list.len());
    while fds.len() < list.len() {
        let raw = receive_batch(&stream).map_err(err("receiving the sockets"))?;
        fds.extend(raw);
    }
    if fds.len() != list.len() {
        return Err(UpgradeError(format!("{} sockets for an inventory of {}", fds.len(), list.len())));
    }
    Ok((Handover { stream }, list.into_iter().zip(fds).collect()))
}

/// One message: one byte and up to [`BATCH`] descriptors, each owned from here on.
fn receive_batch(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; BATCH]);
    let mut iov = [IoSliceMut::new(&mut byte)];
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut raw: Vec<RawFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            raw.extend(fds);
        }
    }
    let (bytes, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC));
    let owned: Vec<OwnedFd> = raw.into_iter().map(own).collect();
    if bytes == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the old process closed the handover"));
    }
    if truncated {
        return Err(io::Error::other("descriptors were truncated"));
    }
    Ok(owned)
}

/// Takes ownership of a descriptor the kernel just installed in this process.
#[allow(unsafe_code)]
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` comes from an SCM_RIGHTS message that recvmsg has just received: the kernel installed a new
    // descriptor in this process's table for it, and nothing else in the process knows its number, so this
    // is its only owner. No safe API of std, nix or socket2 returns received descriptors as `OwnedFd`.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Tells systemd (when it started this process with a notify socket) how things stand: `READY=1` at start,
/// `MAINPID=` when an upgrade makes this process the service's main one. Without NOTIFY_SOCKET, nothing.
pub fn notify(state: &str) {
    use std::os::unix::ffi::OsStrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name),
        None => UnixAddr::from_pathname(Path::new(&path)),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "could not notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_the_path_it_was_started_with() {
        let cwd = Path::new("/srv");
        let none = |_: &Path| false;
        let usr_bin = |p: &Path| p == Path::new("/usr/bin/staybound");
        assert_eq!(started_from(OsStr::new("/usr/bin/staybound"), cwd, None, none), Some("/usr/bin/staybound".into()));
        assert_eq!(started_from(OsStr::new("bin/staybound"), cwd, None, none), Some("/srv/bin/staybound".into()));
        let path = OsStr::new("/usr/local/bin:/usr/bin");
        assert_eq!(started_from(OsStr::new("staybound"), cwd, Some(path), usr_bin), Some("/usr/bin/staybound".into()));
        assert_eq!(started_from(OsStr::new("staybound"), cwd, Some(path), none), None, "not in PATH");
        assert_eq!(started_from(OsStr::new("staybound"), cwd, None, usr_bin), None, "no PATH");
        assert_eq!(started_from(OsStr::new(""), cwd, Some(path), usr_bin), None);
    }

    #[test]
    fn sockets_cross_a_handover_in_batches() -> Result<(), Box<dyn std::error::Error>> {
        let (a, b) = UnixStream::pair()?;
        let listeners: Vec<std::net::TcpListener> =
            (0..BATCH + 3).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<io::Result<_>>()?;
        let mut sockets = Vec::new();
        for l in &listeners {
            let local = l.local_addr()?;
            let h = Handed { kind: Kind::Tcp, service: "s".into(), addr: local, local };
            sockets.push((h, OwnedFd::from(l.try_clone()?)));
        }
        let sender = std::thread::spawn(move || send(&a, &sockets));
        let mut len = [0u8; 4];
        (&b).read_exact(&mut len)?;
        let mut json = vec![0u8; u32::from_be_bytes(len) as usize];
        (&b).read_exact(&mut json)?;
        let list: Vec<Handed> = serde_json::from_slice(&json)?;
        let mut fds = Vec::new();
        while fds.len() < list.len() {
            fds.extend(receive_batch(&b)?);
        }
        sender.join().map_err(|_| "sender panicked")??;
        assert_eq!(fds.len(), listeners.len());
        for ((h, fd), l) in list.iter().zip(fds).zip(&listeners) {
            let got = std::net::TcpListener::from(fd);
            assert_eq!(got.local_addr()?, h.local, "each descriptor is the socket its entry names");
            assert_eq!(got.local_addr()?, l.local_addr()?);
        }
        Ok(())
    }
}
