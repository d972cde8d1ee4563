//! Settings: defaults < file (`--config F`, else `$FLOTILLA_HOME/flotilla.toml`) < `FLOTILLA_*`
//! environment < flags, through the `config` crate. Unknown keys and bad values are refused with
//! the source, the key and the expected form.

use crate::protocol::duration;
use crate::protocol::names::{self, NameKind};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, a variable or a flag holds something we cannot use.
    #[error("{source_name}: {message}")]
    Invalid {
        /// Where: the file path, "the environment" or "the command line".
        source_name: String,
        /// What and how to fix it.
        message: String,
    },
}

fn invalid(source_name: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        source_name: source_name.into(),
        message: message.into(),
    }
}

/// TLS files for the NATS connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// CA certificate (PEM) to trust.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
}

/// How to reach NATS.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated. Unset: the CLI uses the local stack.
    pub url: Option<String>,
    /// Credentials file (JWT + nkey seed).
    pub creds: Option<PathBuf>,
    /// User for user/password auth (with `password`).
    pub user: Option<String>,
    /// Password for user/password auth; never logged.
    pub password: Option<String>,
    /// Token for token auth; never logged.
    pub token: Option<String>,
    /// The nkey seed (`SU...`) for nkey auth; never logged.
    pub nkey: Option<String>,
    /// TLS: the CA to trust, and a client certificate and key (together).
    pub tls: TlsSettings,
    /// The port the local stack's nats-server takes when it is free (unset: 4222); 0: any free
    /// port. Only for the local stack (`url` unset).
    pub local_port: Option<u16>,
}

impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hide = |o: &Option<String>| o.as_ref().map(|_| "hidden");
        f.debug_struct("NatsSettings")
            .field("url", &self.url)
            .field("creds", &self.creds)
            .field("user", &self.user)
            .field("password", &hide(&self.password))
            .field("token", &hide(&self.token))
            .field("nkey", &hide(&self.nkey))
            .field("tls", &self.tls)
            .field("local_port", &self.local_port)
            .finish()
    }
}

/// The relay between workers and NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    /// Messages the relay queue holds before it drops (and counts) new ones.
    pub buffer: usize,
    /// Bytes the relay queue holds before it drops (and counts) new ones.
    pub buffer_bytes: usize,
    /// Largest worker message relayed, bytes; unset means the server's `max_payload`.
    pub max_message: Option<usize>,
    /// How long a worker message may wait for room in a full queue (the worker's channel is
    /// read more slowly meanwhile) before it is dropped and counted.
    #[serde(with = "duration::ms")]
    pub max_wait: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            buffer: 16_384,
            buffer_bytes: 32 << 20,
            max_message: None,
            max_wait: Duration::from_millis(250),
        }
    }
}

/// The optional JetStream replay stream over `pm.>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// On for the local stack, off for fleets unless set.
    pub enabled: Option<bool>,
    /// Oldest message kept.
    #[serde(with = "duration::opt_ms")]
    pub max_age: Option<Duration>,
    /// Largest size, bytes.
    pub max_bytes: Option<u64>,
}

/// Every setting. See `config/flotilla.toml` for the documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How to reach NATS: URL, auth, TLS, the local stack's port.
    pub nats: NatsSettings,
    /// Home directory (logs, local state); default `~/.flotilla`.
    pub home: PathBuf,
    /// This host's id; default the hostname, sanitised.
    pub host_id: String,
    /// Host labels, `k=v` (used by placement).
    #[serde(deserialize_with = "labels")]
    pub labels: BTreeMap<String, String>,
    /// First token of every event subject.
    pub subject_prefix: String,
    /// How often agents publish heartbeats.
    #[serde(with = "duration::ms")]
    pub heartbeat_interval: Duration,
    /// Silence after which the controller declares a host lost.
    #[serde(with = "duration::ms")]
    pub host_lost_after: Duration,
    /// The relay queue between workers and NATS: its bounds and waits.
    pub relay: RelaySettings,
    /// The optional JetStream replay stream over `pm.>` (not used yet).
    pub stream: StreamSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nats: NatsSettings::default(),
            home: default_home(),
            host_id: default_host_id(),
            labels: BTreeMap::new(),
            subject_prefix: "pm".into(),
            heartbeat_interval: Duration::from_secs(1),
            host_lost_after: Duration::from_secs(10),
            relay: RelaySettings::default(),
            stream: StreamSettings::default(),
        }
    }
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".flotilla")
}

fn default_host_id() -> String {
    let raw = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    names::sanitise_host_id(&raw)
}

/// Parses `k=v,k=v`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("label '{part}' is not of the form key=value"))?;
        if k.trim().is_empty() {
            return Err(format!("label '{part}' has an empty key"));
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Map(BTreeMap<String, String>),
        S(String),
    }
    match Either::deserialize(d)? {
        Either::Map(m) => Ok(m),
        Either::S(s) => parse_labels(&s).map_err(serde::de::Error::custom),
    }
}

/// Short environment names for common keys (DESIGN.md, Configuration).
const SHORT_ENV: &[(&str, &str)] = &[
    ("FLOTILLA_NATS_URL", "nats.url"),
    ("FLOTILLA_HOME", "home"),
    ("FLOTILLA_HOST_ID", "host_id"),
    ("FLOTILLA_LABELS", "labels"),
];

/// Environment variables that are not settings but are ours.
const NON_SETTING_ENV: &[&str] = &["FLOTILLA_CONFIG", "FLOTILLA_LOG"];

const TOP_LEVEL_KEYS: &[&str] = &[
    "nats",
    "home",
    "host_id",
    "labels",
    "subject_prefix",
    "heartbeat_interval",
    "host_lost_after",
    "relay",
    "stream",
];

/// Maps one `FLOTILLA_*` variable to a key, or `None` when it is not a setting.
fn env_key(var: &str) -> Option<Result<String, ConfigError>> {
    let rest = var.strip_prefix("FLOTILLA_")?;
    if NON_SETTING_ENV.contains(&var) {
        return None;
    }
    if let Some((_, key)) = SHORT_ENV.iter().find(|(v, _)| *v == var) {
        return Some(Ok((*key).to_string()));
    }
    let key = rest.to_ascii_lowercase().replace("__", ".");
    let top = key.split('.').next().unwrap_or_default();
    if TOP_LEVEL_KEYS.contains(&top) {
        Some(Ok(key))
    } else {
        Some(Err(invalid(
            "the environment",
            format!(
                "{var} is not a Flotilla setting: write FLOTILLA_ + the key in capitals with '.' as '__' \
                 (e.g. FLOTILLA_NATS__TLS__CA), or one of {}",
                SHORT_ENV
                    .iter()
                    .map(|(v, _)| *v)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )))
    }
}

/// Where settings come from, lowest precedence first (defaults are implied).
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `--config F`; `None` means `$FLOTILLA_HOME/flotilla.toml` (or `~/.flotilla/`), if present.
    pub file: Option<PathBuf>,
    /// The environment, as `(name, value)` pairs (pass `std::env::vars()`).
    pub env: Vec<(String, String)>,
    /// Flags, as `(key, value)`.
    pub flags: Vec<(String, String)>,
}

impl Sources {
    /// Sources from the process environment plus the given flags.
    pub fn from_process(file: Option<PathBuf>, flags: Vec<(String, String)>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            flags,
        }
    }
}

impl Settings {
    /// Loads settings from the given sources.
    pub fn load(src: &Sources) -> Result<Settings, ConfigError> {
        use config::{Config, File, FileFormat};

        // Environment first, to know the home (and so the default file) and FLOTILLA_CONFIG.
        let mut env_overrides = Vec::new();
        let mut config_env = None;
        for (k, v) in &src.env {
            if k == "FLOTILLA_CONFIG" {
                config_env = Some(PathBuf::from(v));
            }
            if let Some(key) = env_key(k) {
                env_overrides.push((key?, v.clone(), k.clone()));
            }
        }
        let home_override = src
            .flags
            .iter()
            .rev()
            .find(|(k, _)| k == "home")
            .map(|(_, v)| PathBuf::from(v))
            .or_else(|| {
                env_overrides
                    .iter()
                    .find(|(k, _, _)| k == "home")
                    .map(|(_, v, _)| PathBuf::from(v))
            });
        let (file, required) = match (&src.file, config_env) {
            (Some(f), _) => (f.clone(), true),
            (None, Some(f)) => (f, true),
            (None, None) => (
                home_override
                    .clone()
                    .unwrap_or_else(default_home)
                    .join("flotilla.toml"),
                false,
            ),
        };
        let file_name = file.display().to_string();
        if required && !file.exists() {
            return Err(invalid(
                &file_name,
                "no such file: check the --config path (or FLOTILLA_CONFIG)",
            ));
        }

        let mut b = Config::builder();
        if file.exists() {
            b = b.add_source(File::from(file.as_path()).format(FileFormat::Toml));
        }
        let file_cfg = b
            .build()
            .map_err(|e| invalid(&file_name, format!("{e}: fix the syntax")))?;
        // Check the file alone first, so its errors name the file.
        let _: Settings = file_cfg
            .clone()
            .try_deserialize()
            .map_err(|e| invalid(&file_name, explain(e)))?;

        let mut b = Config::builder().add_source(file_cfg);
        for (key, value, var) in &env_overrides {
            b = b
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| invalid(format!("the environment ({var})"), e.to_string()))?;
        }
        let env_cfg = b
            .build()
            .map_err(|e| invalid("the environment", e.to_string()))?;
        let _: Settings = env_cfg
            .clone()
            .try_deserialize()
            .map_err(|e| invalid("the environment", explain(e)))?;

        let mut b = Config::builder().add_source(env_cfg);
        for (key, value) in &src.flags {
            b = b
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| invalid("the command line", e.to_string()))?;
        }
        let settings: Settings = b
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| invalid("the command line", explain(e)))?;
        settings.validate()
    }

    /// Checks values that serde cannot.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        names::validate(NameKind::Host, &self.host_id)
            .map_err(|e| invalid("host_id", format!("{e} (set host_id or FLOTILLA_HOST_ID)")))?;
        names::validate(NameKind::Namespace, &self.subject_prefix)
            .map_err(|e| invalid("subject_prefix", e.to_string()))?;
        if self.heartbeat_interval.is_zero() {
            return Err(invalid(
                "heartbeat_interval",
                "must be more than 0 (e.g. 1s)",
            ));
        }
        if self.relay.buffer < 64 {
            return Err(invalid("relay.buffer", "must be at least 64 messages"));
        }
        if self.relay.buffer_bytes < 64 << 10 {
            return Err(invalid(
                "relay.buffer_bytes",
                "must be at least 65536 bytes",
            ));
        }
        Ok(self)
    }

    /// The NATS URL, or the default local one.
    pub fn nats_url(&self) -> &str {
        self.nats.url.as_deref().unwrap_or("nats://127.0.0.1:4222")
    }

    /// Directory of per-process log files.
    pub fn log_dir(&self) -> PathBuf {
        self.home.join("logs")
    }
}

fn explain(e: config::ConfigError) -> String {
    let s = e.to_string();
    if s.contains("unknown field") {
        format!("{s}: remove it, or see config/flotilla.toml for the keys")
    } else {
        format!("{s}: see config/flotilla.toml for each key's form")
    }
}

/// Reads a path for messages; kept here so callers don't format paths differently.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(
        file: Option<&str>,
        env: &[(&str, &str)],
        flags: &[(&str, &str)],
    ) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = file.map(|text| {
            let p = dir.path().join("f.toml");
            std::fs::File::create(&p)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            p
        });
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        if !env.iter().any(|(k, _)| k == "FLOTILLA_HOME") {
            env.push(("FLOTILLA_HOME".into(), dir.path().display().to_string()));
        }
        Settings::load(&Sources {
            file: path,
            env,
            flags: flags
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        })
    }

    #[test]
    fn defaults() {
        let s = load(None, &[], &[]).unwrap();
        assert_eq!(s.subject_prefix, "pm");
        assert_eq!(s.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(s.host_lost_after, Duration::from_secs(10));
        assert_eq!(s.nats.url, None);
        names::validate(NameKind::Host, &s.host_id).unwrap();
    }

    #[test]
    fn precedence_file_env_flags() {
        let file = "host_id = \"from-file\"\nheartbeat_interval = \"2s\"\n[nats]\nurl = \"nats://file:1\"\n[labels]\nzone = \"a\"\n";
        let s = load(Some(file), &[], &[]).unwrap();
        assert_eq!(s.host_id, "from-file");
        assert_eq!(s.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(s.labels.get("zone").map(String::as_str), Some("a"));
        let s = load(
            Some(file),
            &[
                ("FLOTILLA_HOST_ID", "from-env"),
                ("FLOTILLA_NATS_URL", "nats://env:2"),
                ("FLOTILLA_NATS__TLS__CA", "/ca.pem"),
                ("FLOTILLA_HOST_LOST_AFTER", "30s"),
                ("FLOTILLA_LABELS", "zone=b,tier=web"),
                ("FLOTILLA_RELAY__BUFFER", "1000"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.host_id, "from-env");
        assert_eq!(s.nats.url.as_deref(), Some("nats://env:2"));
        assert_eq!(s.nats.tls.ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.host_lost_after, Duration::from_secs(30));
        assert_eq!(s.labels.get("tier").map(String::as_str), Some("web"));
        assert_eq!(s.relay.buffer, 1000);
        let s = load(
            Some(file),
            &[("FLOTILLA_HOST_ID", "from-env")],
            &[("host_id", "from-flag")],
        )
        .unwrap();
        assert_eq!(s.host_id, "from-flag");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_where() {
        let e = load(Some("hostid = \"x\"\n"), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml") && e.contains("hostid"), "{e}");
        let e = load(Some("heartbeat_interval = \"fast\"\n"), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml") && e.contains("fast"), "{e}");
        let e = load(Some("[nats\nurl=1"), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml"), "{e}");
        let e = load(None, &[("FLOTILLA_BOGUS", "1")], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FLOTILLA_BOGUS") && e.contains("not a Flotilla setting"),
            "{e}"
        );
        let e = load(None, &[("FLOTILLA_HOST_ID", "a.b")], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("host_id") && e.contains("'.'"), "{e}");
        let e = load(None, &[("FLOTILLA_LABELS", "novalue")], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn the_documented_default_file_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flotilla.toml");
        let s = Settings::load(&Sources {
            file: Some(path),
            env: vec![],
            flags: vec![],
        })
        .unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn secrets_are_hidden_from_debug() {
        let s = load(None, &[("FLOTILLA_NATS__PASSWORD", "hunter2")], &[]).unwrap();
        assert_eq!(s.nats.password.as_deref(), Some("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
