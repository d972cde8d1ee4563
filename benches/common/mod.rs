//! What the benches share: what every benchmark prints about where it ran, settings from the
//! environment, and (in the submodules) statistics, tables and /proc readings.
//!
//! Each bench compiles this module on its own (`mod common;`) and uses part of it.
#![allow(dead_code)]

pub mod procfs;
pub mod stats;
pub mod table;

/// A number (or other value) from the environment variable `name`, or `default` when it is
/// unset or does not parse.
pub fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Removes every FLOTILLA_* and PM2_* variable this process has from `c`'s environment, so that
/// a flotilla or pm2 command sees only the home the bench then gives it.
pub fn clear_tool_env(c: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("FLOTILLA_") || k.starts_with("PM2_") {
            c.env_remove(k);
        }
    }
}

/// The trimmed output of a command (stdout, else stderr), or `?` when it cannot run.
pub fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .trim()
            .to_string()
        })
        .unwrap_or_else(|| "?".into())
}

/// Date, commit (and whether src/ is dirty), CPU, cores, kernel, node and nats-server; `extra`
/// is appended to the machine line.
pub fn machine(extra: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let repo = env!("CARGO_MANIFEST_DIR");
    let dirty = !command_line("git", &["-C", repo, "status", "--porcelain", "src"]).is_empty();
    format!(
        "date: {}\nflotilla: commit {}{}\nmachine: {cores} cores ({cpu}), Linux {kernel}; node {}; {}{extra}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command_line("git", &["-C", repo, "rev-parse", "--short", "HEAD"]),
        if dirty {
            " (src/ has uncommitted changes)"
        } else {
            ""
        },
        command_line("node", &["--version"]),
        command_line("nats-server", &["--version"]),
    )
}
