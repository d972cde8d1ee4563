//! The worker's IPC channel: a Unix stream socket pair carrying newline-delimited JSON, the way
//! Node's `child_process.fork` sets it up (`NODE_CHANNEL_FD`, serialization `json`).
//!
//! The agent's end is read with `recvmsg` under tokio's `AsyncFd`, so file descriptors a Node
//! worker sends with a message (`NODE_HANDLE`, SCM_RIGHTS) arrive with it. Lines longer than the
//! limit are skipped (reported, never buffered whole). Writes go through one writer task per
//! channel, fed by a bounded queue.

use bytes::Bytes;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// The fd number the worker finds its channel on.
pub const CHILD_FD: RawFd = 3;

/// Bytes kept of a line that is skipped for being over the limit.
const HEAD: usize = 32;

/// Most fds held from one worker without a `NODE_HANDLE` line to claim them.
const MAX_HELD_FDS: usize = 16;

/// Makes the pair: `(agent end, non-blocking; worker end, blocking)`. Both are close-on-exec;
/// the spawn code moves the worker end to fd 3 without that flag.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    set_nonblocking(&a)?;
    Ok((a, b))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// The agent's end, shared by the reader and the writer task.
pub type Channel = Arc<AsyncFd<OwnedFd>>;

/// Wraps the agent's end for tokio.
pub fn channel(fd: OwnedFd) -> io::Result<Channel> {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, which owns it until dropped; an
    // OwnedFd always returns the same open descriptor from as_raw_fd.
    let afd =
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
            .map_err(io::Error::from)?;
    Ok(Arc::new(afd))
}

/// What the reader found.
#[derive(Debug)]
pub enum Frame<'a> {
    /// One complete line, without its newline.
    Line(&'a [u8]),
    /// A line longer than the limit (its length, and its first bytes); the rest was skipped.
    Oversized(usize, &'a [u8]),
}

/// Splits a byte stream into lines, in place, never holding more than `max_line` + one read.
pub struct LineReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_line: usize,
    skipping: Option<usize>,
    head: Vec<u8>,
    /// Descriptors received and not yet claimed by a `NODE_HANDLE` line.
    pub fds: VecDeque<OwnedFd>,
}

impl LineReader {
    /// A reader for lines of at most `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: vec![0; 64 << 10],
            start: 0,
            end: 0,
            max_line,
            skipping: None,
            head: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// Drops the buffered part of an over-limit line, keeping its length and first bytes.
    fn start_skipping(&mut self) {
        if self.skipping.is_none() {
            self.head.clear();
            self.head
                .extend_from_slice(&self.buf[self.start..(self.start + HEAD).min(self.end)]);
        }
        self.skipping = Some(self.skipping.unwrap_or(0) + (self.end - self.start));
        self.start = 0;
        self.end = 0;
    }

    /// Room to read into, growing or compacting as needed.
    fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.buf.len() * 2).min(self.max_line + (64 << 10));
                if grown > self.buf.len() {
                    self.buf.resize(grown, 0);
                } else {
                    // A partial line fills the largest buffer: it is over the limit.
                    self.start_skipping();
                    self.start = 0;
                    self.end = 0;
                }
            }
        }
        &mut self.buf[self.end..]
    }

    /// Accounts for `n` bytes just read into [`Self::spare`] and hands out complete lines.
    fn advance(&mut self, n: usize, mut out: impl FnMut(Frame<'_>, &mut VecDeque<OwnedFd>)) {
        let mut scan = self.end;
        self.end += n;
        while let Some(pos) = memchr::memchr(b'\n', &self.buf[scan..self.end]) {
            let nl = scan + pos;
            if let Some(skipped) = self.skipping.take() {
                out(
                    Frame::Oversized(skipped + (nl - self.start), &self.head),
                    &mut self.fds,
                );
            } else if nl - self.start > self.max_line {
                let head = &self.buf[self.start..(self.start + HEAD).min(nl)];
                out(Frame::Oversized(nl - self.start, head), &mut self.fds);
            } else {
                out(Frame::Line(&self.buf[self.start..nl]), &mut self.fds);
            }
            self.start = nl + 1;
            scan = self.start;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.skipping.is_some() || self.end - self.start > self.max_line {
            self.start_skipping();
        }
    }

    /// At end of stream: a last line without its newline is still a line (or an oversized
    /// one), not silently lost.
    pub fn finish(&mut self, mut out: impl FnMut(Frame<'_>, &mut VecDeque<OwnedFd>)) {
        let partial = self.end - self.start;
        if let Some(skipped) = self.skipping.take() {
            out(
                Frame::Oversized(skipped + partial, &self.head),
                &mut self.fds,
            );
        } else if partial > self.max_line {
            let head = &self.buf[self.start..self.start + HEAD.min(partial)];
            out(Frame::Oversized(partial, head), &mut self.fds);
        } else if partial > 0 {
            out(Frame::Line(&self.buf[self.start..self.end]), &mut self.fds);
        }
        self.start = 0;
        self.end = 0;
    }

    /// Feeds bytes from a slice (tests, and non-socket sources).
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut out: impl FnMut(Frame<'_>, &mut VecDeque<OwnedFd>),
    ) {
        while !data.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            data = &data[n..];
            self.advance(n, &mut out);
        }
    }

    /// Reads once from the channel (waiting until readable); `Ok(false)` at end of stream.
    pub async fn read(
        &mut self,
        ch: &Channel,
        mut out: impl FnMut(Frame<'_>, &mut VecDeque<OwnedFd>),
    ) -> io::Result<bool> {
        loop {
            let mut guard = ch.readable().await?;
            let fd = ch.get_ref().as_raw_fd();
            let spare = self.spare();
            let res = guard.try_io(|_| recv_with_fds(fd, spare));
            match res {
                Ok(Ok((0, _))) => {
                    self.finish(&mut out);
                    return Ok(false);
                }
                Ok(Ok((n, fds))) => {
                    for f in fds {
                        if self.fds.len() < MAX_HELD_FDS {
                            self.fds.push_back(f);
                        }
                    }
                    self.advance(n, out);
                    return Ok(true);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    self.finish(&mut out);
                    return Ok(false);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // Room for the kernel's maximum (SCM_MAX_FD = 253): with less, a worker sending more fds
    // at once would have them installed, truncated from the control data, and leaked.
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in our table for us;
                // nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|r| unsafe { OwnedFd::from_raw_fd(r) }),
                );
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// One write to the worker: a complete line, optionally with a descriptor riding on it.
pub struct OutFrame {
    /// The bytes, ending in `\n`.
    pub bytes: Bytes,
    /// A descriptor to pass with SCM_RIGHTS.
    pub fd: Option<OwnedFd>,
}

impl OutFrame {
    /// A line without a descriptor.
    pub fn line(bytes: impl Into<Bytes>) -> Self {
        Self {
            bytes: bytes.into(),
            fd: None,
        }
    }
}

/// Writes frames until the queue closes or the worker goes away. A frame the kernel refuses
/// before any of it is written (a descriptor it will not pass) is skipped with a warning; the
/// channel goes on. After part of a line, the stream cannot be trusted: the writer stops.
pub async fn write_loop(ch: Channel, mut rx: mpsc::Receiver<OutFrame>) {
    while let Some(frame) = rx.recv().await {
        match write_frame(&ch, frame).await {
            Ok(()) => {}
            Err((e, false)) if !peer_gone(&e) => {
                tracing::warn!("a message to the worker could not be written ({e}): skipped");
            }
            Err((e, _)) => {
                tracing::debug!("IPC channel write ended: {e}");
                return;
            }
        }
    }
}

/// The worker closed its end (or exited).
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ESHUTDOWN)
    )
}

/// Writes one frame; on error, whether part of it was written.
async fn write_frame(ch: &Channel, frame: OutFrame) -> Result<(), (io::Error, bool)> {
    let mut off = 0;
    let mut fd = frame.fd;
    while off < frame.bytes.len() {
        let mut guard = ch.writable().await.map_err(|e| (e, off > 0))?;
        let raw = ch.get_ref().as_raw_fd();
        let res = guard.try_io(|_| {
            let iov = [IoSlice::new(&frame.bytes[off..])];
            let fds;
            let cmsgs: &[ControlMessage<'_>] = match &fd {
                Some(f) => {
                    fds = [f.as_raw_fd()];
                    &[ControlMessage::ScmRights(&fds)]
                }
                None => &[],
            };
            sendmsg::<()>(raw, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
        });
        match res {
            Ok(Ok(n)) => {
                off += n;
                fd = None; // the descriptor went with the first bytes
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err((e, off > 0)),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(r: &mut LineReader, chunks: &[&[u8]]) -> Vec<String> {
        let mut got = vec![];
        for c in chunks {
            r.feed(c, |f, _| {
                got.push(match f {
                    Frame::Line(l) => String::from_utf8_lossy(l).into_owned(),
                    Frame::Oversized(n, _) => format!("<oversized {n}>"),
                })
            });
        }
        got
    }

    #[test]
    fn splits_coalesced_and_partial_lines() {
        let mut r = LineReader::new(1000);
        let got = collect(&mut r, &[b"{\"a\":1}\n{\"b\"", b":2}\n\"x\"\n\"y", b"\"\n"]);
        assert_eq!(got, vec!["{\"a\":1}", "{\"b\":2}", "\"x\"", "\"y\""]);
    }

    #[test]
    fn oversized_lines_are_skipped_and_the_next_one_survives() {
        let mut r = LineReader::new(10);
        let big = vec![b'x'; 200_000];
        let got = collect(&mut r, &[b"\"ok\"\n", &big, &big, b"tail\n\"after\"\n"]);
        assert_eq!(got, vec!["\"ok\"", "<oversized 400004>", "\"after\""]);
        let got = collect(&mut r, &[b"01234567890123\n\"short\"\n"]);
        assert_eq!(got, vec!["<oversized 14>", "\"short\""]);
    }

    #[test]
    fn a_last_line_without_newline_is_kept() {
        let mut r = LineReader::new(100);
        let mut got = collect(&mut r, &[b"\"a\"\n\"tail\""]);
        r.finish(|f, _| {
            if let Frame::Line(l) = f {
                got.push(String::from_utf8_lossy(l).into_owned());
            }
        });
        assert_eq!(got, vec!["\"a\"", "\"tail\""]);
    }

    #[test]
    fn a_line_at_the_limit_passes() {
        let mut r = LineReader::new(10);
        let got = collect(&mut r, &[b"0123456789\n"]);
        assert_eq!(got, vec!["0123456789"]);
    }

    #[test]
    fn memory_stays_bounded_by_the_limit() {
        let mut r = LineReader::new(100_000);
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            collect(&mut r, &[&chunk]);
        }
        assert!(r.buf.len() <= 100_000 + (64 << 10), "{}", r.buf.len());
        let got = collect(&mut r, &[b"\n1\n"]);
        assert_eq!(got, vec![format!("<oversized {}>", 20 << 20), "1".into()]);
    }
}
