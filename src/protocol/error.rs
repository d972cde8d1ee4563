//! Errors a reply carries: a machine-readable kind and one line for people (what, where, how to
//! fix). Every role matches them by kind, never by text.

use super::names::NameError;
use serde::{Deserialize, Serialize};

/// Error kinds a reply can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The body is not a valid request.
    BadRequest,
    /// The subject's verb is unknown.
    UnknownVerb,
    /// A name, namespace or host id is invalid.
    InvalidName,
    /// No process matches the target.
    NotFound,
    /// The app is already running (use restart, or force).
    AlreadyRunning,
    /// The script does not exist on this host.
    ScriptNotFound,
    /// The interpreter is not installed on this host.
    InterpreterNotFound,
    /// The process could not be spawned.
    SpawnFailed,
    /// The worker's channel is closed or full.
    ChannelClosed,
    /// The message is larger than allowed.
    TooLarge,
    /// The signal name is unknown.
    UnknownSignal,
    /// A value in the request is out of range.
    InvalidValue,
    /// The agent is shutting down.
    ShuttingDown,
    /// An agent (or the controller) did not answer in time.
    Unreachable,
    /// Anything else.
    Internal,
    /// A kind this version does not know (from a newer peer).
    #[serde(other)]
    Other,
}

/// A precise error: what, where, how to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// Machine-readable kind.
    pub kind: ErrorKind,
    /// One line for people.
    pub message: String,
}

impl ControlError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<NameError> for ControlError {
    fn from(e: NameError) -> Self {
        ControlError::new(ErrorKind::InvalidName, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_ones_are_accepted() {
        for k in [
            ErrorKind::NotFound,
            ErrorKind::AlreadyRunning,
            ErrorKind::Unreachable,
        ] {
            let v = serde_json::to_value(k).unwrap();
            assert_eq!(serde_json::from_value::<ErrorKind>(v).unwrap(), k);
        }
        assert_eq!(
            serde_json::to_value(ErrorKind::ScriptNotFound).unwrap(),
            serde_json::json!("script_not_found")
        );
        let newer: ControlError =
            serde_json::from_str(r#"{"kind":"host_draining","message":"web-1 drains"}"#).unwrap();
        assert_eq!(newer.kind, ErrorKind::Other);
        assert_eq!(newer.to_string(), "web-1 drains");
    }
}
