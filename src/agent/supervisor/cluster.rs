//! Node's cluster protocol, the primary's side: shared listening sockets, the boot probe, `listening` and `close`.

use super::actor::Supervisor;
use super::table::ClusterSocket;
use crate::agent::ipc::OutFrame;
use crate::protocol::envelope::{EventFields, Status};
use crate::protocol::event::ProcessEvent;
use std::sync::Arc;

/// One line of Node's channel protocol.
pub(super) fn cluster_line(v: serde_json::Value) -> bytes::Bytes {
    let mut line = serde_json::to_vec(&v).expect("a JSON value always serialises");
    line.push(b'\n');
    line.into()
}

/// The socket a cluster worker's `queryServer` asks for: one of the app's `--listen` sockets
/// when it names an fd (`listen({fd: 3})`), else the address, bound once for every worker.
/// Errors carry the errno for Node and a line for people.
pub(super) fn cluster_socket(
    table: &mut crate::agent::sockets::Sockets,
    listen: &[Arc<crate::agent::sockets::Bound>],
    msg: &serde_json::Value,
    host: &str,
    cwd: &std::path::Path,
) -> Result<Arc<crate::agent::sockets::Bound>, (i32, String)> {
    use crate::protocol::listen::ListenAddr;
    if let Some(fd) = msg.get("fd").and_then(|f| f.as_i64())
        && fd >= 3
    {
        return listen.get((fd - 3) as usize).cloned().ok_or_else(|| {
            (
                libc::EBADF,
                format!("the worker listens on fd {fd}, which is not one of its --listen sockets"),
            )
        });
    }
    let address = msg.get("address").and_then(|a| a.as_str()).unwrap_or("");
    // A number: 4, 6 (TCP) or -1 (a unix path); "udp4"/"udp6" are dgram sockets.
    let Some(kind) = msg.get("addressType").and_then(|t| t.as_i64()) else {
        return Err((
            libc::EAFNOSUPPORT,
            "UDP sockets in cluster mode are not shared by the agent: bind them with `exclusive: true`, or run one instance".into(),
        ));
    };
    let addr = if kind == -1 {
        if address.starts_with('\0') {
            return Err((
                libc::EAFNOSUPPORT,
                "abstract unix sockets in cluster mode are not supported: use a path".into(),
            ));
        }
        // Relative to the app, as if the worker had bound it itself.
        ListenAddr::Unix(cwd.join(address))
    } else {
        let port = msg.get("port").and_then(|p| p.as_u64()).unwrap_or(0);
        let port = u16::try_from(port)
            .map_err(|_| (libc::EINVAL, format!("port {port} is out of range")))?;
        if port == 0 {
            return Err((
                libc::EINVAL,
                "listen(0) in cluster mode would give each worker another port: choose one".into(),
            ));
        }
        ListenAddr::Tcp {
            host: address.to_string(),
            port,
        }
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

/// The key of the boot probe: one no server has (Node's keys are `address:port:...`).
pub(super) const BOOT_PROBE_KEY: &str = "flotilla:boot-probe";

impl Supervisor {
    /// Node's cluster protocol, the primary's side: a worker's `listen()` becomes a
    /// `queryServer`, answered with the shared listening socket (bound once per address, kept
    /// by the agent) riding on a `NODE_HANDLE` line, or with the errno Node then raises in the
    /// app (`EADDRINUSE`, ...).
    pub(super) fn on_cluster(&mut self, pm_id: u32, run_gen: u64, msg: &serde_json::Value) {
        let host = self.cfg.host.clone();
        let cwd = self
            .procs
            .get(&pm_id)
            .map(|p| p.launch.cwd.clone())
            .unwrap_or_default();
        let Some(p) = self.procs.get_mut(&pm_id) else {
            return;
        };
        if p.run_gen != run_gen {
            return;
        }
        let act = msg.get("act").and_then(|a| a.as_str()).unwrap_or_default();
        if act == "listening" {
            let what = match (msg.get("addressType"), msg.get("address"), msg.get("port")) {
                (Some(t), Some(serde_json::Value::String(path)), _) if t == -1 => path.clone(),
                (_, Some(serde_json::Value::String(a)), Some(port)) => format!("{a}:{port}"),
                (_, _, Some(port)) => format!("port {port}"),
                _ => "a socket".into(),
            };
            p.relay.event(
                &EventFields::named(ProcessEvent::Listening).reason(format!("listening on {what}")),
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
            return;
        }
        if act == "online" {
            // Node's worker says `online` before it runs the main module, and reads its channel
            // only once the main module has run. So a message it must answer, sent now, is
            // answered after every `listen()` the main module made has asked for its socket
            // (those come first on the channel): a `newconn` for a key it does not have, with
            // a throwaway descriptor (Node closes it and answers `accepted: false`).
            let Some(run) = p.run.as_mut() else { return };
            if p.meta.status != Status::Launching || p.spec.wait_ready {
                return;
            }
            let our_seq = run.cluster_seq;
            let Ok((probe, _peer)) = std::os::unix::net::UnixStream::pair() else {
                return; // no descriptor to spare: online at listen_timeout instead
            };
            let frame = OutFrame {
                bytes: cluster_line(serde_json::json!({
                    "cmd": "NODE_HANDLE", "type": "net.Native",
                    "msg": {"cmd": "NODE_CLUSTER", "act": "newconn", "key": BOOT_PROBE_KEY, "seq": our_seq}
                })),
                fd: Some(probe.into()),
            };
            if run.writer.try_send(frame).is_ok() {
                run.cluster_seq += 1;
                run.boot_probe = Some(our_seq);
            }
            return;
        }
        if act.is_empty() && msg.get("accepted").is_some() {
            let acked = msg.get("ack").and_then(|a| a.as_u64());
            let probe = p.run.as_ref().and_then(|r| r.boot_probe);
            if acked.is_some() && acked == probe && p.meta.status == Status::Launching {
                self.became_online(pm_id, None);
            }
            return;
        }
        if act == "close" {
            // The app closed a server (`server.close()`): Node's primary lets the socket go
            // once no worker has it; one stopping hands its sockets to the next run instead.
            let key = msg.get("key").and_then(|k| k.as_str()).unwrap_or_default();
            if matches!(p.meta.status, Status::Online | Status::Launching) {
                p.cluster_sockets
                    .retain(|c| !(c.key == key && c.run_gen == run_gen));
            }
            return;
        }
        let Some(run) = p.run.as_mut() else { return };
        let their_seq = msg.get("seq").cloned().unwrap_or(serde_json::Value::Null);
        let our_seq = run.cluster_seq;
        run.cluster_seq += 1;
        let writer = run.writer.clone();
        let frame = match act {
            "exitedAfterDisconnect" => OutFrame::line(cluster_line(serde_json::json!({
                "cmd": "NODE_CLUSTER", "ack": their_seq, "seq": our_seq
            }))),
            "queryServer" => {
                let js = |v: Option<&serde_json::Value>| match v {
                    None => "undefined".to_string(),
                    Some(serde_json::Value::Null) => "null".to_string(),
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                };
                let key = format!(
                    "{}:{}:{}:{}:{}",
                    js(msg.get("address")),
                    js(msg.get("port")),
                    js(msg.get("addressType")),
                    js(msg.get("fd")),
                    js(msg.get("index"))
                );
                // Node's primary hands every worker the first worker's `data` for a key (TLS
                // session ticket keys), so they all resume each other's sessions.
                let data = self
                    .cluster_data
                    .entry(key.clone())
                    .or_insert_with(|| msg.get("data").cloned().unwrap_or_default())
                    .clone();
                let reply = |errno: i32| {
                    serde_json::json!({
                        "cmd": "NODE_CLUSTER", "errno": errno, "key": key, "ack": their_seq,
                        "data": data, "seq": our_seq
                    })
                };
                match cluster_socket(&mut self.sockets, &p.sockets, msg, &host, &cwd) {
                    Ok(bound) => {
                        let dup = bound.dup();
                        match p.cluster_sockets.iter_mut().find(|c| c.key == key) {
                            Some(c) => {
                                c.run_gen = run_gen;
                                c.bound = bound;
                            }
                            None if !p.sockets.iter().any(|b| b.addr == bound.addr) => {
                                p.cluster_sockets.push(ClusterSocket {
                                    key: key.clone(),
                                    run_gen,
                                    bound,
                                });
                            }
                            None => {}
                        }
                        match dup {
                            Ok(fd) => OutFrame {
                                bytes: cluster_line(serde_json::json!({
                                    "cmd": "NODE_HANDLE", "type": "net.Native", "msg": reply(0)
                                })),
                                fd: Some(fd),
                            },
                            Err(e) => OutFrame::line(cluster_line(reply(
                                -e.raw_os_error().unwrap_or(libc::EMFILE),
                            ))),
                        }
                    }
                    Err((errno, why)) => {
                        tracing::warn!(pm_id, "{why}");
                        p.relay
                            .event(&EventFields::named(ProcessEvent::ListenError).reason(why));
                        OutFrame::line(cluster_line(reply(-errno)))
                    }
                }
            }
            _ => return,
        };
        // Never dropped: Node's listen() waits for this answer with no timeout. The queue may be
        // full of messages for a worker still starting, so wait for room off the actor.
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
