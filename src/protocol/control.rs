//! Control plane: request bodies on `pmctl.agent.<host>.<verb>` (replies: [`super::reply`]).
//!
//! One [`Request`] enum, one struct per verb; every request carries a `request_id` (repeating
//! one is harmless: the agent answers it with the reply it gave the first time). New fields get
//! `#[serde(default)]` so agents and controllers of different versions keep talking.

use super::app::AppSpec;
use super::envelope::ProcessMeta;
use super::error::{ControlError, ErrorKind};
use super::names::{self, NameError, NameKind};
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// The verbs an agent answers.
pub const AGENT_VERBS: &[&str] = &[
    "start", "stop", "restart", "reload", "delete", "send", "signal", "list", "logs",
];

/// The verbs that act on the processes a target names, and wait for them to settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetVerb {
    /// Stop gracefully; kept in the table.
    Stop,
    /// Stop, then a new run (its reply waits until it is online).
    Restart,
    /// A new run before the old one stops, where sockets are shared (pm2's reload).
    Reload,
    /// Stop, then gone from the table.
    Delete,
}

impl TargetVerb {
    /// The verb (subject token).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetVerb::Stop => "stop",
            TargetVerb::Restart => "restart",
            TargetVerb::Reload => "reload",
            TargetVerb::Delete => "delete",
        }
    }

    /// The verb named `verb`, if it is one of these.
    pub fn from_verb(verb: &str) -> Option<Self> {
        Some(match verb {
            "stop" => TargetVerb::Stop,
            "restart" => TargetVerb::Restart,
            "reload" => TargetVerb::Reload,
            "delete" => TargetVerb::Delete,
            _ => return None,
        })
    }

    /// The agent request for this verb.
    pub fn request(self, r: TargetRequest) -> Request {
        match self {
            TargetVerb::Stop => Request::Stop(r),
            TargetVerb::Restart => Request::Restart(r),
            TargetVerb::Reload => Request::Reload(r),
            TargetVerb::Delete => Request::Delete(r),
        }
    }
}

impl fmt::Display for TargetVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses the body of a `verb` request; the error names the verb and what is wrong.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    verb: &str,
    body: &[u8],
) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|e| {
        ControlError::new(
            ErrorKind::BadRequest,
            format!("malformed '{verb}' request: {e}"),
        )
    })
}

/// A request body as JSON bytes. Request types serialise infallibly (no maps with non-string
/// keys, no failing `Serialize` impls), so the `expect` documents an invariant.
pub(crate) fn body_of<T: Serialize>(r: &T) -> Vec<u8> {
    serde_json::to_vec(r).expect("request serialisation is infallible")
}

/// Which processes a request is about: a name, `ns/name`, a pm_id, or `all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every process.
    All,
    /// One pm_id.
    Id(u32),
    /// Every instance of an app, in one namespace or in any.
    Name {
        /// `None` matches any namespace.
        namespace: Option<String>,
        /// The app name (`[A-Za-z0-9_-]+`).
        name: String,
    },
}

impl Target {
    /// Parses `all`, `3`, `api` or `ns/api`, validating names.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s == "all" {
            return Ok(Target::All);
        }
        if !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && let Ok(id) = s.parse()
        {
            return Ok(Target::Id(id));
        }
        match s.split_once('/') {
            Some((ns, name)) => {
                names::validate(NameKind::Namespace, ns)?;
                names::validate(NameKind::App, name)?;
                Ok(Target::Name {
                    namespace: Some(ns.into()),
                    name: name.into(),
                })
            }
            None => {
                names::validate(NameKind::App, s)?;
                Ok(Target::Name {
                    namespace: None,
                    name: s.into(),
                })
            }
        }
    }

    /// True when the process matches.
    pub fn matches(&self, m: &ProcessMeta) -> bool {
        match self {
            Target::All => true,
            Target::Id(id) => m.pm_id == *id,
            Target::Name { namespace, name } => {
                m.name == *name && namespace.as_deref().is_none_or(|ns| m.namespace == ns)
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::Id(id) => write!(f, "{id}"),
            Target::Name {
                namespace: Some(ns),
                name,
            } => write!(f, "{ns}/{name}"),
            Target::Name {
                namespace: None,
                name,
            } => f.write_str(name),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(u32),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(Target::Id(n)),
            Either::S(s) => Target::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// `start`: run an app's instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// The app.
    pub app: AppSpec,
    /// Start another copy even when the app is already running (pm2 `-f`).
    #[serde(default)]
    pub force: bool,
}

/// `stop`, `restart`, `reload`, `delete`, `list`: a target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    #[serde(default = "target_all")]
    pub target: Target,
    /// When not empty: exactly these processes among those `target` matches (the controller
    /// sends them); ids this agent does not have are reported as `absent`, not as an error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
    /// `reload`: how many instances at a time (default 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub parallel: u32,
}

fn one() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}

impl TargetRequest {
    /// A request for `target` with a fresh id.
    pub fn new(target: Target) -> Self {
        Self {
            request_id: Uuid::new_v4(),
            target,
            pm_ids: vec![],
            parallel: 1,
        }
    }
}

/// `logs`: the last lines of each targeted process's log files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    #[serde(default = "target_all")]
    pub target: Target,
    /// See [`TargetRequest::pm_ids`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
    /// Lines per file (pm2's default is 15).
    #[serde(default = "default_lines")]
    pub lines: u32,
}

fn default_lines() -> u32 {
    15
}

fn target_all() -> Target {
    Target::All
}

/// `send`: deliver JSON to each targeted worker's `process.on('message')`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    pub target: Target,
    /// The JSON value, delivered as given.
    pub message: serde_json::Value,
    /// See [`TargetRequest::pm_ids`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
}

/// `signal`: send a signal to each targeted worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// Which processes.
    pub target: Target,
    /// `SIGUSR2`, `USR2` or a number.
    pub signal: String,
    /// See [`TargetRequest::pm_ids`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pm_ids: Vec<u32>,
}

/// A request to an agent; the verb comes from the subject.
#[derive(Debug, Clone)]
pub enum Request {
    /// `start`
    Start(Box<StartRequest>),
    /// `stop`
    Stop(TargetRequest),
    /// `restart`
    Restart(TargetRequest),
    /// `reload`: a restart whose reply waits until the new run is online (ready).
    Reload(TargetRequest),
    /// `delete`
    Delete(TargetRequest),
    /// `send`
    Send(SendRequest),
    /// `signal`
    Signal(SignalRequest),
    /// `list`
    List(TargetRequest),
    /// `logs`
    Logs(LogsRequest),
}

impl From<StartRequest> for Request {
    fn from(r: StartRequest) -> Self {
        Request::Start(Box::new(r))
    }
}
impl From<SendRequest> for Request {
    fn from(r: SendRequest) -> Self {
        Request::Send(r)
    }
}
impl From<SignalRequest> for Request {
    fn from(r: SignalRequest) -> Self {
        Request::Signal(r)
    }
}

impl Request {
    /// Parses a request body for `verb`; errors say what is wrong and where.
    pub fn parse(verb: &str, body: &[u8]) -> Result<Request, ControlError> {
        if let Some(v) = TargetVerb::from_verb(verb) {
            return Ok(v.request(parse_body(verb, body)?));
        }
        Ok(match verb {
            "start" => Request::Start(parse_body(verb, body)?),
            "logs" => Request::Logs(parse_body(verb, body)?),
            "send" => Request::Send(parse_body(verb, body)?),
            "signal" => Request::Signal(parse_body(verb, body)?),
            "list" => Request::List(parse_body(verb, body)?),
            other => {
                return Err(ControlError::new(
                    ErrorKind::UnknownVerb,
                    format!(
                        "unknown verb '{other}': an agent answers {}",
                        AGENT_VERBS.join(", ")
                    ),
                ));
            }
        })
    }

    /// The verb (subject token).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Start(_) => "start",
            Request::Stop(_) => "stop",
            Request::Restart(_) => "restart",
            Request::Reload(_) => "reload",
            Request::Logs(_) => "logs",
            Request::Delete(_) => "delete",
            Request::Send(_) => "send",
            Request::Signal(_) => "signal",
            Request::List(_) => "list",
        }
    }

    /// The request id.
    pub fn request_id(&self) -> Uuid {
        match self {
            Request::Start(r) => r.request_id,
            Request::Stop(r)
            | Request::Restart(r)
            | Request::Reload(r)
            | Request::Delete(r)
            | Request::List(r) => r.request_id,
            Request::Logs(r) => r.request_id,
            Request::Send(r) => r.request_id,
            Request::Signal(r) => r.request_id,
        }
    }

    /// The body as JSON bytes.
    pub fn to_body(&self) -> Vec<u8> {
        match self {
            Request::Start(r) => body_of(r),
            Request::Stop(r)
            | Request::Restart(r)
            | Request::Reload(r)
            | Request::Delete(r)
            | Request::List(r) => body_of(r),
            Request::Logs(r) => body_of(r),
            Request::Send(r) => body_of(r),
            Request::Signal(r) => body_of(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(Target::parse("all").unwrap(), Target::All);
        assert_eq!(Target::parse("3").unwrap(), Target::Id(3));
        assert_eq!(
            Target::parse("ns/api").unwrap(),
            Target::Name {
                namespace: Some("ns".into()),
                name: "api".into()
            }
        );
        assert!(Target::parse("a.b").is_err());
        assert!(Target::parse("_x/api").is_err());
        assert!(Target::parse("").is_err());
        for t in ["all", "3", "api", "ns/api"] {
            let v = serde_json::to_value(Target::parse(t).unwrap()).unwrap();
            assert_eq!(v, serde_json::json!(t));
            let back: Target = serde_json::from_value(v).unwrap();
            assert_eq!(back.to_string(), t);
        }
        let n: Target = serde_json::from_str("7").unwrap();
        assert_eq!(n, Target::Id(7));
    }

    #[test]
    fn env_is_hidden_from_debug() {
        let mut s = AppSpec::new("api", "/srv/app.js");
        s.env.insert("SECRET".into(), "hunter2".into());
        let req = Request::from(StartRequest {
            request_id: Uuid::nil(),
            app: s,
            force: false,
        });
        assert!(!format!("{req:?}").contains("hunter2"));
    }

    #[test]
    fn parse_errors_are_precise() {
        let e = Request::parse("start", b"{\"request_id\": 5}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.starts_with("malformed 'start' request:"), "{e}");
        let e = Request::parse("launch", b"{}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownVerb);
        let r = Request::parse(
            "stop",
            br#"{"request_id":"00000000-0000-0000-0000-000000000000","target":"api"}"#,
        )
        .unwrap();
        assert_eq!(r.verb(), "stop");
    }
}
