//! Node's cluster protocol, the primary's side: shared listening sockets, the boot probe,
//! `listening` and `close`. The messages are decoded once, in [`super::node_cluster`].

use super::actor::Supervisor;
use super::node_cluster::{self, ClusterMsg, ServerQuery, Wanted};
use super::table::{ClusterSocket, Proc};
use crate::agent::ipc::OutFrame;
use crate::agent::sockets::{Bound, Sockets};
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use std::sync::Arc;

/// The socket a cluster worker's `queryServer` asks for: one of the app's `--listen` sockets
/// when it names an fd (`listen({fd: 3})`), else the address, bound once for every worker.
/// Errors carry the errno for Node and a line for people.
fn cluster_socket(
    table: &mut Sockets,
    listen: &[Arc<Bound>],
    query: &ServerQuery,
    host: &str,
    cwd: &std::path::Path,
) -> Result<Arc<Bound>, (i32, String)> {
    let addr = match query.wanted(cwd)? {
        Wanted::ListenFd { fd, index } => {
            return listen.get(index).cloned().ok_or_else(|| {
                (
                    libc::EBADF,
                    format!(
                        "the worker listens on fd {fd}, which is not one of its --listen sockets"
                    ),
                )
            });
        }
        Wanted::Addr(addr) => addr,
    };
    let bound = table
        .get(&addr, host)
        .map_err(|e| (e.errno, e.error.message))?;
    bound.set_nonblocking().map_err(|e| {
        (
            e.raw_os_error().unwrap_or(libc::EINVAL),
            format!("cannot make the socket for {addr} non-blocking on host {host}: {e}"),
        )
    })?;
    Ok(bound)
}

impl Supervisor {
    /// Node's cluster protocol, the primary's side: a worker's `listen()` becomes a
    /// `queryServer`, answered with the shared listening socket (bound once per address, kept
    /// by the agent) riding on a `NODE_HANDLE` line, or with the errno Node then raises in the
    /// app (`EADDRINUSE`, ...).
    pub(super) fn on_cluster(&mut self, pm_id: u32, run_gen: u64, msg: ClusterMsg) {
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if p.run_gen != run_gen {
            return;
        }
        match msg {
            ClusterMsg::Listening { on } => {
                p.relay.event(
                    &EventFields::named(ProcessEvent::Listening)
                        .reason(format!("listening on {on}")),
                );
                if let Some(run) = p.run.as_mut() {
                    run.listened = true;
                }
                let old = p.retiring.as_ref().map(|r| r.run_gen);
                p.cluster_sockets
                    .retain(|c| c.run_gen >= run_gen || Some(c.run_gen) == old);
                if p.retiring.is_some() && p.meta.status == Status::Online {
                    self.overlap_done(pm_id);
                }
            }
            ClusterMsg::Online => {
                // Node's worker says `online` before it runs the main module, and reads its
                // channel only once the main module has run. So a message it must answer, sent
                // now, is answered after every `listen()` the main module made has asked for its
                // socket (those come first on the channel): a `newconn` for a key it does not
                // have, with a throwaway descriptor (Node closes it and answers
                // `accepted: false`).
                let Some(run) = p.run.as_mut() else { return };
                if p.meta.status != Status::Launching || p.spec.wait_ready {
                    return;
                }
                let our_seq = run.cluster_seq;
                let Ok((probe, _peer)) = std::os::unix::net::UnixStream::pair() else {
                    return; // no descriptor to spare: online at listen_timeout instead
                };
                let frame = OutFrame {
                    bytes: node_cluster::boot_probe(our_seq),
                    fd: Some(probe.into()),
                };
                if run.writer.try_send(frame).is_ok() {
                    run.cluster_seq += 1;
                    run.boot_probe = Some(our_seq);
                }
            }
            ClusterMsg::Accepted { ack } => {
                let probe = p.run.as_ref().and_then(|r| r.boot_probe);
                if ack.is_some() && ack == probe && p.meta.status == Status::Launching {
                    self.became_online(pm_id, None);
                }
            }
            ClusterMsg::Close { key } => {
                // The app closed a server (`server.close()`): Node's primary lets the socket go
                // once no worker has it; one stopping hands its sockets to the next run instead.
                if matches!(p.meta.status, Status::Online | Status::Launching) {
                    p.cluster_sockets
                        .retain(|c| !(c.key == key && c.run_gen == run_gen));
                }
            }
            ClusterMsg::ExitedAfterDisconnect { seq } => {
                let Some(run) = p.run.as_mut() else { return };
                let frame = OutFrame::line(node_cluster::ack(&seq, run.cluster_seq));
                run.cluster_seq += 1;
                self.answer(pm_id, run_gen, frame);
            }
            ClusterMsg::QueryServer(query) => {
                let Some(run) = p.run.as_mut() else { return };
                let our_seq = run.cluster_seq;
                run.cluster_seq += 1;
                // Node's primary hands every worker the first worker's `data` for a key (TLS
                // session ticket keys), so they all resume each other's sessions.
                let data = self
                    .cluster_data
                    .entry(query.key.clone())
                    .or_insert_with(|| query.data.clone())
                    .clone();
                let bound = cluster_socket(
                    &mut self.sockets,
                    &p.sockets,
                    &query,
                    &self.cfg.host,
                    &p.launch.cwd,
                );
                let frame = match bound {
                    Ok(bound) => {
                        let dup = bound.dup();
                        keep_cluster_socket(p, &query.key, run_gen, bound);
                        match dup {
                            Ok(fd) => OutFrame {
                                bytes: node_cluster::with_handle(query.answer(0, &data, our_seq)),
                                fd: Some(fd),
                            },
                            Err(e) => {
                                let errno = -e.raw_os_error().unwrap_or(libc::EMFILE);
                                OutFrame::line(node_cluster::line(
                                    query.answer(errno, &data, our_seq),
                                ))
                            }
                        }
                    }
                    Err((errno, why)) => {
                        tracing::warn!(pm_id, "{why}");
                        p.relay
                            .event(&EventFields::named(ProcessEvent::ListenError).reason(why));
                        OutFrame::line(node_cluster::line(query.answer(-errno, &data, our_seq)))
                    }
                };
                self.answer(pm_id, run_gen, frame);
            }
        }
    }

    /// Sends a cluster answer to the current run. Never dropped: Node's listen() waits for it
    /// with no timeout. The queue may be full of messages for a worker still starting, so it
    /// waits for room off the actor.
    fn answer(&self, pm_id: u32, run_gen: u64, frame: OutFrame) {
        let Some((run, _)) = self.procs.get(&pm_id).and_then(|p| p.run_of(run_gen)) else {
            return;
        };
        let writer = run.writer.clone();
        self.cfg.tracker.spawn(async move {
            if writer.send(frame).await.is_err() {
                tracing::debug!(
                    pm_id,
                    "the worker closed its channel before its cluster reply"
                );
            }
        });
    }
}

/// Remembers the socket a worker of `p` asked for under `key` (an app's own `--listen` socket is
/// held already).
fn keep_cluster_socket(p: &mut Proc, key: &str, run_gen: u64, bound: Arc<Bound>) {
    match p.cluster_sockets.iter_mut().find(|c| c.key == key) {
        Some(c) => {
            c.run_gen = run_gen;
            c.bound = bound;
        }
        None if !p.sockets.iter().any(|b| b.addr == bound.addr) => {
            p.cluster_sockets.push(ClusterSocket {
                key: key.to_string(),
                run_gen,
                bound,
            });
        }
        None => {}
    }
}
