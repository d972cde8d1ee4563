//! `send` and `signal`: a message or a signal to running workers.

use super::actor::Supervisor;
use crate::agent::ipc::OutFrame;
use crate::agent::signals;
use crate::protocol::control::{SendRequest, SignalRequest};
use crate::protocol::envelope::Status;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::reply::{Change, ChangeKind, Reply};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::sync::mpsc;

impl Supervisor {
    pub(super) fn send(&mut self, r: SendRequest) -> Result<Reply, ControlError> {
        if let Some(cmd) = r.message.get("cmd").and_then(|c| c.as_str())
            && cmd.starts_with("NODE_")
        {
            return Err(ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "messages with \"cmd\": \"{cmd}\" are Node's own channel messages and would be swallowed or crash the worker: use another key"
                ),
            ));
        }
        let mut line = serde_json::to_vec(&r.message).expect("a JSON value always serialises");
        line.push(b'\n');
        let line = bytes::Bytes::from(line);
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        for id in ids {
            let p = &self.procs[&id];
            let not_sent = Change::new(id, ChangeKind::NotSent);
            let change = match &p.run {
                Some(run) if p.meta.status != Status::Stopping => {
                    match run.writer.try_send(OutFrame::line(line.clone())) {
                        Ok(()) => Change::new(id, ChangeKind::Sent),
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            not_sent.detail("the worker is not reading its channel (queue full)")
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            not_sent.detail("the worker closed its channel")
                        }
                    }
                }
                _ => not_sent.detail(p.meta.status.as_str()),
            };
            reply.changes.push(change);
        }
        if !reply.changes.iter().any(|c| c.what == ChangeKind::Sent) {
            let detail = reply
                .changes
                .iter()
                .map(|c| format!("pm_id {}: {c}", c.pm_id))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ControlError::new(
                ErrorKind::ChannelClosed,
                format!(
                    "nothing delivered to '{}' on host {} ({detail})",
                    r.target,
                    self.host()
                ),
            ));
        }
        Ok(reply)
    }

    pub(super) fn signal(&mut self, r: SignalRequest) -> Result<Reply, ControlError> {
        let sig = signals::parse(&r.signal)?;
        let (ids, _) = self.select(&r.target, &r.pm_ids)?;
        let mut reply = Reply::ok(Some(r.request_id), self.host());
        for id in ids {
            let p = &self.procs[&id];
            let change = match &p.run {
                Some(run) => match kill(Pid::from_raw(run.pid as i32), sig) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {
                        Change::new(id, ChangeKind::Sent).detail(sig.as_str())
                    }
                    Err(e) => Change::new(id, ChangeKind::NotSent).detail(e.to_string()),
                },
                None => Change::new(id, ChangeKind::NotSent).detail(p.meta.status.as_str()),
            };
            reply.changes.push(change);
        }
        Ok(reply)
    }
}
