//! Node's cluster protocol on the wire: what a worker asks its primary (us), decoded once into a
//! [`ClusterMsg`], and the lines the primary answers with. Pure: no sockets, no table.

use crate::protocol::listen::ListenAddr;
use serde_json::{Value, json};
use std::path::Path;

/// The key of the boot probe: one no server has (Node's keys are `address:port:...`).
pub(super) const BOOT_PROBE_KEY: &str = "flotilla:boot-probe";

/// A message of a Node cluster worker that its primary acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterMsg {
    /// Node has booted; the main module runs next.
    Online,
    /// A `listen()` asks for its socket.
    QueryServer(ServerQuery),
    /// A server listens; `on` says where, for people.
    Listening {
        /// `host:port`, a path, `port N` or `a socket`.
        on: String,
    },
    /// The app closed a server (`server.close()`).
    Close {
        /// Node's key of its socket.
        key: String,
    },
    /// The worker is done after `disconnect`: the primary acknowledges `seq`.
    ExitedAfterDisconnect {
        /// The worker's sequence number.
        seq: Value,
    },
    /// The worker's answer to a handle the primary sent (the boot probe's `newconn`).
    Accepted {
        /// The primary's sequence number it answers.
        ack: Option<u64>,
    },
}

/// A worker's `queryServer`: the socket of one `listen()`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerQuery {
    /// The worker's sequence number, echoed as `ack`.
    pub seq: Value,
    /// Node's key for the socket: `address:port:addressType:fd:index`, each as JavaScript
    /// prints it.
    pub key: String,
    /// The worker's `data` (TLS session ticket keys); the first worker's is echoed to all.
    pub data: Value,
    /// The descriptor `listen({fd})` names, if any.
    pub fd: Option<i64>,
    /// The host, or the unix socket's path.
    pub address: String,
    /// 4 or 6 (TCP), -1 (a unix path); `None` for a dgram socket (`"udp4"`, `"udp6"`).
    pub address_type: Option<i64>,
    /// The TCP port; 0 when absent or not a non-negative number.
    pub port: u64,
}

/// Where the socket a [`ServerQuery`] asks for comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Wanted {
    /// The app's `--listen` socket at this index (`listen({fd: 3 + index})`).
    ListenFd {
        /// The descriptor the worker named.
        fd: i64,
        /// Its index among the app's `--listen` sockets.
        index: usize,
    },
    /// An address, bound once by the agent for every worker.
    Addr(ListenAddr),
}

impl ClusterMsg {
    /// Decodes a `NODE_CLUSTER` line; `None` for one the primary does not act on.
    pub fn decode(raw: &str) -> Option<Self> {
        Self::from_value(&serde_json::from_str(raw).ok()?)
    }

    /// The same, from a parsed line.
    pub fn from_value(v: &Value) -> Option<Self> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default();
        match v.get("act").and_then(Value::as_str) {
            Some("online") => Some(Self::Online),
            Some("queryServer") => Some(Self::QueryServer(ServerQuery::from_value(v))),
            Some("listening") => Some(Self::Listening {
                on: listening_on(v),
            }),
            Some("close") => Some(Self::Close {
                key: text("key").to_string(),
            }),
            Some("exitedAfterDisconnect") => Some(Self::ExitedAfterDisconnect {
                seq: v.get("seq").cloned().unwrap_or(Value::Null),
            }),
            Some(_) => None,
            // An answer (`{"ack":n,"accepted":false}`: the boot probe's).
            None => {
                (v.get("ack").is_some() && v.get("accepted").is_some()).then(|| Self::Accepted {
                    ack: v.get("ack").and_then(Value::as_u64),
                })
            }
        }
    }
}

/// What a `listening` message says the server listens on.
fn listening_on(v: &Value) -> String {
    match (v.get("addressType"), v.get("address"), v.get("port")) {
        (Some(t), Some(Value::String(path)), _) if t == -1 => path.clone(),
        (_, Some(Value::String(a)), Some(port)) => format!("{a}:{port}"),
        (_, _, Some(port)) => format!("port {port}"),
        _ => "a socket".into(),
    }
}

/// A value as JavaScript's template strings print it.
fn js(v: Option<&Value>) -> String {
    match v {
        None => "undefined".to_string(),
        Some(Value::Null) => "null".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

impl ServerQuery {
    fn from_value(v: &Value) -> Self {
        let key = format!(
            "{}:{}:{}:{}:{}",
            js(v.get("address")),
            js(v.get("port")),
            js(v.get("addressType")),
            js(v.get("fd")),
            js(v.get("index"))
        );
        Self {
            seq: v.get("seq").cloned().unwrap_or(Value::Null),
            key,
            data: v.get("data").cloned().unwrap_or_default(),
            fd: v.get("fd").and_then(Value::as_i64),
            address: v
                .get("address")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            address_type: v.get("addressType").and_then(Value::as_i64),
            port: v.get("port").and_then(Value::as_u64).unwrap_or(0),
        }
    }

    /// The socket it asks for: one of the app's `--listen` sockets when it names an fd, else
    /// the address (a unix path relative to the app's `cwd`, as if the worker had bound it).
    /// Errors carry the errno for Node and a line for people.
    pub(super) fn wanted(&self, cwd: &Path) -> Result<Wanted, (i32, String)> {
        if let Some(fd) = self.fd
            && fd >= 3
        {
            return Ok(Wanted::ListenFd {
                fd,
                index: (fd - 3) as usize,
            });
        }
        let Some(kind) = self.address_type else {
            return Err((
                libc::EAFNOSUPPORT,
                "UDP sockets in cluster mode are not shared by the agent: bind them with `exclusive: true`, or run one instance".into(),
            ));
        };
        if kind == -1 {
            if self.address.starts_with('\0') {
                return Err((
                    libc::EAFNOSUPPORT,
                    "abstract unix sockets in cluster mode are not supported: use a path".into(),
                ));
            }
            return Ok(Wanted::Addr(ListenAddr::Unix(cwd.join(&self.address))));
        }
        let port = u16::try_from(self.port)
            .map_err(|_| (libc::EINVAL, format!("port {} is out of range", self.port)))?;
        if port == 0 {
            return Err((
                libc::EINVAL,
                "listen(0) in cluster mode would give each worker another port: choose one".into(),
            ));
        }
        Ok(Wanted::Addr(ListenAddr::Tcp {
            host: self.address.clone(),
            port,
        }))
    }

    /// The primary's answer: `errno` 0 with the socket riding along, else the negated errno
    /// Node raises in the app. `data` is the first worker's for this key.
    pub(super) fn answer(&self, errno: i32, data: &Value, ours: u64) -> Value {
        json!({
            "cmd": "NODE_CLUSTER", "errno": errno, "key": self.key, "ack": self.seq,
            "data": data, "seq": ours
        })
    }
}

/// One line of Node's channel protocol.
pub(super) fn line(v: Value) -> bytes::Bytes {
    let mut line = serde_json::to_vec(&v).expect("a JSON value always serialises");
    line.push(b'\n');
    line.into()
}

/// A line a descriptor rides with (Node's `NODE_HANDLE` around the message).
pub(super) fn with_handle(msg: Value) -> bytes::Bytes {
    line(json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": msg}))
}

/// The primary tells a worker to `disconnect`: close its servers, then exit.
pub(super) fn disconnect(ours: u64) -> bytes::Bytes {
    line(json!({"cmd": "NODE_CLUSTER", "act": "disconnect", "seq": ours}))
}

/// The primary acknowledges the worker's message `their`.
pub(super) fn ack(their: &Value, ours: u64) -> bytes::Bytes {
    line(json!({"cmd": "NODE_CLUSTER", "ack": their, "seq": ours}))
}

/// The boot probe: a `newconn` for a key no server has, to ride with a throwaway descriptor.
pub(super) fn boot_probe(ours: u64) -> bytes::Bytes {
    with_handle(
        json!({"cmd": "NODE_CLUSTER", "act": "newconn", "key": BOOT_PROBE_KEY, "seq": ours}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(v: Value) -> Option<ClusterMsg> {
        ClusterMsg::decode(&v.to_string())
    }

    fn query(v: Value) -> ServerQuery {
        match decode(v) {
            Some(ClusterMsg::QueryServer(q)) => q,
            other => panic!("not a queryServer: {other:?}"),
        }
    }

    fn parsed(b: bytes::Bytes) -> Value {
        assert_eq!(b.last(), Some(&b'\n'), "one line");
        serde_json::from_slice(&b).expect("a JSON line")
    }

    #[test]
    fn the_acts_the_primary_answers_are_decoded_and_the_rest_dropped() {
        let c = |act: &str| json!({"cmd": "NODE_CLUSTER", "act": act, "seq": 4});
        assert_eq!(decode(c("online")), Some(ClusterMsg::Online));
        assert_eq!(
            decode(c("exitedAfterDisconnect")),
            Some(ClusterMsg::ExitedAfterDisconnect { seq: json!(4) })
        );
        assert!(matches!(
            decode(c("queryServer")),
            Some(ClusterMsg::QueryServer(_))
        ));
        assert_eq!(decode(c("worker-said-hi")), None);
        assert_eq!(decode(c("")), None);
        assert_eq!(ClusterMsg::decode("not json"), None);
        assert_eq!(
            decode(json!({"cmd": "NODE_CLUSTER", "act": "close", "key": "k"})),
            Some(ClusterMsg::Close { key: "k".into() })
        );
    }

    #[test]
    fn an_answer_is_the_boot_probe_ack_only_with_accepted() {
        assert_eq!(
            decode(json!({"cmd": "NODE_CLUSTER", "ack": 7, "accepted": false})),
            Some(ClusterMsg::Accepted { ack: Some(7) })
        );
        assert_eq!(decode(json!({"cmd": "NODE_CLUSTER", "ack": 7})), None);
        assert_eq!(
            decode(json!({"cmd": "NODE_CLUSTER", "accepted": true})),
            None
        );
    }

    #[test]
    fn listening_says_where() {
        let on = |v: Value| match decode(v) {
            Some(ClusterMsg::Listening { on }) => on,
            other => panic!("{other:?}"),
        };
        let l = json!({"act": "listening"});
        let with = |extra: Value| {
            let mut v = l.clone();
            v.as_object_mut()
                .expect("an object")
                .extend(extra.as_object().expect("an object").clone());
            v
        };
        assert_eq!(
            on(with(json!({"addressType": -1, "address": "/run/a.sock"}))),
            "/run/a.sock"
        );
        assert_eq!(
            on(with(
                json!({"addressType": 4, "address": "127.0.0.1", "port": 80})
            )),
            "127.0.0.1:80"
        );
        assert_eq!(on(with(json!({"address": null, "port": 80}))), "port 80");
        assert_eq!(on(l), "a socket");
    }

    #[test]
    fn the_key_is_nodes_with_javascripts_spelling() {
        let q = query(json!({
            "act": "queryServer", "address": null, "port": 8080, "addressType": 4, "fd": -1, "index": 0
        }));
        assert_eq!(q.key, "null:8080:4:-1:0");
        let q = query(json!({"act": "queryServer", "address": "::", "port": 80, "addressType": 6}));
        assert_eq!(q.key, ":::80:6:undefined:undefined");
        assert_eq!(q.seq, Value::Null);
        assert_eq!(q.data, Value::Null);
    }

    #[test]
    fn the_socket_wanted_or_the_errno_node_raises() {
        let cwd = Path::new("/srv/app");
        let q = |v: Value| query(v).wanted(cwd);
        assert_eq!(
            q(json!({"act": "queryServer", "address": "", "port": 80, "addressType": 4, "fd": 4})),
            Ok(Wanted::ListenFd { fd: 4, index: 1 })
        );
        assert_eq!(
            q(
                json!({"act": "queryServer", "address": "0.0.0.0", "port": 80, "addressType": 4, "fd": -1})
            ),
            Ok(Wanted::Addr(ListenAddr::Tcp {
                host: "0.0.0.0".into(),
                port: 80
            }))
        );
        assert_eq!(
            q(json!({"act": "queryServer", "address": "s.sock", "addressType": -1})),
            Ok(Wanted::Addr(ListenAddr::Unix("/srv/app/s.sock".into())))
        );
        let errno = |v: Value| q(v).map_err(|(e, _)| e).expect_err("refused");
        assert_eq!(
            errno(json!({"act": "queryServer", "address": "\u{0}x", "addressType": -1})),
            libc::EAFNOSUPPORT
        );
        assert_eq!(
            errno(json!({"act": "queryServer", "address": "", "port": 53, "addressType": "udp4"})),
            libc::EAFNOSUPPORT
        );
        assert_eq!(
            errno(json!({"act": "queryServer", "address": "", "port": 0, "addressType": 4})),
            libc::EINVAL
        );
        assert_eq!(
            errno(json!({"act": "queryServer", "address": "", "port": 70000, "addressType": 4})),
            libc::EINVAL
        );
        assert_eq!(
            errno(json!({"act": "queryServer", "address": "", "port": -5, "addressType": 4})),
            libc::EINVAL
        );
    }

    #[test]
    fn the_primarys_lines() {
        let q = query(
            json!({"act": "queryServer", "address": "", "port": 80, "addressType": 4, "seq": 9}),
        );
        assert_eq!(
            q.answer(-libc::EADDRINUSE, &json!({"t": 1}), 3),
            json!({"cmd": "NODE_CLUSTER", "errno": -libc::EADDRINUSE, "key": q.key,
                   "ack": 9, "data": {"t": 1}, "seq": 3})
        );
        assert_eq!(
            parsed(disconnect(2)),
            json!({"cmd": "NODE_CLUSTER", "act": "disconnect", "seq": 2})
        );
        assert_eq!(
            parsed(ack(&json!(5), 6)),
            json!({"cmd": "NODE_CLUSTER", "ack": 5, "seq": 6})
        );
        assert_eq!(
            parsed(boot_probe(1)),
            json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg":
                {"cmd": "NODE_CLUSTER", "act": "newconn", "key": BOOT_PROBE_KEY, "seq": 1}})
        );
    }
}
