//! Humane durations: `500ms`, `10s`, `5m`, `1h`, or a bare number of milliseconds (pm2's unit).
//! On the wire they are written as milliseconds.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// Longest accepted duration, in ms (about 31,700 years): keeps arithmetic on it far from
/// overflow.
pub const MAX_MS: u64 = 1_000_000_000_000_000;

/// Parses `500ms`, `1.5s`, `10s`, `5m`, `2h`, `1d`, or a bare integer of milliseconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an empty duration: write e.g. 500ms, 10s or 5m".into());
    }
    if let Ok(ms) = t.parse::<u64>() {
        if ms > MAX_MS {
            return Err(format!("'{s}' is out of range"));
        }
        return Ok(Duration::from_millis(ms));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: write e.g. 500ms, 10s or 5m"))?;
    let mult_ms = match unit.trim() {
        "ms" => 1.0,
        "s" | "sec" | "secs" => 1000.0,
        "m" | "min" | "mins" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        other => {
            return Err(format!(
                "'{s}' has the unknown unit '{other}': use ms, s, m, h or d"
            ));
        }
    };
    let ms = n * mult_ms;
    if !ms.is_finite() || !(0.0..=MAX_MS as f64).contains(&ms) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_millis(ms.round() as u64))
}

/// Serde helpers for `Duration` fields: accept a number (ms) or a humane string; write ms.
pub mod ms {
    use super::*;

    /// Writes milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    /// Reads a number of ms or a humane string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(u64),
            F(f64),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) if n <= MAX_MS => Ok(Duration::from_millis(n)),
            Either::N(n) => Err(serde::de::Error::custom(format!(
                "{n} ms is out of range (at most {MAX_MS})"
            ))),
            Either::F(f) if f.is_finite() && (0.0..=MAX_MS as f64).contains(&f) => {
                Ok(Duration::from_millis(f as u64))
            }
            Either::F(f) => Err(serde::de::Error::custom(format!("{f} is not a duration"))),
            Either::S(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// The same for `Option<Duration>`.
pub mod opt_ms {
    use super::*;

    /// Writes milliseconds or null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    /// Reads null, a number of ms, or a humane string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::ms")] Duration);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humane() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1600").unwrap(), Duration::from_millis(1600));
        assert!(parse("5 parsecs").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("s").is_err());
    }
}
