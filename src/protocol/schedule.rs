//! pm2's `cron_restart` patterns (5 fields, or 6 with seconds first; local time; `"0"` or an
//! empty pattern means none, as in pm2) and `watch` (restart when files change). Pure.

use super::error::{ControlError, ErrorKind};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::time::Duration;

/// A parsed `cron_restart` pattern.
#[derive(Debug, Clone)]
pub struct CronRestart(croner::Cron);

impl CronRestart {
    /// Parses a pattern; `None` for pm2's "no cron" values (`""`, `"0"`).
    pub fn parse(s: &str) -> Result<Option<CronRestart>, ControlError> {
        let t = s.trim();
        if t.is_empty() || t == "0" {
            return Ok(None);
        }
        croner::Cron::from_str(t).map(|c| Some(CronRestart(c))).map_err(|e| {
            ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "cron_restart '{s}' is not a cron pattern ({e}): write 5 fields (minute hour day month weekday, e.g. '0 3 * * *') or 6 with seconds first"
                ),
            )
        })
    }

    /// How long from `now` to the next occurrence (local time), if there is one.
    pub fn next_after(&self, now: chrono::DateTime<chrono::Local>) -> Option<Duration> {
        let next = self.0.find_next_occurrence(&now, false).ok()?;
        (next - now).to_std().ok()
    }
}

/// pm2's `watch`: `false`, `true` (the app's working directory), or paths to watch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Watch {
    /// No watching.
    #[default]
    Off,
    /// The working directory.
    Cwd,
    /// These paths (relative ones from the working directory).
    Paths(Vec<String>),
}

impl Watch {
    /// True when off.
    pub fn is_off(&self) -> bool {
        *self == Watch::Off
    }
}

impl Serialize for Watch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Watch::Off => s.serialize_bool(false),
            Watch::Cwd => s.serialize_bool(true),
            Watch::Paths(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Watch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            B(bool),
            One(String),
            Many(Vec<String>),
        }
        Ok(match Either::deserialize(d)? {
            Either::B(false) => Watch::Off,
            Either::B(true) => Watch::Cwd,
            Either::One(p) if p == "true" => Watch::Cwd,
            Either::One(p) if p == "false" || p.is_empty() => Watch::Off,
            Either::One(p) => Watch::Paths(vec![p]),
            Either::Many(v) if v.is_empty() => Watch::Off,
            Either::Many(v) => Watch::Paths(v),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cron_patterns_as_pm2_takes_them() {
        assert!(CronRestart::parse("0").unwrap().is_none());
        assert!(CronRestart::parse("").unwrap().is_none());
        let c = CronRestart::parse("0 3 * * *").unwrap().unwrap();
        let now = chrono::Local.with_ymd_and_hms(2026, 1, 1, 2, 0, 0).unwrap();
        assert_eq!(c.next_after(now), Some(Duration::from_secs(3600)));
        let every_second = CronRestart::parse("* * * * * *").unwrap().unwrap();
        assert_eq!(every_second.next_after(now), Some(Duration::from_secs(1)));
        let e = CronRestart::parse("every day").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidValue);
        assert!(e.message.contains("'0 3 * * *'"), "{e}");
    }

    #[test]
    fn watch_forms() {
        let w: Watch = serde_json::from_str("true").unwrap();
        assert_eq!(w, Watch::Cwd);
        let w: Watch = serde_json::from_str("false").unwrap();
        assert!(w.is_off());
        let w: Watch = serde_json::from_str(r#"["src", "config"]"#).unwrap();
        assert_eq!(w, Watch::Paths(vec!["src".into(), "config".into()]));
        let w: Watch = serde_json::from_str(r#""lib""#).unwrap();
        assert_eq!(w, Watch::Paths(vec!["lib".into()]));
        assert_eq!(serde_json::to_string(&Watch::Cwd).unwrap(), "true");
    }
}
