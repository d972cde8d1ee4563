//! Turning an [`AppSpec`] into a running worker: interpreter choice, checks that name the host,
//! the environment pm2 gives its workers, a process group of its own, and the IPC channel on fd 3.

use super::ipc;
use crate::protocol::error::{ControlError, ErrorKind};
use crate::protocol::{AppSpec, ExecMode};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// How to run an app, resolved on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The program to exec (interpreter or script), absolute.
    pub program: PathBuf,
    /// Its arguments (interpreter args, script, app args).
    pub args: Vec<String>,
    /// Absolute script path.
    pub script: PathBuf,
    /// Working directory.
    pub cwd: PathBuf,
    /// Interpreter name (`node`, `python3`, ..., `none`).
    pub interpreter: String,
    /// Resolved exec mode.
    pub exec_mode: ExecMode,
}

/// Interpreter for a script by its extension (pm2's table, plus `.sh`).
pub fn interpreter_for(script: &Path) -> &'static str {
    match script.extension().and_then(|e| e.to_str()) {
        Some("js" | "mjs" | "cjs") => "node",
        Some("py") => "python3",
        Some("sh") => "bash",
        Some("rb") => "ruby",
        Some("php") => "php",
        Some("pl") => "perl",
        _ => "none",
    }
}

/// Resolves the spec on this host; errors name the host and say how to fix.
pub fn resolve(spec: &AppSpec, host: &str) -> Result<Launch, ControlError> {
    let script = if spec.script.is_absolute() {
        spec.script.clone()
    } else if let Some(cwd) = &spec.cwd {
        cwd.join(&spec.script)
    } else {
        return Err(ControlError::new(
            ErrorKind::ScriptNotFound,
            format!(
                "the script '{}' is relative and no cwd was given: send an absolute path (the CLI resolves it for you)",
                spec.script.display()
            ),
        ));
    };
    let meta = std::fs::metadata(&script).map_err(|e| {
        ControlError::new(
            ErrorKind::ScriptNotFound,
            format!(
                "the script {} does not exist on host {host} ({e}): deploy it there or fix the path",
                script.display()
            ),
        )
    })?;
    if !meta.is_file() {
        return Err(ControlError::new(
            ErrorKind::ScriptNotFound,
            format!("{} on host {host} is not a file", script.display()),
        ));
    }
    let cwd = spec
        .cwd
        .clone()
        .or_else(|| script.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));
    if !cwd.is_dir() {
        return Err(ControlError::new(
            ErrorKind::ScriptNotFound,
            format!(
                "the working directory {} does not exist on host {host}",
                cwd.display()
            ),
        ));
    }
    let interpreter = spec
        .interpreter
        .clone()
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| interpreter_for(&script).to_string());
    let path_var = spec.env.get("PATH").map(std::ffi::OsStr::new);
    let (program, mut args) = if interpreter == "none" {
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(ControlError::new(
                ErrorKind::SpawnFailed,
                format!(
                    "{} on host {host} is not executable and has no known interpreter: chmod +x it, or set --interpreter",
                    script.display()
                ),
            ));
        }
        (script.clone(), vec![])
    } else {
        let prog = crate::which::which(&interpreter, path_var).ok_or_else(|| {
            ControlError::new(
                ErrorKind::InterpreterNotFound,
                format!(
                    "the interpreter '{interpreter}' for {} is not installed on host {host} (not on PATH): install it there, or set --interpreter",
                    script.display()
                ),
            )
        })?;
        let mut a = spec.interpreter_args.clone();
        a.push(script.display().to_string());
        (prog, a)
    };
    args.extend(spec.args.iter().cloned());
    let is_node = Path::new(&interpreter)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "node" || n == "nodejs" || n == "bun");
    let exec_mode = spec
        .exec_mode
        .unwrap_or(if is_node && spec.instances.is_some() {
            ExecMode::Cluster
        } else {
            ExecMode::Fork
        });
    Ok(Launch {
        program,
        args,
        script,
        cwd,
        interpreter,
        exec_mode,
    })
}

/// True for a Node script in cluster mode: its workers are Node cluster workers.
pub fn is_node_cluster(launch: &Launch) -> bool {
    launch.exec_mode == ExecMode::Cluster
        && Path::new(&launch.interpreter)
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == "node" || n == "nodejs")
}

/// Identity of one instance, for its environment.
pub struct Identity<'a> {
    /// The fleet-wide process id (`pm_id`, `NODE_APP_INSTANCE` is [`Self::instance`]).
    pub pm_id: u32,
    /// The app (`name` in the worker's environment).
    pub name: &'a str,
    /// The app's namespace (`namespace` in the environment).
    pub namespace: &'a str,
    /// The instance number the worker sees as `NODE_APP_INSTANCE` (or `instance_var`).
    pub instance: u32,
    /// instances of the app
    pub instances: u32,
}

/// The worker's environment: the agent's own (less `FLOTILLA_*` settings, which may hold
/// secrets, Node channel variables and systemd's `LISTEN_*`, which are the agent's own), the
/// app's `env`, then pm2's identity variables.
pub fn environment(
    spec: &AppSpec,
    launch: &Launch,
    id: &Identity<'_>,
) -> Vec<(OsString, OsString)> {
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !k.starts_with("FLOTILLA_")
                && !matches!(
                    k.as_ref(),
                    "NODE_CHANNEL_FD"
                        | "NODE_CHANNEL_SERIALIZATION_MODE"
                        | "NODE_UNIQUE_ID"
                        | "LISTEN_FDS"
                        | "LISTEN_PID"
                        | "LISTEN_FDNAMES"
                )
        })
        .collect();
    for (k, v) in &spec.env {
        env.insert(k.into(), v.into());
    }
    let mode = match launch.exec_mode {
        ExecMode::Cluster => "cluster_mode",
        ExecMode::Fork => "fork_mode",
    };
    let ids: [(&str, String); 8] = [
        ("pm_id", id.pm_id.to_string()),
        ("name", id.name.to_string()),
        ("namespace", id.namespace.to_string()),
        ("PM_INSTANCE", id.instance.to_string()),
        ("exec_mode", mode.to_string()),
        ("instances", id.instances.to_string()),
        ("NODE_CHANNEL_FD", ipc::CHILD_FD.to_string()),
        ("NODE_CHANNEL_SERIALIZATION_MODE", "json".to_string()),
    ];
    for (k, v) in ids {
        env.insert(k.into(), v.into());
    }
    if is_node_cluster(launch) {
        // A Node cluster worker: its `listen(port)` asks us (its primary) for the socket
        // instead of binding it, so every instance serves the same port.
        env.insert("NODE_UNIQUE_ID".into(), id.pm_id.to_string().into());
    }
    env.insert(
        spec.instance_var.clone().into(),
        id.instance.to_string().into(),
    );
    if spec.instance_var != "NODE_APP_INSTANCE" {
        env.insert("NODE_APP_INSTANCE".into(), id.instance.to_string().into());
    }
    env.into_iter().collect()
}

/// Most listening sockets one worker gets.
pub const MAX_PASSED: usize = 64;

/// The worker's channel descriptor when it gets `listening` sockets before it.
pub fn channel_fd(listening: usize) -> RawFd {
    ipc::CHILD_FD + listening as RawFd
}

/// A freshly spawned worker.
pub struct Spawned {
    /// The child (the waiter task owns it).
    pub child: tokio::process::Child,
    /// Its pid (= its process group id).
    pub pid: u32,
    /// The agent's end of the IPC channel.
    pub ipc: OwnedFd,
    /// The worker's stdout, read by the log pump.
    pub stdout: tokio::process::ChildStdout,
    /// The worker's stderr, read by the log pump.
    pub stderr: tokio::process::ChildStderr,
}

/// Spawns one worker as its own process-group leader. Without listening sockets the channel is
/// on fd 3; with `listen` (descriptors the agent bound), those are fds 3.. (systemd's
/// `LISTEN_FDS`) and the channel follows them: the caller sets `NODE_CHANNEL_FD` from
/// [`channel_fd`]. `LISTEN_PID` must be the worker's own pid, known only after the fork, so a
/// worker with sockets is exec'd through `sh`, which sets it and execs the program in place.
/// The worker gets `death_signal` from the kernel if the agent dies without stopping it
/// (`PR_SET_PDEATHSIG`; kept across exec): no orphan keeps running, holding the app's ports,
/// after the agent is SIGKILLed.
pub fn spawn(
    launch: &Launch,
    env: Vec<(OsString, OsString)>,
    listen: &[RawFd],
    death_signal: libc::c_int,
) -> std::io::Result<Spawned> {
    let (parent, child_end) = ipc::pair()?;
    let child_fd = child_end.as_raw_fd();
    let mut cmd = if listen.is_empty() {
        let mut c = tokio::process::Command::new(&launch.program);
        c.args(&launch.args);
        c
    } else {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
            .arg(&launch.program)
            .args(&launch.args);
        c
    };
    cmd.current_dir(&launch.cwd)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if listen.len() > MAX_PASSED {
        return Err(std::io::Error::other(format!(
            "{} listening sockets are more than {MAX_PASSED}",
            listen.len()
        )));
    }
    let agent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the child between fork and exec and only calls prctl and getppid, which
    // are async-signal-safe, with plain integers. The "parent" whose death fires it is the thread
    // that forks: the supervisor runs on the runtime's worker threads, which live as long as the
    // agent (nothing in the agent turns one into a blocking thread).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died between the fork and the prctl: the signal will not come.
            if libc::getppid() != agent {
                return Err(std::io::Error::other("the agent exited during the spawn"));
            }
            Ok(())
        });
    }
    let sources: Vec<RawFd> = listen.iter().copied().chain([child_fd]).collect();
    // Parked copies go just above every target number, so moving them never hits one another.
    let park = ipc::CHILD_FD + sources.len() as RawFd;
    // SAFETY: runs in the child between fork and exec; it only calls the async-signal-safe
    // functions fcntl and dup2 on descriptor numbers captured by value, and touches no heap
    // (`sources` was built before the fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (above every target number), then into place: a source may
            // already sit on another one's target. The copies are close-on-exec; dup2 clears
            // the flag on the targets.
            let mut high = [0 as RawFd; MAX_PASSED + 1];
            for (i, &fd) in sources.iter().enumerate() {
                let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, park);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, &h) in high.iter().take(sources.len()).enumerate() {
                if libc::dup2(h, ipc::CHILD_FD + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(child_end); // else the agent never sees EOF when the worker dies
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("the worker exited before its pid was read"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("stdout pipe missing"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("stderr pipe missing"))?;
    Ok(Spawned {
        child,
        pid,
        ipc: parent,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreters_by_extension() {
        assert_eq!(interpreter_for(Path::new("/a/app.js")), "node");
        assert_eq!(interpreter_for(Path::new("/a/app.mjs")), "node");
        assert_eq!(interpreter_for(Path::new("/a/app.cjs")), "node");
        assert_eq!(interpreter_for(Path::new("/a/w.py")), "python3");
        assert_eq!(interpreter_for(Path::new("/a/w.sh")), "bash");
        assert_eq!(interpreter_for(Path::new("/a/server")), "none");
    }

    #[test]
    fn resolve_errors_name_the_host() {
        let spec = AppSpec::new("a", "/nonexistent/app.js");
        let e = resolve(&spec, "web-3").unwrap_err();
        assert_eq!(e.kind, ErrorKind::ScriptNotFound);
        assert!(
            e.message.contains("web-3") && e.message.contains("/nonexistent/app.js"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("app.js");
        std::fs::write(&script, "").unwrap();
        let mut spec = AppSpec::new("a", &script);
        spec.interpreter = Some("no-such-interpreter-xyz".into());
        let e = resolve(&spec, "web-3").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InterpreterNotFound);
        assert!(e.message.contains("no-such-interpreter-xyz") && e.message.contains("web-3"));

        let bin = dir.path().join("server");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        let e = resolve(&AppSpec::new("a", &bin), "h").unwrap_err();
        assert!(e.message.contains("not executable"), "{e}");
    }

    #[test]
    fn cluster_mode_follows_pm2s_rule() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("app.sh");
        std::fs::write(&script, "").unwrap();
        let mut spec = AppSpec::new("a", &script);
        spec.instances = Some(4);
        assert_eq!(resolve(&spec, "h").unwrap().exec_mode, ExecMode::Fork);
        spec.interpreter = Some("node".into());
        crate::which::which("node", None)
            .expect("node is on PATH: scripts/test installs it (scripts/deps)");
        assert_eq!(resolve(&spec, "h").unwrap().exec_mode, ExecMode::Cluster);
        spec.instances = None;
        assert_eq!(resolve(&spec, "h").unwrap().exec_mode, ExecMode::Fork);
    }

    #[test]
    fn environment_has_pm2_identity_and_no_flotilla_settings() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("app.sh");
        std::fs::write(&script, "").unwrap();
        let mut spec = AppSpec::new("api", &script);
        spec.env.insert("PORT".into(), "3000".into());
        let launch = resolve(&spec, "h").unwrap();
        // The agent's own environment holds a Flotilla setting (as a real agent's may, with a
        // secret in it) and an ordinary variable that merely contains the word. `environment`
        // reads the process environment itself, so they are set on this process, under names
        // no other test uses, and removed once it has been read.
        const SECRET: &str = "FLOTILLA_SPAWN_TEST_SECRET";
        const KEPT: &str = "SPAWN_TEST_NOT_FLOTILLA_SPAWN_TEST";
        // SAFETY: std serialises these writes with its own environment reads (env::var, and
        // Command::spawn's copy of the environment) under one lock. The unit tests running
        // alongside read the environment only through std (they bind sockets by address and
        // spawn through Command, no name lookups in C code), and no other test sets or reads
        // these two names.
        unsafe {
            std::env::set_var(SECRET, "s3cret");
            std::env::set_var(KEPT, "kept");
        }
        let env = environment(
            &spec,
            &launch,
            &Identity {
                pm_id: 7,
                name: "api",
                namespace: "default",
                instance: 2,
                instances: 4,
            },
        );
        // SAFETY: as above.
        unsafe {
            std::env::remove_var(SECRET);
            std::env::remove_var(KEPT);
        }
        let get = |k: &str| {
            env.iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("pm_id").as_deref(), Some("7"));
        assert_eq!(get("NODE_APP_INSTANCE").as_deref(), Some("2"));
        assert_eq!(get("PM_INSTANCE").as_deref(), Some("2"));
        assert_eq!(get("NODE_CHANNEL_FD").as_deref(), Some("3"));
        assert_eq!(get("PORT").as_deref(), Some("3000"));
        assert_eq!(
            get(KEPT).as_deref(),
            Some("kept"),
            "the agent's environment is passed on"
        );
        assert_eq!(get(SECRET), None);
        assert!(
            env.iter()
                .all(|(k, _)| !k.to_string_lossy().starts_with("FLOTILLA_"))
        );
    }
}
