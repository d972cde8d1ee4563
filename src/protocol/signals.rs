//! Signal names as users write them (`SIGUSR2`, `USR2`, `12`) and as events carry them.

use super::error::{ControlError, ErrorKind};
use nix::sys::signal::Signal;
use std::str::FromStr;

/// Parses a signal name or number.
pub fn parse(s: &str) -> Result<Signal, ControlError> {
    let t = s.trim();
    let sig = if let Ok(n) = t.parse::<i32>() {
        Signal::try_from(n).ok()
    } else {
        let up = t.to_ascii_uppercase();
        let name = if up.starts_with("SIG") {
            up
        } else {
            format!("SIG{up}")
        };
        Signal::from_str(&name).ok()
    };
    sig.ok_or_else(|| {
        ControlError::new(
            ErrorKind::UnknownSignal,
            format!(
                "unknown signal '{s}': use a name such as SIGUSR2, SIGHUP, SIGTERM, or its number"
            ),
        )
    })
}

/// `"SIGKILL"` for 9.
pub fn name(n: i32) -> String {
    Signal::try_from(n).map_or_else(|_| format!("SIG{n}"), |s| s.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse("SIGUSR2").unwrap(), Signal::SIGUSR2);
        assert_eq!(parse("usr2").unwrap(), Signal::SIGUSR2);
        assert_eq!(parse("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse("SIGFOO").unwrap_err().kind, ErrorKind::UnknownSignal);
        assert_eq!(name(9), "SIGKILL");
    }
}
