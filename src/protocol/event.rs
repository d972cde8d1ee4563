//! Event names, in one place: the `event` of a `process:event` envelope ([`ProcessEvent`]) and
//! of a `host:event` ([`HostEventKind`]). On the wire they are the plain strings pm2 users know
//! (`online`, `restart overlimit`); a name this version does not know (from a newer peer) is
//! kept as [`ProcessEvent::Other`], so consumers still show it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// An enum of wire names with an `Other(String)` for names a newer peer sends.
macro_rules! wire_names {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)*
            /// A name this version does not know (from a newer peer), as it came.
            Other(String),
        }

        impl $name {
            /// Every name this version knows.
            pub const KNOWN: &'static [$name] = &[$($name::$v),*];

            /// The wire name.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$v => $s,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($s => $name::$v,)*
                    other => $name::Other(other.to_string()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Ok($name::from(s.as_ref()))
            }
        }
    };
}

wire_names! {
    /// What a `process:event` says happened: pm2's names where pm2 has one, ours beside them.
    ProcessEvent {
        /// A process was created (pm2).
        Start = "start",
        /// A run is online (pm2).
        Online = "online",
        /// A run exited, with `exit_code` / `signal` (pm2).
        Exit = "exit",
        /// A restart, manual or scheduled, with `manually` (pm2).
        Restart = "restart",
        /// Stopped on request (pm2).
        Stop = "stop",
        /// Deleted (pm2).
        Delete = "delete",
        /// Reloaded (pm2).
        Reload = "reload",
        /// Too many unstable restarts: `errored` (pm2).
        RestartOverlimit = "restart overlimit",
        /// The worker sent `'ready'`.
        Ready = "ready",
        /// Messages were dropped while NATS was away, with `count`, `since`, `until`.
        Dropped = "dropped",
        /// Faulty channel lines were skipped, with `count` and `reason`.
        IpcError = "ipc:error",
        /// The process could not be spawned, with `reason`.
        SpawnError = "spawn:error",
        /// A Node cluster worker listens, with the address in `reason`.
        Listening = "listening",
        /// A Node cluster worker cannot have the socket it asked for, with `reason`.
        ListenError = "listen:error",
        /// The file watch could not be set up, with `reason`.
        WatchError = "watch:error",
    }
}

wire_names! {
    /// What a `host:event` says about a host.
    HostEventKind {
        /// An agent started.
        Online = "online",
        /// An agent stopped cleanly.
        Offline = "offline",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_events_round_trip_and_unknown_ones_are_kept() {
        for e in ProcessEvent::KNOWN {
            let v = serde_json::to_value(e).unwrap();
            assert_eq!(v, serde_json::json!(e.as_str()));
            assert_eq!(&serde_json::from_value::<ProcessEvent>(v).unwrap(), e);
        }
        assert_eq!(
            serde_json::to_value(ProcessEvent::RestartOverlimit).unwrap(),
            serde_json::json!("restart overlimit")
        );
        let newer: ProcessEvent = serde_json::from_str("\"moved\"").unwrap();
        assert_eq!(newer, ProcessEvent::Other("moved".into()));
        assert_eq!(serde_json::to_string(&newer).unwrap(), "\"moved\"");
    }

    #[test]
    fn host_events_round_trip_and_unknown_ones_are_kept() {
        for e in HostEventKind::KNOWN {
            let v = serde_json::to_value(e).unwrap();
            assert_eq!(&serde_json::from_value::<HostEventKind>(v).unwrap(), e);
        }
        let newer: HostEventKind = serde_json::from_str("\"draining\"").unwrap();
        assert_eq!(newer.to_string(), "draining");
    }
}
