//! `flock(2)` on the home's lock files. A lock belongs to an open file description, so two
//! opens conflict even within one process (racing CLIs in one test), and the kernel drops it
//! when its holder dies, however it dies: that is what makes "is the daemon alive" reliable.

use super::{StackError, io_err};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::Duration;

/// A held lock; released on drop.
pub(crate) type Held = Flock<File>;

fn open(path: &Path) -> Result<File, StackError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("open", path))
}

/// True while someone holds `path` exclusively (a missing file is not held).
pub(crate) fn held(path: &Path) -> Result<bool, StackError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    // A shared probe: probes never conflict with each other, only with the daemon's lock.
    match Flock::lock(f, FlockArg::LockSharedNonblock) {
        Ok(probe) => {
            drop(probe);
            Ok(false)
        }
        Err((_, Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(io_err("lock", path)(e.into())),
    }
}

/// Takes `path` exclusively if nobody holds it.
pub(crate) fn try_exclusive(path: &Path) -> Result<Option<Held>, StackError> {
    match Flock::lock(open(path)?, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io_err("lock", path)(e.into())),
    }
}

/// Takes `path` exclusively, waiting for its holder up to `within`; `None` if it is still held.
///
/// The blocking `flock` runs on a thread of its own (not tokio's blocking pool, which would hold
/// the runtime's shutdown up while the holder lives); on timeout that thread stays blocked and
/// releases the lock as soon as it gets it, or dies with the process.
pub(crate) async fn exclusive_opt(
    path: &Path,
    within: Duration,
) -> Result<Option<Held>, StackError> {
    if let Some(l) = try_exclusive(path)? {
        return Ok(Some(l));
    }
    let f = open(path)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("flotilla-flock".into())
        .spawn(move || {
            let r = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| e);
            // If nobody waits any more, the lock is dropped (released) here.
            let _ = tx.send(r);
        });
    spawned.map_err(io_err("start a thread to wait for", path))?;
    match tokio::time::timeout(within, rx).await {
        Ok(Ok(Ok(l))) => Ok(Some(l)),
        Ok(Ok(Err(e))) => Err(io_err("lock", path)(e.into())),
        Ok(Err(_)) => Err(io_err("lock", path)(std::io::Error::other(
            "the waiting thread ended without an answer",
        ))),
        Err(_) => Ok(None),
    }
}

/// Takes `path` exclusively, waiting up to `within` for its holder, else [`StackError::LockTimeout`].
pub(crate) async fn exclusive(path: &Path, within: Duration) -> Result<Held, StackError> {
    exclusive_opt(path, within)
        .await?
        .ok_or_else(|| StackError::LockTimeout {
            path: path.to_path_buf(),
            within,
        })
}

/// The pid the holder wrote into the lock file, if any.
pub(crate) fn holder_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Replaces the lock file's content with our pid (for `kill` and error messages).
pub(crate) fn write_pid(l: &mut Held, path: &Path) -> Result<(), StackError> {
    use std::io::{Seek, Write};
    let f: &mut File = l;
    f.set_len(0)
        .and_then(|()| f.seek(std::io::SeekFrom::Start(0)))
        .and_then(|_| writeln!(f, "{}", std::process::id()))
        .map_err(io_err("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_lock_is_seen_and_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        assert!(!held(&p).unwrap(), "a missing file is not held");
        let mut l = try_exclusive(&p).unwrap().expect("free");
        write_pid(&mut l, &p).unwrap();
        assert_eq!(holder_pid(&p), Some(std::process::id()));
        assert!(held(&p).unwrap());
        assert!(
            try_exclusive(&p).unwrap().is_none(),
            "a second open conflicts"
        );
        assert!(
            exclusive_opt(&p, Duration::from_millis(50))
                .await
                .unwrap()
                .is_none()
        );
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { exclusive(&p, Duration::from_secs(10)).await.map(|_| ()) }
        });
        drop(l);
        waiter.await.unwrap().unwrap();
        // The thread of the timed-out wait above may take the lock for a moment when it is
        // released (it lets go at once): the lock is free again, though not necessarily now.
        drop(exclusive(&p, Duration::from_secs(10)).await.unwrap());
    }
}
