//! The tasks of one running worker: the waiter (exit as a message), the stdout/stderr pumps
//! (log files + `log:*`), the IPC reader (relay) and the IPC writer.

use super::ipc::{self, Frame, LineReader, OutFrame};
use super::publisher::Outgoing;
use super::relay::WorkerRelay;
use super::spawn::Spawned;
use super::supervisor::ClusterMsg;
use crate::protocol::message::{Classified, classify};
use crate::protocol::subjects::kind;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Node's acknowledgement of a received handle.
const NODE_HANDLE_ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";

/// Longest log line relayed as one message; longer lines are split.
pub const MAX_LOG_LINE: usize = 64 << 10;

/// What the worker tasks tell the supervisor.
#[derive(Debug)]
pub enum WorkerEvent {
    /// The worker process exited (every child exit arrives this way; nothing polls).
    Exited {
        /// pm_id
        pm_id: u32,
        /// run generation
        run_gen: u64,
        /// exit status
        status: std::io::Result<std::process::ExitStatus>,
    },
    /// The worker sent `'ready'`.
    Ready {
        /// pm_id
        pm_id: u32,
        /// run generation
        run_gen: u64,
    },
    /// The worker's IPC channel closed (a Node cluster worker told to `disconnect` is done).
    ChannelClosed {
        /// pm_id
        pm_id: u32,
        /// run generation
        run_gen: u64,
    },
    /// A Node cluster worker asked its primary (us) something that needs an answer
    /// (`queryServer`: a listening socket; `exitedAfterDisconnect`).
    Cluster {
        /// pm_id
        pm_id: u32,
        /// run generation
        run_gen: u64,
        /// The message, decoded.
        msg: ClusterMsg,
    },
}

/// Where a run's tasks report.
pub struct RunContext {
    /// pm_id
    pub pm_id: u32,
    /// Generation of this run (stale messages are ignored).
    pub run_gen: u64,
    /// The relay.
    pub relay: Arc<WorkerRelay>,
    /// The supervisor's inbox.
    pub events: mpsc::Sender<WorkerEvent>,
    /// stdout log file.
    pub out_log: PathBuf,
    /// stderr log file.
    pub err_log: PathBuf,
    /// Fired at the end of the agent's shutdown: pumps kept open by a descendant that outlived
    /// its worker (e.g. `treekill: false`) stop reading then.
    pub cancel: CancellationToken,
}

/// Starts the tasks of a freshly spawned worker; returns the sender that writes to its channel.
pub fn start(
    tracker: &TaskTracker,
    sp: Spawned,
    ctx: RunContext,
) -> std::io::Result<mpsc::Sender<OutFrame>> {
    let ch = match ipc::channel(sp.ipc) {
        Ok(ch) => ch,
        Err(e) => {
            // Without its channel the worker cannot be supervised: do not leave it running.
            let pgid = nix::unistd::Pid::from_raw(sp.pid as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let mut child = sp.child;
            tracker.spawn(async move {
                let _ = child.wait().await;
            });
            return Err(e);
        }
    };
    let (wtx, wrx) = mpsc::channel::<OutFrame>(256);
    tracker.spawn(
        ctx.cancel
            .clone()
            .run_until_cancelled_owned(ipc::write_loop(ch.clone(), wrx)),
    );
    let c = ctx.cancel.clone();
    tracker.spawn(c.run_until_cancelled_owned(ipc_pump(
        ch,
        ctx.relay.clone(),
        wtx.clone(),
        ctx.events.clone(),
        ctx.pm_id,
        ctx.run_gen,
    )));
    let c = ctx.cancel.clone();
    tracker.spawn(c.run_until_cancelled_owned(log_pump(
        sp.stdout,
        ctx.out_log,
        ctx.relay.clone(),
        ctx.run_gen,
        kind::LOG_OUT,
    )));
    let c = ctx.cancel.clone();
    tracker.spawn(c.run_until_cancelled_owned(log_pump(
        sp.stderr,
        ctx.err_log,
        ctx.relay.clone(),
        ctx.run_gen,
        kind::LOG_ERR,
    )));
    let mut child = sp.child;
    let (events, pm_id, run_gen) = (ctx.events, ctx.pm_id, ctx.run_gen);
    tracker.spawn(async move {
        let status = child.wait().await;
        // The supervisor outlives every waiter unless the agent is already gone.
        let _ = events
            .send(WorkerEvent::Exited {
                pm_id,
                run_gen,
                status,
            })
            .await;
    });
    Ok(wtx)
}

async fn log_pump(
    r: impl AsyncRead + Unpin,
    path: PathBuf,
    relay: Arc<WorkerRelay>,
    run_gen: u64,
    t: &'static str,
) {
    let mut file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(
                "cannot open log file {}: {e}; lines go to NATS only",
                path.display()
            );
            None
        }
    };
    let mut br = BufReader::with_capacity(MAX_LOG_LINE, r);
    let mut pending: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    loop {
        let chunk = match br.fill_buf().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("{t} pipe read failed: {e}");
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        if let Some(f) = file.as_mut()
            && let Err(e) = f.write_all(chunk).await
        {
            tracing::warn!(
                "writing {} failed: {e}; lines go to NATS only",
                path.display()
            );
            file = None;
        }
        let mut rest = chunk;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            pending.extend_from_slice(&rest[..pos]);
            out.extend(line_out(&relay, run_gen, t, &pending));
            pending.clear();
            rest = &rest[pos + 1..];
        }
        pending.extend_from_slice(rest);
        while pending.len() >= MAX_LOG_LINE {
            let tail = pending.split_off(MAX_LOG_LINE);
            out.extend(line_out(&relay, run_gen, t, &pending));
            pending = tail;
        }
        br.consume(n);
        relay.push(&mut out).await;
    }
    if !pending.is_empty() {
        out.extend(line_out(&relay, run_gen, t, &pending));
        relay.push(&mut out).await;
    }
    if let Some(mut f) = file {
        let _ = f.flush().await;
    }
}

fn line_out(relay: &WorkerRelay, run_gen: u64, t: &'static str, line: &[u8]) -> Option<Outgoing> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    relay.log_line(run_gen, t, &String::from_utf8_lossy(line))
}

/// The user message inside a `NODE_HANDLE` line (`{"cmd":"NODE_HANDLE","type":…,"msg":…}`).
fn handle_message(raw: &serde_json::value::RawValue) -> Option<Box<serde_json::value::RawValue>> {
    #[derive(serde::Deserialize)]
    struct Handle {
        msg: Option<Box<serde_json::value::RawValue>>,
    }
    serde_json::from_str::<Handle>(raw.get()).ok()?.msg
}

fn snippet(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(60)]);
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 60 {
        format!("{s}…")
    } else {
        s
    }
}

async fn ipc_pump(
    ch: ipc::Channel,
    relay: Arc<WorkerRelay>,
    writer: mpsc::Sender<OutFrame>,
    events: mpsc::Sender<WorkerEvent>,
    pm_id: u32,
    run_gen: u64,
) {
    let mut reader = LineReader::new(relay.max_message());
    let mut out: Vec<Outgoing> = Vec::new();
    let mut cluster: Vec<ClusterMsg> = Vec::new();
    loop {
        let mut ready = false;
        let res = reader
            .read(&ch, |frame, fds| match frame {
                Frame::Line(line) => match classify(line) {
                    Ok(Classified::NodeInternal { cmd, raw }) => {
                        if cmd == "NODE_CLUSTER" {
                            // The worker's side of Node's cluster protocol goes to the
                            // supervisor, which owns the listening sockets (`online` and the
                            // boot probe's answer make it online, `listening` ends a reload's
                            // overlap, `close` lets a socket go).
                            cluster.extend(ClusterMsg::decode(raw.get()));
                        } else if cmd == "NODE_HANDLE" {
                            // `process.send(msg, handle)`: the handle rode with this line. We
                            // do not use it: close it, acknowledge (else Node holds back the
                            // worker's next sends), and relay the user's `msg` as any message.
                            drop(fds.pop_front());
                            let _ = writer.try_send(OutFrame::line(NODE_HANDLE_ACK));
                            if let Some(inner) = handle_message(raw) {
                                // Node's own cluster traffic inside a handle is not the user's.
                                if let Ok(c @ (Classified::Typed { .. } | Classified::Raw { .. })) =
                                    classify(inner.get().as_bytes())
                                {
                                    out.extend(relay.message(run_gen, &c));
                                }
                            }
                        }
                    }
                    Ok(c) => {
                        ready |= matches!(c, Classified::Raw { ready: true, .. });
                        out.extend(relay.message(run_gen, &c));
                    }
                    Err(e) => relay.ipc_error(format!(
                        "malformed line on the IPC channel ({e}), starting `{}`: write one JSON value per line",
                        snippet(line)
                    )),
                },
                Frame::Oversized(n, head) => {
                    if head.starts_with(br#"{"cmd":"NODE_HANDLE""#) {
                        // Too large to relay, but Node waits for this ACK before it sends
                        // anything else: without it the worker's channel would go silent.
                        drop(fds.pop_front());
                        let _ = writer.try_send(OutFrame::line(NODE_HANDLE_ACK));
                    }
                    relay.ipc_error(format!(
                        "a message of {n} bytes on the IPC channel exceeds the limit of {} bytes \
                         (relay.max_message, default the server's max_payload): skipped",
                        relay.max_message()
                    ))
                }
            })
            .await;
        // Queue what this read brought, in order; while NATS keeps up this may wait for room,
        // and the channel is read again only then (backpressure instead of loss).
        relay.push(&mut out).await;
        if ready {
            let _ = events.send(WorkerEvent::Ready { pm_id, run_gen }).await;
        }
        for msg in cluster.drain(..) {
            let _ = events
                .send(WorkerEvent::Cluster {
                    pm_id,
                    run_gen,
                    msg,
                })
                .await;
        }
        match res {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(pm_id, "IPC channel read failed: {e}");
                break;
            }
        }
    }
    let _ = events
        .send(WorkerEvent::ChannelClosed { pm_id, run_gen })
        .await;
}
