//! The wire contract: subjects, envelopes, control requests and replies. No I/O, no tokio.

pub mod control;
pub mod duration;
pub mod envelope;
pub mod fleet;
pub mod listen;
pub mod message;
pub mod names;
pub mod schedule;
pub mod signals;
pub mod state;
pub mod subjects;

pub use control::{AppSpec, ControlError, ErrorKind, Reply, Request, Target};
pub use envelope::{Envelope, EventFields, ExecMode, ProcessMeta, Status};
pub use subjects::{AppKey, HostId, Subjects};
