//! What to run: pm2's app options ([`AppSpec`], names and defaults as in pm2 7), and the one
//! validation every role applies to them (the CLI before it asks, the controller before it
//! writes the desired state, the agent before it spawns).

use super::duration;
use super::error::{ControlError, ErrorKind};
use super::names::{self, NameKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// Most instances one app may have (the fleet total; a host's share is never more).
pub const MAX_INSTANCES: u32 = 16_384;

/// Stop exit codes: pm2 accepts a number or a list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExitCodes(pub Vec<i32>);

impl<'de> Deserialize<'de> for ExitCodes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum One {
            N(i32),
            S(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(One),
            Many(Vec<One>),
        }
        let conv = |o: One| -> Result<i32, D::Error> {
            match o {
                One::N(n) => Ok(n),
                One::S(s) => s.trim().parse().map_err(|_| {
                    serde::de::Error::custom(format!("stop_exit_codes: '{s}' is not an exit code"))
                }),
            }
        };
        Ok(ExitCodes(match Either::deserialize(d)? {
            Either::One(o) => vec![conv(o)?],
            Either::Many(v) => v.into_iter().map(conv).collect::<Result<_, _>>()?,
        }))
    }
}

fn default_namespace() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}
fn default_min_uptime() -> Duration {
    Duration::from_millis(1000)
}
fn default_max_restarts() -> u32 {
    16
}
fn default_kill_timeout() -> Duration {
    Duration::from_millis(1600)
}
fn default_listen_timeout() -> Duration {
    Duration::from_millis(3000)
}
fn default_kill_signal() -> String {
    "SIGINT".into()
}
fn default_watch_delay() -> Duration {
    Duration::from_millis(1000)
}
fn default_instance_var() -> String {
    "NODE_APP_INSTANCE".into()
}

/// What to run: pm2's app options (names and defaults as in pm2 7).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    /// App name (`[A-Za-z0-9_-]+`).
    pub name: String,
    /// Namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The script or binary; absolute, or relative to `cwd`.
    pub script: PathBuf,
    /// Arguments after the script.
    #[serde(default)]
    pub args: Vec<String>,
    /// Interpreter; `None` picks from the extension, `"none"` execs the script directly.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Arguments for the interpreter (pm2 `node_args` / `interpreter_args`).
    #[serde(default, alias = "node_args")]
    pub interpreter_args: Vec<String>,
    /// Working directory (default: the script's folder).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Environment for the workers. Never written into events or logs.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Number of instances; `None` is one, in fork mode.
    #[serde(default)]
    pub instances: Option<u32>,
    /// `fork` or `cluster`; `None` applies pm2's rule (cluster for node with instances).
    #[serde(default)]
    pub exec_mode: Option<super::envelope::ExecMode>,
    /// Restart when the process exits (pm2 default true).
    #[serde(default = "default_true")]
    pub autorestart: bool,
    /// A run shorter than this counts as unstable (pm2 default 1000 ms).
    #[serde(default = "default_min_uptime", with = "duration::ms")]
    pub min_uptime: Duration,
    /// Unstable restarts before `errored` (pm2 default 16).
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Fixed delay before an automatic restart.
    #[serde(default, with = "duration::ms")]
    pub restart_delay: Duration,
    /// Exponential backoff base; overrides `restart_delay` when set.
    #[serde(default, with = "duration::opt_ms")]
    pub exp_backoff_restart_delay: Option<Duration>,
    /// Exit codes that mean "stopped on purpose, do not restart".
    #[serde(default)]
    pub stop_exit_codes: ExitCodes,
    /// Grace period between the kill signal and SIGKILL (pm2 default 1600 ms).
    #[serde(default = "default_kill_timeout", with = "duration::ms")]
    pub kill_timeout: Duration,
    /// Signal sent to stop (pm2: SIGINT).
    #[serde(default = "default_kill_signal")]
    pub kill_signal: String,
    /// Stop by sending the worker the `'shutdown'` message instead of the kill signal (pm2
    /// `shutdown_with_message`); SIGKILL still follows `kill_timeout`.
    #[serde(default)]
    pub shutdown_with_message: bool,
    /// Signal the whole process group (pm2 `treekill`, default true); false signals the worker only.
    #[serde(default = "default_true")]
    pub treekill: bool,
    /// Online only after the worker sends `'ready'` (or `listen_timeout` passes).
    #[serde(default)]
    pub wait_ready: bool,
    /// How long to wait for `ready` (pm2 default 3000 ms).
    #[serde(default = "default_listen_timeout", with = "duration::ms")]
    pub listen_timeout: Duration,
    /// Name of the instance variable (pm2 `instance_var`).
    #[serde(default = "default_instance_var")]
    pub instance_var: String,
    /// Restart when RSS exceeds this many bytes.
    #[serde(default)]
    pub max_memory_restart: Option<u64>,
    /// The app's id; the agent makes one when absent.
    #[serde(default)]
    pub app_id: Option<Uuid>,
    /// pm_ids chosen by the controller, one per instance; the agent allocates when empty.
    #[serde(default)]
    pub pm_ids: Vec<u32>,
    /// Addresses the agent binds once and hands to every instance (`LISTEN_FDS`, fds from 3):
    /// `tcp://HOST:PORT`, `tcp://:PORT`, `unix:///path`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,
    /// Restart on this cron schedule (pm2 `cron_restart`, alias `cron`; local time; `"0"` is
    /// none).
    #[serde(default, alias = "cron", skip_serializing_if = "Option::is_none")]
    pub cron_restart: Option<String>,
    /// Restart when files change (pm2 `watch`: `true` for the working directory, or paths).
    #[serde(default, skip_serializing_if = "super::schedule::Watch::is_off")]
    pub watch: super::schedule::Watch,
    /// Globs of paths not watched, besides dot-files and `node_modules` (pm2 `ignore_watch`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_watch: Vec<String>,
    /// Quiet time after a change before the restart (pm2 `watch_delay`).
    #[serde(default = "default_watch_delay", with = "duration::ms")]
    pub watch_delay: Duration,
    /// Fleet-wide instance numbers (`NODE_APP_INSTANCE`), parallel to `pm_ids`; empty means
    /// 0, 1, ... in order (a host's share of a fleet app gets its numbers from the controller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_numbers: Vec<u32>,
}

impl fmt::Debug for AppSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSpec")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("script", &self.script)
            .field("args", &self.args)
            .field("interpreter", &self.interpreter)
            .field("cwd", &self.cwd)
            .field("env", &"hidden")
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

impl AppSpec {
    /// A spec with pm2's defaults for `script`, named `name`.
    pub fn new(name: &str, script: impl Into<PathBuf>) -> Self {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "script": script.into(),
        }))
        .expect("defaults always deserialise")
    }

    /// Checks what every role must refuse before acting: names, the instance count, the kill
    /// signal, the cron pattern and the listen addresses. The error says what and how to fix.
    pub fn validate(&self) -> Result<(), ControlError> {
        names::validate(NameKind::Namespace, &self.namespace)?;
        names::validate(NameKind::App, &self.name)?;
        // Every other error names the app: an ecosystem file has several.
        let app = |e: ControlError| {
            ControlError::new(e.kind, format!("app '{}': {}", self.name, e.message))
        };
        let n = self.instances.unwrap_or(1);
        if n == 0 || n > MAX_INSTANCES {
            return Err(app(ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "instances must be between 1 and {MAX_INSTANCES}, not {n} (the CLI turns 0 and 'max' into the CPU count)"
                ),
            )));
        }
        super::signals::parse(&self.kill_signal).map_err(|e| {
            app(ControlError::new(
                ErrorKind::InvalidValue,
                format!("kill_signal: {}", e.message),
            ))
        })?;
        if let Some(c) = &self.cron_restart {
            super::schedule::CronRestart::parse(c).map_err(app)?;
        }
        for a in &self.listen {
            super::listen::ListenAddr::parse(a).map_err(app)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_spec_has_pm2_defaults() {
        let s = AppSpec::new("api", "/srv/app.js");
        assert_eq!(s.namespace, "default");
        assert!(s.autorestart);
        assert_eq!(s.max_restarts, 16);
        assert_eq!(s.min_uptime, Duration::from_millis(1000));
        assert_eq!(s.kill_timeout, Duration::from_millis(1600));
        assert_eq!(s.listen_timeout, Duration::from_millis(3000));
        assert_eq!(s.kill_signal, "SIGINT");
        assert!(s.treekill);
        assert_eq!(s.exp_backoff_restart_delay, None);
        assert!(!format!("{s:?}").contains("env: {"));
    }

    #[test]
    fn durations_and_exit_codes_accept_pm2_forms() {
        let s: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "a", "script": "x.js", "min_uptime": "2s", "restart_delay": 250,
            "exp_backoff_restart_delay": "100ms", "stop_exit_codes": [0, "3"]
        }))
        .unwrap();
        assert_eq!(s.min_uptime, Duration::from_secs(2));
        assert_eq!(s.restart_delay, Duration::from_millis(250));
        assert_eq!(
            s.exp_backoff_restart_delay,
            Some(Duration::from_millis(100))
        );
        assert_eq!(s.stop_exit_codes, ExitCodes(vec![0, 3]));
        let one: ExitCodes = serde_json::from_str("2").unwrap();
        assert_eq!(one, ExitCodes(vec![2]));
    }

    #[test]
    fn one_validation_for_every_role() {
        let ok = AppSpec::new("api", "/srv/app.js");
        assert!(ok.validate().is_ok());
        let mut s = ok.clone();
        s.instances = Some(0);
        assert_eq!(s.validate().unwrap_err().kind, ErrorKind::InvalidValue);
        s.instances = Some(MAX_INSTANCES + 1);
        assert!(s.validate().unwrap_err().message.contains("between 1 and"));
        let mut s = ok.clone();
        s.kill_signal = "SIGNOPE".into();
        assert!(
            s.validate()
                .unwrap_err()
                .message
                .starts_with("app 'api': kill_signal:")
        );
        let mut s = ok.clone();
        s.cron_restart = Some("every day".into());
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.listen = vec!["udp://:53".into()];
        assert!(s.validate().is_err());
        let mut s = ok;
        s.name = "a.b".into();
        assert_eq!(s.validate().unwrap_err().kind, ErrorKind::InvalidName);
    }
}
