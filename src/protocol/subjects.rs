//! Every NATS subject Flotilla uses is built here, from one [`Subjects`] value made of the
//! configured prefix; the parser sits beside the builders, with a round-trip test.
//!
//! Event plane: `<prefix>.<namespace>.<name>.<type>` and `<prefix>._fleet.<host>.host:<kind>`.
//! Control plane: `<prefix>ctl.agent.<host>.<verb>` and `<prefix>ctl.api.<verb>`.

use super::names::{self, NameError, NameKind};

/// The token that stands where a namespace would for host subjects.
pub const FLEET_TOKEN: &str = "_fleet";

/// Subject types of the event plane that Flotilla itself emits.
pub mod kind {
    /// A worker message that is not a valid `{type, data}` (pm2 `process:msg`).
    pub const PROCESS_MSG: &str = "process:msg";
    /// Lifecycle events.
    pub const PROCESS_EVENT: &str = "process:event";
    /// One stdout line.
    pub const LOG_OUT: &str = "log:out";
    /// One stderr line.
    pub const LOG_ERR: &str = "log:err";
    /// Host heartbeat.
    pub const HEARTBEAT: &str = "host:heartbeat";
    /// Host state change.
    pub const HOST_EVENT: &str = "host:event";
}

/// A validated `(namespace, name)` pair: the only way to name an app in a subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppKey {
    namespace: String,
    name: String,
}

impl AppKey {
    /// Validates both parts.
    pub fn new(namespace: &str, name: &str) -> Result<Self, NameError> {
        names::validate(NameKind::Namespace, namespace)?;
        names::validate(NameKind::App, name)?;
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The app name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated host id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostId(String);

impl HostId {
    /// Validates a host id.
    pub fn new(host: &str) -> Result<Self, NameError> {
        names::validate(NameKind::Host, host)?;
        Ok(Self(host.to_string()))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A worker-chosen message type that passed [`names::is_valid_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgType<'a>(&'a str);

impl<'a> MsgType<'a> {
    /// `Some` only for a valid token.
    pub fn new(t: &'a str) -> Option<Self> {
        names::is_valid_type(t).then_some(Self(t))
    }
    /// The type as text.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// The subject builder, made once from the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    ctl: String,
}

/// A subject taken apart by [`Subjects::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// `<prefix>.<ns>.<name>.<type>`
    App {
        /// namespace
        namespace: &'a str,
        /// app name
        name: &'a str,
        /// message type (`process:msg`, `log:out`, a worker type, ...)
        kind: &'a str,
    },
    /// `<prefix>._fleet.<host>.<kind>`
    Host {
        /// host id
        host: &'a str,
        /// `host:heartbeat` or `host:event`
        kind: &'a str,
    },
    /// `<prefix>ctl.agent.<host>.<verb>`
    AgentCtl {
        /// host id
        host: &'a str,
        /// verb
        verb: &'a str,
    },
    /// `<prefix>ctl.api.<verb>`
    Api {
        /// verb
        verb: &'a str,
    },
}

impl Subjects {
    /// The default prefix, `pm`.
    pub const DEFAULT_PREFIX: &'static str = "pm";

    /// Builds the value; the prefix must be a valid name token (it becomes the first token).
    pub fn new(prefix: &str) -> Result<Self, NameError> {
        names::validate(NameKind::Namespace, prefix)?;
        Ok(Self {
            prefix: prefix.to_string(),
            ctl: format!("{prefix}ctl"),
        })
    }

    /// The event-plane prefix (`pm`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `pm.<ns>.<name>.` — callers append one valid type token (see [`Self::app`]).
    pub fn app_prefix(&self, app: &AppKey) -> String {
        format!("{}.{}.{}.", self.prefix, app.namespace, app.name)
    }

    /// `pm.<ns>.<name>.<kind>` for one of the [`kind`] constants or a validated type.
    pub fn app(&self, app: &AppKey, t: MsgType<'_>) -> String {
        format!("{}{}", self.app_prefix(app), t.as_str())
    }

    /// `pm.<ns>.<name>.process:msg`
    pub fn process_msg(&self, app: &AppKey) -> String {
        self.app_fixed(app, kind::PROCESS_MSG)
    }
    /// `pm.<ns>.<name>.process:event`
    pub fn process_event(&self, app: &AppKey) -> String {
        self.app_fixed(app, kind::PROCESS_EVENT)
    }
    /// `pm.<ns>.<name>.log:out`
    pub fn log_out(&self, app: &AppKey) -> String {
        self.app_fixed(app, kind::LOG_OUT)
    }
    /// `pm.<ns>.<name>.log:err`
    pub fn log_err(&self, app: &AppKey) -> String {
        self.app_fixed(app, kind::LOG_ERR)
    }
    fn app_fixed(&self, app: &AppKey, k: &'static str) -> String {
        format!("{}{}", self.app_prefix(app), k)
    }

    /// `pm._fleet.<host>.host:heartbeat`
    pub fn heartbeat(&self, host: &HostId) -> String {
        format!(
            "{}.{FLEET_TOKEN}.{}.{}",
            self.prefix,
            host.0,
            kind::HEARTBEAT
        )
    }
    /// `pm._fleet.<host>.host:event`
    pub fn host_event(&self, host: &HostId) -> String {
        format!(
            "{}.{FLEET_TOKEN}.{}.{}",
            self.prefix,
            host.0,
            kind::HOST_EVENT
        )
    }
    /// `pm.>`: everything on the event plane.
    pub fn all_events(&self) -> String {
        format!("{}.>", self.prefix)
    }
    /// `pm._fleet.*.host:heartbeat`: every host's heartbeats (the controller's fleet view).
    pub fn all_heartbeats(&self) -> String {
        format!("{}.{FLEET_TOKEN}.*.{}", self.prefix, kind::HEARTBEAT)
    }
    /// `pm._fleet.*.host:event`: every host's `online`/`offline`.
    pub fn all_host_events(&self) -> String {
        format!("{}.{FLEET_TOKEN}.*.{}", self.prefix, kind::HOST_EVENT)
    }
    /// `pm.*.*.process:event`: every app's lifecycle events.
    pub fn all_process_events(&self) -> String {
        format!("{}.*.*.{}", self.prefix, kind::PROCESS_EVENT)
    }
    /// Every message of the apps `t` names: `pm.<ns>.<name>.*`, `pm.*.<name>.*` for a name in
    /// any namespace, `pm.*.*.*` for `all` or a pm_id (whose app the subject does not carry).
    pub fn target_wildcard(&self, t: &super::control::Target) -> String {
        use super::control::Target;
        match t {
            Target::Name {
                namespace: Some(ns),
                name,
            } => format!("{}.{ns}.{name}.*", self.prefix),
            Target::Name {
                namespace: None,
                name,
            } => format!("{}.*.{name}.*", self.prefix),
            Target::All | Target::Id(_) => format!("{}.*.*.*", self.prefix),
        }
    }

    /// `pmctl.agent.<host>.<verb>`
    pub fn agent_verb(&self, host: &HostId, verb: &str) -> String {
        format!("{}.agent.{}.{verb}", self.ctl, host.0)
    }
    /// `pmctl.agent.<host>.*`: what an agent subscribes to.
    pub fn agent_wildcard(&self, host: &HostId) -> String {
        format!("{}.agent.{}.*", self.ctl, host.0)
    }
    /// `pmctl.api.<verb>`: one controller of the queue group answers.
    pub fn api(&self, verb: &str) -> String {
        format!("{}.api.{verb}", self.ctl)
    }
    /// `pmctl.controller.serving`: a controller says it serves the API, on each (re)connection
    /// to NATS, after its subscriptions were sent.
    pub fn controller_serving(&self) -> String {
        format!("{}.controller.serving", self.ctl)
    }
    /// `pmctl.controllers.<verb>`: every controller answers (`info`).
    pub fn controllers(&self, verb: &str) -> String {
        format!("{}.controllers.{verb}", self.ctl)
    }

    /// Takes a subject apart; `None` for anything that is not exactly one of ours.
    pub fn parse<'a>(&self, subject: &'a str) -> Option<Parsed<'a>> {
        let mut t = subject.split('.');
        let root = t.next()?;
        let parsed = if root == self.prefix {
            let a = t.next()?;
            let b = t.next()?;
            let c = t.next()?;
            if a == FLEET_TOKEN {
                names::validate(NameKind::Host, b).ok()?;
                if c != kind::HEARTBEAT && c != kind::HOST_EVENT {
                    return None;
                }
                Parsed::Host { host: b, kind: c }
            } else {
                names::validate(NameKind::Namespace, a).ok()?;
                names::validate(NameKind::App, b).ok()?;
                names::is_valid_type(c).then_some(())?;
                Parsed::App {
                    namespace: a,
                    name: b,
                    kind: c,
                }
            }
        } else if root == self.ctl {
            match t.next()? {
                "agent" => {
                    let host = t.next()?;
                    names::validate(NameKind::Host, host).ok()?;
                    let verb = t.next()?;
                    names::validate(NameKind::App, verb).ok()?;
                    Parsed::AgentCtl { host, verb }
                }
                "api" | "controllers" => {
                    let verb = t.next()?;
                    names::validate(NameKind::App, verb).ok()?;
                    Parsed::Api { verb }
                }
                _ => return None,
            }
        } else {
            return None;
        };
        if t.next().is_some() {
            return None;
        }
        Some(parsed)
    }
}

/// True when `s` is a NATS subject we could publish to: non-empty tokens, no whitespace, no
/// wildcard tokens.
pub fn is_publishable(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|tok| {
            !tok.is_empty()
                && tok != "*"
                && tok != ">"
                && !tok.contains(['*', '>'])
                && !tok.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s() -> Subjects {
        Subjects::new("pm").unwrap()
    }

    #[test]
    fn builds_the_documented_subjects() {
        let app = AppKey::new("default", "api").unwrap();
        let host = HostId::new("web-1").unwrap();
        let s = s();
        assert_eq!(s.process_msg(&app), "pm.default.api.process:msg");
        assert_eq!(s.process_event(&app), "pm.default.api.process:event");
        assert_eq!(s.log_out(&app), "pm.default.api.log:out");
        assert_eq!(s.log_err(&app), "pm.default.api.log:err");
        assert_eq!(
            s.app(&app, MsgType::new("chat:new").unwrap()),
            "pm.default.api.chat:new"
        );
        assert_eq!(s.heartbeat(&host), "pm._fleet.web-1.host:heartbeat");
        assert_eq!(s.host_event(&host), "pm._fleet.web-1.host:event");
        assert_eq!(s.agent_verb(&host, "start"), "pmctl.agent.web-1.start");
        assert_eq!(s.agent_wildcard(&host), "pmctl.agent.web-1.*");
        assert_eq!(s.api("ls"), "pmctl.api.ls");
        assert_eq!(s.all_events(), "pm.>");
        assert_eq!(s.all_process_events(), "pm.*.*.process:event");
    }

    #[test]
    fn target_wildcards_cover_what_the_target_names() {
        use crate::protocol::control::Target;
        let s = s();
        let t = |x: &str| s.target_wildcard(&Target::parse(x).unwrap());
        assert_eq!(t("prod/api"), "pm.prod.api.*");
        assert_eq!(t("api"), "pm.*.api.*");
        assert_eq!(t("all"), "pm.*.*.*");
        assert_eq!(t("7"), "pm.*.*.*");
        for k in [kind::LOG_OUT, kind::PROCESS_EVENT] {
            let subject = format!("pm.prod.api.{k}");
            assert!(matches!(
                s.parse(&subject),
                Some(Parsed::App { name: "api", .. })
            ));
        }
    }

    #[test]
    fn round_trip() {
        let app = AppKey::new("ns-1", "api_2").unwrap();
        let host = HostId::new("h").unwrap();
        let s = s();
        assert_eq!(
            s.parse(&s.process_msg(&app)),
            Some(Parsed::App {
                namespace: "ns-1",
                name: "api_2",
                kind: "process:msg"
            })
        );
        assert_eq!(
            s.parse(&s.heartbeat(&host)),
            Some(Parsed::Host {
                host: "h",
                kind: "host:heartbeat"
            })
        );
        assert_eq!(
            s.parse(&s.agent_verb(&host, "list")),
            Some(Parsed::AgentCtl {
                host: "h",
                verb: "list"
            })
        );
        assert_eq!(
            s.parse(&s.api("start")),
            Some(Parsed::Api { verb: "start" })
        );
        assert_eq!(
            s.parse(&s.controllers("info")),
            Some(Parsed::Api { verb: "info" })
        );
        assert_eq!(s.parse("pm.a.b.c.d"), None);
        assert_eq!(s.parse("pm.a.b"), None);
        assert_eq!(s.parse("other.a.b.c"), None);
        assert_eq!(s.parse("pm._fleet.h.other"), None);
        assert_eq!(s.parse("pmctl.agent.h.start.extra"), None);
    }

    /// True when `subject` matches the NATS filter `filter` (`*` one token, `>` the rest).
    fn matches(filter: &str, subject: &str) -> bool {
        let mut s = subject.split('.');
        for f in filter.split('.') {
            match (f, s.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (f, Some(t)) if f == t => {}
                _ => return false,
            }
        }
        s.next().is_none()
    }

    #[test]
    fn wildcards_match_what_they_stand_for() {
        let s = Subjects::new("acme").unwrap();
        let app = AppKey::new("ns", "api").unwrap();
        let host = HostId::new("web-1").unwrap();
        assert_eq!(s.all_heartbeats(), "acme._fleet.*.host:heartbeat");
        assert_eq!(s.all_host_events(), "acme._fleet.*.host:event");
        assert_eq!(s.all_process_events(), "acme.*.*.process:event");
        assert!(matches(&s.all_heartbeats(), &s.heartbeat(&host)));
        assert!(matches(&s.all_host_events(), &s.host_event(&host)));
        assert!(matches(&s.all_process_events(), &s.process_event(&app)));
        assert!(matches(&s.all_events(), &s.process_event(&app)));
        // Each takes only its own kind.
        assert!(!matches(&s.all_heartbeats(), &s.host_event(&host)));
        assert!(!matches(&s.all_host_events(), &s.heartbeat(&host)));
        assert!(!matches(&s.all_process_events(), &s.process_msg(&app)));
        assert!(!matches(&s.all_process_events(), &s.log_out(&app)));
        // Host subjects have the same shape as app ones (`_fleet` stands for the namespace);
        // no host kind is `process:event`, so the process filter takes none of them.
        assert!(!matches(&s.all_process_events(), &s.heartbeat(&host)));
        // Another prefix's subjects are not ours.
        let other = Subjects::new("pm").unwrap();
        assert!(!matches(
            &s.all_process_events(),
            &other.process_event(&app)
        ));
    }

    #[test]
    fn custom_prefix() {
        let s = Subjects::new("acme").unwrap();
        let app = AppKey::new("default", "api").unwrap();
        assert_eq!(s.process_msg(&app), "acme.default.api.process:msg");
        assert_eq!(s.api("ls"), "acmectl.api.ls");
        assert!(Subjects::new("a.b").is_err());
        assert!(Subjects::new("$SYS").is_err());
    }

    #[test]
    fn publishable() {
        assert!(is_publishable("pm.default.api.process:msg"));
        assert!(!is_publishable("pm.*.api"));
        assert!(!is_publishable("pm.>"));
        assert!(!is_publishable("pm..a"));
        assert!(!is_publishable("pm.a b"));
        assert!(!is_publishable(""));
    }
}
