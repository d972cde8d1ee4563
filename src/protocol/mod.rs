//! The wire contract: subjects, envelopes, event names, control requests and replies, app
//! specs. No I/O, no tokio.

pub mod api;
pub mod app;
pub mod control;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod event;
pub mod fleet;
pub mod listen;
pub mod message;
pub mod names;
pub mod reply;
pub mod schedule;
pub mod signals;
pub mod state;
pub mod subjects;

pub use api::ApiRequest;
pub use app::AppSpec;
pub use control::{Request, Target, TargetVerb};
pub use envelope::{Envelope, EventFields, ExecMode, ProcessMeta, Status};
pub use error::{ControlError, ErrorKind};
pub use event::{HostEventKind, ProcessEvent};
pub use reply::{Change, ChangeKind, Reply};
pub use subjects::{AppKey, HostId, Subjects};
