//! `--listen` addresses (`tcp://HOST:PORT`, `tcp://:PORT`, `:PORT`, `PORT`, `unix:///path`):
//! the sockets an agent binds once per app and hands to every instance systemd-style
//! (`LISTEN_FDS`, fds from 3). Pure: parsing and naming only.

use super::error::{ControlError, ErrorKind};
use std::fmt;
use std::path::PathBuf;

/// One address to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    /// TCP; an empty host means every address (IPv6 and IPv4).
    Tcp {
        /// Host or IP; empty for any.
        host: String,
        /// TCP port (1-65535; 0 is refused).
        port: u16,
    },
    /// A Unix stream socket at an absolute path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses one address; the error says which forms are accepted.
    pub fn parse(s: &str) -> Result<Self, ControlError> {
        let bad = |why: &str| {
            ControlError::new(
                ErrorKind::InvalidValue,
                format!(
                    "--listen {s}: {why}; write tcp://HOST:PORT, tcp://:PORT (every address) or unix:///absolute/path"
                ),
            )
        };
        let t = s.trim();
        if let Some(path) = t.strip_prefix("unix://") {
            let p = PathBuf::from(path);
            if !p.is_absolute() {
                return Err(bad("a unix socket path must be absolute"));
            }
            return Ok(ListenAddr::Unix(p));
        }
        let rest = t.strip_prefix("tcp://").unwrap_or(t);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => ("", rest),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("port 0 would give every restart another port"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.contains('/') || host.contains(' ') {
            return Err(bad("the host is not a host name or an IP address"));
        }
        Ok(ListenAddr::Tcp {
            host: host.to_string(),
            port,
        })
    }

    /// The name in `LISTEN_FDNAMES` (no `:`, which separates names there).
    pub fn fd_name(&self) -> String {
        match self {
            ListenAddr::Tcp { port, .. } => format!("tcp-{port}"),
            ListenAddr::Unix(p) => format!(
                "unix-{}",
                p.file_name()
                    .map(|n| n.to_string_lossy().replace(':', "-"))
                    .unwrap_or_default()
            ),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            ListenAddr::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            ListenAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let tcp = |h: &str, p| ListenAddr::Tcp {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            ListenAddr::parse("tcp://127.0.0.1:3000").unwrap(),
            tcp("127.0.0.1", 3000)
        );
        assert_eq!(ListenAddr::parse("tcp://:80").unwrap(), tcp("", 80));
        assert_eq!(ListenAddr::parse(":8080").unwrap(), tcp("", 8080));
        assert_eq!(ListenAddr::parse("3000").unwrap(), tcp("", 3000));
        assert_eq!(
            ListenAddr::parse("tcp://[::1]:3000").unwrap(),
            tcp("::1", 3000)
        );
        assert_eq!(
            ListenAddr::parse("tcp://[::1]:3000").unwrap().to_string(),
            "tcp://[::1]:3000"
        );
        assert_eq!(
            ListenAddr::parse("unix:///run/app.sock").unwrap(),
            ListenAddr::Unix("/run/app.sock".into())
        );
        for bad in [
            "tcp://host",
            "tcp://:0",
            "unix://rel.sock",
            "tcp://:99999",
            "http://x:1",
        ] {
            let e = ListenAddr::parse(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidValue, "{bad}");
            assert!(e.message.contains("tcp://HOST:PORT"), "{e}");
        }
        assert_eq!(tcp("", 3000).fd_name(), "tcp-3000");
        assert_eq!(
            ListenAddr::Unix("/run/a:b.sock".into()).fd_name(),
            "unix-a-b.sock"
        );
    }
}
