//! Classification of one line a worker wrote to its IPC channel (no I/O).
//!
//! pm2's bus rule: an object with a truthy `type` and a truthy `data` is emitted under its
//! `type`; anything else goes to `process:msg` as `raw`. Flotilla adds one condition: the
//! `type` must be a valid subject token (`[A-Za-z0-9_:-]+`), else the message goes to
//! `process:msg` as `raw` too, so no input ever makes a wildcard or an extra token.
//! Node's own channel messages (`{"cmd": "NODE_…"}`) are never relayed.

use super::subjects::MsgType;
use serde::Deserialize;
use serde_json::value::RawValue;

/// What a line turned out to be.
#[derive(Debug)]
pub enum Classified<'a> {
    /// `{type, data}` with a valid token type and truthy data: relayed to `pm.<ns>.<name>.<type>`.
    Typed {
        /// The subject token.
        ty: MsgType<'a>,
        /// The `data` member, as written.
        data: &'a RawValue,
    },
    /// Anything else that is valid JSON: relayed to `process:msg` with `raw`.
    Raw {
        /// The whole message.
        raw: &'a RawValue,
        /// The message is the string `"ready"` (pm2's `process.send('ready')`).
        ready: bool,
    },
    /// One of Node's internal messages (`cmd` starting with `NODE_`): handled, never relayed.
    NodeInternal {
        /// The `cmd` value, e.g. `NODE_HANDLE`.
        cmd: String,
        /// The whole message.
        raw: &'a RawValue,
    },
}

/// Why a line was not a message.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// Not valid UTF-8 JSON (serde's message says where).
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Empty line.
    #[error("empty line")]
    Empty,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", default, borrow)]
    ty: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    cmd: Option<&'a RawValue>,
}

/// Classifies one line (without its newline). An object is parsed once (the common,
/// typed case); the whole line is kept as `raw` only when it is needed.
pub fn classify(line: &[u8]) -> Result<Classified<'_>, Malformed> {
    let line = trim_ascii(line);
    if line.is_empty() {
        return Err(Malformed::Empty);
    }
    let whole = |line| -> Result<&RawValue, Malformed> { Ok(serde_json::from_slice(line)?) };
    if line[0] != b'{' {
        let raw = whole(line)?;
        return Ok(Classified::Raw {
            raw,
            ready: raw.get() == "\"ready\"",
        });
    }
    // A probe failure on valid JSON (duplicate keys) just means "raw".
    let probe = match serde_json::from_slice::<Probe<'_>>(line) {
        Ok(p) => p,
        Err(_) => {
            return Ok(Classified::Raw {
                raw: whole(line)?,
                ready: false,
            });
        }
    };
    if let Some(cmd) = probe.cmd.and_then(as_str)
        && cmd.starts_with("NODE_")
    {
        return Ok(Classified::NodeInternal {
            cmd: cmd.to_string(),
            raw: whole(line)?,
        });
    }
    if let (Some(ty), Some(data)) = (probe.ty, probe.data)
        && is_truthy(data)
        && let Some(ty) = borrowed_str(ty).and_then(MsgType::new)
    {
        return Ok(Classified::Typed { ty, data });
    }
    Ok(Classified::Raw {
        raw: whole(line)?,
        ready: false,
    })
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// A JSON string value as text (unescaped, owned only when it had escapes).
fn as_str(v: &RawValue) -> Option<std::borrow::Cow<'_, str>> {
    serde_json::from_str::<std::borrow::Cow<'_, str>>(v.get()).ok()
}

/// A JSON string without escapes, borrowed from the line. A type with escapes cannot be a valid
/// token anyway (every valid token character is plain ASCII).
fn borrowed_str(v: &RawValue) -> Option<&str> {
    let s = v.get().strip_prefix('"')?.strip_suffix('"')?;
    (!s.contains('\\')).then_some(s)
}

/// JavaScript truthiness of a JSON value: `false`, `null`, `0`, `-0` and `""` are falsy.
fn is_truthy(v: &RawValue) -> bool {
    match v.get() {
        "false" | "null" | "\"\"" => false,
        s if s.starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']) => {
            s.parse::<f64>().map(|n| n != 0.0).unwrap_or(true)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(line: &str) -> Option<(String, String)> {
        match classify(line.as_bytes()).unwrap() {
            Classified::Typed { ty, data } => Some((ty.as_str().into(), data.get().into())),
            _ => None,
        }
    }

    #[test]
    fn typed_messages_follow_pm2s_rule() {
        assert_eq!(
            typed(r#"{"type":"process:msg","data":{"a":1}}"#),
            Some(("process:msg".into(), r#"{"a":1}"#.into()))
        );
        assert_eq!(
            typed(r#"{"data":[1],"type":"chat:new","extra":true}"#),
            Some(("chat:new".into(), "[1]".into()))
        );
        // falsy data ⇒ raw (pm2)
        for falsy in ["0", "-0", "0.0", "\"\"", "false", "null"] {
            assert_eq!(typed(&format!(r#"{{"type":"t","data":{falsy}}}"#)), None);
        }
        assert!(typed(r#"{"type":"t","data":"x"}"#).is_some());
        assert!(typed(r#"{"type":"t","data":1e-3}"#).is_some());
        // invalid tokens ⇒ raw
        for ty in [
            r#""a.b""#,
            r#""*""#,
            r#"">""#,
            r#""a b""#,
            r#""""#,
            "5",
            "null",
            r#""\u0041""#,
        ] {
            assert_eq!(typed(&format!(r#"{{"type":{ty},"data":1}}"#)), None, "{ty}");
        }
        // missing data ⇒ raw
        assert_eq!(typed(r#"{"type":"t"}"#), None);
    }

    #[test]
    fn raw_and_ready() {
        assert!(matches!(
            classify(br#""ready""#).unwrap(),
            Classified::Raw { ready: true, .. }
        ));
        assert!(matches!(
            classify(b"42").unwrap(),
            Classified::Raw { ready: false, .. }
        ));
        assert!(matches!(
            classify(br#"{"a":1,"a":2}"#).unwrap(),
            Classified::Raw { ready: false, .. }
        ));
        // A lone surrogate (JSON.stringify("\ud800")) is relayed as written, not refused.
        assert!(matches!(
            classify(br#""\ud800""#).unwrap(),
            Classified::Raw { .. }
        ));
    }

    #[test]
    fn node_internals_are_recognised() {
        match classify(br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{}}"#).unwrap() {
            Classified::NodeInternal { cmd, .. } => assert_eq!(cmd, "NODE_HANDLE"),
            other => panic!("{other:?}"),
        }
        // a user cmd is a user message
        assert!(matches!(
            classify(br#"{"cmd":"deploy"}"#).unwrap(),
            Classified::Raw { .. }
        ));
    }

    #[test]
    fn malformed() {
        assert!(classify(b"").is_err());
        assert!(classify(b"  ").is_err());
        assert!(classify(b"{not json").is_err());
        assert!(classify(b"\xff\xfe").is_err());
        assert!(classify(b"{} trailing").is_err());
    }
}
