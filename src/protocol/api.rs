//! The controller's API (`pmctl.api.<verb>`): one [`ApiRequest`] enum, one struct per verb,
//! parsed once where the request arrives. The CLI builds the same values, so both sides agree
//! on every verb and body.

use super::app::AppSpec;
use super::control::{
    LogsRequest, SendRequest, SignalRequest, Target, TargetRequest, TargetVerb, body_of, parse_body,
};
use super::error::{ControlError, ErrorKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The verbs the controller answers.
pub const API_VERBS: &[&str] = &[
    "start", "stop", "restart", "reload", "delete", "scale", "ls", "send", "signal", "logs", "info",
];

/// `pmctl.api.start`: place an app's instances on the fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiStartRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// The app (`instances` is the total across the fleet).
    pub app: AppSpec,
    /// Only these hosts (`--host`, repeatable); empty means any live host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Only hosts with these labels (`--label k=v`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Apply this spec to the app when it exists (restarting what changed, scaling to
    /// `instances`) instead of refusing: pm2 `-f`, and what an ecosystem file does.
    #[serde(default)]
    pub force: bool,
}

/// `pmctl.api.scale`: set an app's instance count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleRequest {
    /// Idempotency key.
    pub request_id: Uuid,
    /// The app: `name` or `ns/name`.
    pub app: Target,
    /// The new total across the fleet (ignored when `change` is set).
    #[serde(default)]
    pub instances: u32,
    /// A change of the current count instead (`scale api +2` is `Some(2)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<i64>,
}

/// `pmctl.api.info` (also sent to every controller): who answers, and the hosts it sees.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InfoRequest {
    /// Idempotency key (optional: `info` changes nothing).
    #[serde(default)]
    pub request_id: Option<Uuid>,
}

/// A request to the controller; the verb comes from the subject.
#[derive(Debug, Clone)]
pub enum ApiRequest {
    /// `start`
    Start(Box<ApiStartRequest>),
    /// `scale`
    Scale(ScaleRequest),
    /// `stop`, `restart`, `reload`, `delete`
    Targeted(TargetVerb, TargetRequest),
    /// `ls`
    Ls(TargetRequest),
    /// `send`
    Send(SendRequest),
    /// `signal`
    Signal(SignalRequest),
    /// `logs`
    Logs(LogsRequest),
    /// `info`
    Info(InfoRequest),
}

impl From<ApiStartRequest> for ApiRequest {
    fn from(r: ApiStartRequest) -> Self {
        ApiRequest::Start(Box::new(r))
    }
}
impl From<ScaleRequest> for ApiRequest {
    fn from(r: ScaleRequest) -> Self {
        ApiRequest::Scale(r)
    }
}
impl From<SendRequest> for ApiRequest {
    fn from(r: SendRequest) -> Self {
        ApiRequest::Send(r)
    }
}
impl From<SignalRequest> for ApiRequest {
    fn from(r: SignalRequest) -> Self {
        ApiRequest::Signal(r)
    }
}
impl From<LogsRequest> for ApiRequest {
    fn from(r: LogsRequest) -> Self {
        ApiRequest::Logs(r)
    }
}

impl ApiRequest {
    /// Parses a request body for `verb`; errors say what is wrong and where.
    pub fn parse(verb: &str, body: &[u8]) -> Result<ApiRequest, ControlError> {
        if let Some(v) = TargetVerb::from_verb(verb) {
            return Ok(ApiRequest::Targeted(v, parse_body(verb, body)?));
        }
        Ok(match verb {
            "start" => ApiRequest::Start(parse_body(verb, body)?),
            "scale" => ApiRequest::Scale(parse_body(verb, body)?),
            "ls" => ApiRequest::Ls(parse_body(verb, body)?),
            "send" => ApiRequest::Send(parse_body(verb, body)?),
            "signal" => ApiRequest::Signal(parse_body(verb, body)?),
            "logs" => ApiRequest::Logs(parse_body(verb, body)?),
            // `info` changes nothing: any body is answered, with its id when it has one.
            "info" => ApiRequest::Info(serde_json::from_slice(body).unwrap_or_default()),
            other => {
                return Err(ControlError::new(
                    ErrorKind::UnknownVerb,
                    format!(
                        "unknown verb '{other}': the controller answers {}",
                        API_VERBS.join(", ")
                    ),
                ));
            }
        })
    }

    /// The verb (subject token).
    pub fn verb(&self) -> &'static str {
        match self {
            ApiRequest::Start(_) => "start",
            ApiRequest::Scale(_) => "scale",
            ApiRequest::Targeted(v, _) => v.as_str(),
            ApiRequest::Ls(_) => "ls",
            ApiRequest::Send(_) => "send",
            ApiRequest::Signal(_) => "signal",
            ApiRequest::Logs(_) => "logs",
            ApiRequest::Info(_) => "info",
        }
    }

    /// The request id (`info` may have none).
    pub fn request_id(&self) -> Option<Uuid> {
        Some(match self {
            ApiRequest::Start(r) => r.request_id,
            ApiRequest::Scale(r) => r.request_id,
            ApiRequest::Targeted(_, r) | ApiRequest::Ls(r) => r.request_id,
            ApiRequest::Send(r) => r.request_id,
            ApiRequest::Signal(r) => r.request_id,
            ApiRequest::Logs(r) => r.request_id,
            ApiRequest::Info(r) => return r.request_id,
        })
    }

    /// The body as JSON bytes.
    pub fn to_body(&self) -> Vec<u8> {
        match self {
            ApiRequest::Start(r) => body_of(r),
            ApiRequest::Scale(r) => body_of(r),
            ApiRequest::Targeted(_, r) | ApiRequest::Ls(r) => body_of(r),
            ApiRequest::Send(r) => body_of(r),
            ApiRequest::Signal(r) => body_of(r),
            ApiRequest::Logs(r) => body_of(r),
            ApiRequest::Info(r) => body_of(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_round_trips() {
        let t = TargetRequest::new(Target::parse("api").unwrap());
        let reqs: Vec<ApiRequest> = vec![
            ApiStartRequest {
                request_id: Uuid::new_v4(),
                app: AppSpec::new("api", "/srv/app.js"),
                hosts: vec!["web-1".into()],
                labels: Default::default(),
                force: false,
            }
            .into(),
            ScaleRequest {
                request_id: Uuid::new_v4(),
                app: Target::parse("api").unwrap(),
                instances: 0,
                change: Some(2),
            }
            .into(),
            ApiRequest::Targeted(TargetVerb::Stop, t.clone()),
            ApiRequest::Targeted(TargetVerb::Restart, t.clone()),
            ApiRequest::Targeted(TargetVerb::Reload, t.clone()),
            ApiRequest::Targeted(TargetVerb::Delete, t.clone()),
            ApiRequest::Ls(t),
            ApiRequest::Info(InfoRequest::default()),
        ];
        for r in reqs {
            let back = ApiRequest::parse(r.verb(), &r.to_body()).unwrap();
            assert_eq!(back.verb(), r.verb());
            assert_eq!(back.request_id(), r.request_id());
        }
        for v in API_VERBS.iter().filter(|v| **v != "info") {
            let e = ApiRequest::parse(v, b"{").unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{v}");
        }
    }

    #[test]
    fn an_unknown_verb_is_refused_not_listed() {
        let e = ApiRequest::parse("launch", b"{}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownVerb);
        assert!(e.message.contains("start, stop"), "{e}");
        for body in [&b""[..], b"{", br#"{"request_id": 5}"#] {
            assert!(matches!(
                ApiRequest::parse("info", body).unwrap(),
                ApiRequest::Info(InfoRequest { request_id: None })
            ));
        }
    }
}
