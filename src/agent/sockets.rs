//! Listening sockets the agent binds once and hands to workers (`--listen`, systemd style). A
//! socket lives as long as some process holds it: restarts and rolling reloads never close it,
//! so connections queue in the kernel instead of being refused. The table only remembers
//! sockets still held (weakly), so two apps naming one address share it.

use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::listen::ListenAddr;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};

/// One bound, listening socket.
#[derive(Debug)]
pub struct Bound {
    /// Its address.
    pub addr: ListenAddr,
    fd: OwnedFd,
    /// A unix socket's file as bound (device, inode): removed at the end only if still ours.
    file: Option<(u64, u64)>,
}

impl Bound {
    /// The descriptor (the agent's copy).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A second descriptor for the same socket (to pass to a worker, which gets its own).
    pub fn dup(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Puts the socket in non-blocking mode, for every descriptor of it (the flag belongs to
    /// the socket, shared by the agent's copy and every worker's). Node's workers need it: libuv
    /// accepts from every worker woken for a connection, and on a blocking socket all but the
    /// one that got it would block in accept(), their event loops stuck (no requests on their
    /// other connections, no `disconnect`, no signal handler) until the next connection comes.
    /// `--listen` sockets stay blocking, as systemd passes them, for servers that accept in a
    /// blocking loop.
    pub fn set_nonblocking(&self) -> std::io::Result<()> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = fcntl(&self.fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&self.fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
        Ok(())
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let (ListenAddr::Unix(p), Some(ours)) = (&self.addr, self.file)
            && std::fs::symlink_metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == ours)
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A socket that could not be bound: the errno (what Node's cluster protocol passes on to the
/// app) and the message for people.
#[derive(Debug)]
pub struct BindError {
    /// The OS error number (`EADDRINUSE`, ...).
    pub errno: i32,
    /// What, where, how to fix.
    pub error: ControlError,
}

impl From<BindError> for ControlError {
    fn from(e: BindError) -> Self {
        e.error
    }
}

/// Sockets by address.
#[derive(Default)]
pub struct Sockets {
    by_addr: HashMap<ListenAddr, Weak<Bound>>,
}

impl Sockets {
    /// The socket for `addr`, bound now if no process holds one; errors name the host.
    pub fn get(&mut self, addr: &ListenAddr, host: &str) -> Result<Arc<Bound>, BindError> {
        self.by_addr.retain(|_, w| w.strong_count() > 0);
        if let Some(b) = self.by_addr.get(addr).and_then(Weak::upgrade) {
            return Ok(b);
        }
        let fd = bind(addr).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    ": another process listens there; stop it or choose another address"
                }
                std::io::ErrorKind::PermissionDenied => {
                    ": ports below 1024 need privileges (CAP_NET_BIND_SERVICE)"
                }
                std::io::ErrorKind::AddrNotAvailable => ": that address is not on this host",
                _ => "",
            };
            BindError {
                errno: e.raw_os_error().unwrap_or(libc::EADDRNOTAVAIL),
                error: ControlError::new(
                    ErrorKind::SpawnFailed,
                    format!("cannot listen on {addr} on host {host} ({e}){hint}"),
                ),
            }
        })?;
        let file = match addr {
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::MetadataExt;
                std::fs::symlink_metadata(p)
                    .ok()
                    .map(|m| (m.dev(), m.ino()))
            }
            ListenAddr::Tcp { .. } => None,
        };
        let b = Arc::new(Bound {
            addr: addr.clone(),
            fd,
            file,
        });
        self.by_addr.insert(addr.clone(), Arc::downgrade(&b));
        Ok(b)
    }
}

fn bind(addr: &ListenAddr) -> std::io::Result<OwnedFd> {
    match addr {
        ListenAddr::Tcp { host, port } => {
            let l = if host.is_empty() {
                // Every address: IPv6 with IPv4 mapped (Linux's default), else (no IPv6 on this
                // host) IPv4 only. A port in use is an answer, not a reason to try IPv4.
                match std::net::TcpListener::bind(("::", *port)) {
                    Err(e)
                        if e.kind() != std::io::ErrorKind::AddrInUse
                            && e.kind() != std::io::ErrorKind::PermissionDenied =>
                    {
                        std::net::TcpListener::bind(("0.0.0.0", *port))?
                    }
                    other => other?,
                }
            } else {
                std::net::TcpListener::bind((host.as_str(), *port))?
            };
            Ok(OwnedFd::from(l))
        }
        ListenAddr::Unix(path) => {
            let l = match std::os::unix::net::UnixListener::bind(path) {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && is_stale_socket(path) => {
                    // A socket file nobody listens on any more is a leftover: replace it.
                    std::fs::remove_file(path)?;
                    std::os::unix::net::UnixListener::bind(path)?
                }
                Err(e) => return Err(e),
            };
            Ok(OwnedFd::from(l))
        }
    }
}

/// True for a unix socket file that refuses connections (its server is gone). Anything else (a
/// regular file, a live socket, one we may not connect to) is left alone. The probe never
/// blocks: a live server with a full backlog answers EAGAIN.
fn is_stale_socket(path: &std::path::Path) -> bool {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::unix::fs::FileTypeExt;
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        return false;
    }
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    matches!(
        connect(fd.as_raw_fd(), &addr),
        Err(nix::errno::Errno::ECONNREFUSED)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_once_shared_while_held_and_closed_after() {
        let mut t = Sockets::default();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let addr = ListenAddr::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
        let a = t.get(&addr, "h").unwrap();
        let b = t.get(&addr, "h").unwrap();
        assert_eq!(a.raw(), b.raw(), "one socket for both");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        // Held elsewhere: binding again fails with a clear message.
        let mut other = Sockets::default();
        let e = other.get(&addr, "web-1").unwrap_err();
        assert_eq!(e.errno, libc::EADDRINUSE);
        let e = e.error;
        assert!(
            e.message.contains("web-1") && e.message.contains("another process"),
            "{e}"
        );
        drop((a, b));
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "closed"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let u = ListenAddr::Unix(path.clone());
        let held = t.get(&u, "h").unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(held);
        assert!(!path.exists(), "the socket file goes with the socket");
        // A leftover socket (its server gone) is replaced; a regular file is never touched.
        let gone = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(gone); // the file stays, refusing connections
        let again = t.get(&u, "h").unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(again);
        std::fs::write(&path, "precious").unwrap();
        assert!(t.get(&u, "h").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
