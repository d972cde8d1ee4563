//! Validation of the names that become subject tokens: app names, namespaces, host ids and
//! worker-chosen message types. Nothing else may enter a subject.

use std::fmt;

/// Which kind of name failed validation; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// An app name (`--name`).
    App,
    /// A namespace (`--namespace`).
    Namespace,
    /// A host id (`host_id`).
    Host,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::App => "app name",
            NameKind::Namespace => "namespace",
            NameKind::Host => "host id",
        })
    }
}

/// A name was refused at the door.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty string.
    #[error("the {0} is empty: use letters, digits, '_' or '-'")]
    Empty(NameKind),
    /// Longer than [`MAX_NAME_LEN`].
    #[error("the {kind} '{value}…' is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// Kind of name.
        kind: NameKind,
        /// The first characters of the value.
        value: String,
        /// Its length.
        len: usize,
    },
    /// A character outside `[A-Za-z0-9_-]`.
    #[error(
        "the {kind} '{value}' has the character {bad:?} at position {pos}: use only letters, digits, '_' or '-'"
    )]
    BadChar {
        /// Kind of name.
        kind: NameKind,
        /// The whole value.
        value: String,
        /// The offending character.
        bad: char,
        /// Its character position (0-based).
        pos: usize,
    },
    /// Namespaces beginning with `_` are reserved (`_fleet`).
    #[error(
        "the namespace '{0}' starts with '_', which is reserved for Flotilla's own subjects (such as _fleet): choose another"
    )]
    Reserved(String),
}

/// Longest accepted name, in bytes. Keeps subjects well under NATS's limits.
pub const MAX_NAME_LEN: usize = 128;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// True when `c` may appear in a worker-chosen message type (`[A-Za-z0-9_:-]`).
pub fn is_type_char(c: char) -> bool {
    is_name_char(c) || c == ':'
}

/// Checks a name of the given kind: `[A-Za-z0-9_-]+`, at most [`MAX_NAME_LEN`] bytes, and for a
/// namespace no leading `_`.
pub fn validate(kind: NameKind, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty(kind));
    }
    if let Some((pos, bad)) = value.chars().enumerate().find(|(_, c)| !is_name_char(*c)) {
        return Err(NameError::BadChar {
            kind,
            value: value.to_string(),
            bad,
            pos,
        });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            value: value.chars().take(24).collect(),
            len: value.len(),
        });
    }
    if kind == NameKind::Namespace && value.starts_with('_') {
        return Err(NameError::Reserved(value.to_string()));
    }
    Ok(())
}

/// True when a worker-chosen `type` may become a subject token: `[A-Za-z0-9_:-]+`, at most
/// [`MAX_NAME_LEN`] bytes.
pub fn is_valid_type(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_NAME_LEN && value.chars().all(is_type_char)
}

/// Turns a hostname into a valid host id: every character outside `[A-Za-z0-9_-]` becomes `-`
/// (so `web-1.example.com` becomes `web-1-example-com`).
pub fn sanitise_host_id(raw: &str) -> String {
    let s: String = raw
        .chars()
        .map(|c| if is_name_char(c) { c } else { '-' })
        .take(MAX_NAME_LEN)
        .collect();
    if s.is_empty() { "localhost".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["api", "web-1", "a_b", "A9", "x"] {
            validate(NameKind::App, ok).unwrap();
            validate(NameKind::Namespace, ok).unwrap();
            validate(NameKind::Host, ok).unwrap();
        }
    }

    #[test]
    fn refuses_bad_names_with_position() {
        let err = validate(NameKind::App, "my app").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the app name 'my app' has the character ' ' at position 2: use only letters, digits, '_' or '-'"
        );
        for bad in ["a.b", "a*", ">", "a b", "é", "a\n", ""] {
            assert!(validate(NameKind::App, bad).is_err(), "{bad:?}");
        }
        assert!(validate(NameKind::App, &"a".repeat(129)).is_err());
    }

    #[test]
    fn underscore_namespaces_are_reserved() {
        assert!(matches!(
            validate(NameKind::Namespace, "_fleet"),
            Err(NameError::Reserved(_))
        ));
        validate(NameKind::App, "_private").unwrap();
    }

    #[test]
    fn types() {
        assert!(is_valid_type("process:msg"));
        assert!(is_valid_type("my-event_2"));
        assert!(!is_valid_type("a.b"));
        assert!(!is_valid_type(""));
        assert!(!is_valid_type("a b"));
        assert!(!is_valid_type(">"));
    }

    #[test]
    fn host_ids_are_sanitised() {
        assert_eq!(sanitise_host_id("web-1.example.com"), "web-1-example-com");
        assert_eq!(sanitise_host_id(""), "localhost");
        validate(NameKind::Host, &sanitise_host_id("ü ber.host")).unwrap();
    }
}
