//! CLI benchmark: `cargo bench --bench cli`.
//!
//! Measures, in one run on this machine, side by side, with the same tiny Node app for every
//! tool (it stays alive and exits on SIGINT):
//! 1. warm `flotilla start app.js -i 4` (the local stack already running) until the 4 workers
//!    have booted (their boot marks, below), against the floor: a plain Node `cluster` primary
//!    forking the same 4 workers, from its spawn until they have booted (the target's row);
//!    and, not like for like, the command's return (all four online) against the primary's 4
//!    'online' events;
//! 2. cold `flotilla start app.js -i 4` in a fresh `FLOTILLA_HOME` (the daemon and its
//!    nats-server are spawned too), against pm2 cold in a fresh `PM2_HOME`: until `pm2 jlist`
//!    shows 4 online (polled as soon as `pm2 start` returns), less the cost of one `pm2 jlist`
//!    call on a running daemon (the target's row), and raw; until the 4 workers have booted;
//!    and `pm2 start`'s own return;
//! 3. `flotilla ls` (and `ls --json`) with 4 workers running: wall time, the CLI process's CPU
//!    time and max RSS (from `wait4`'s rusage), and the CPU the stack spends answering, against
//!    `pm2 ls` and `pm2 jlist`;
//! 4. RSS of the flotilla daemon plus its nats-server against pm2's daemon, 4 workers each.
//!
//! The start cases run [`ROUNDS`] times, interleaved round by round (the order reversed every
//! other round) so that drift on a shared machine hits every case alike; after each stop the
//! next case waits for the workers (and a killed daemon) to have exited, through pidfds; the table shows
//! medians, and ratios are taken between medians. `pm2` is optional: without it the flotilla
//! figures are printed with "pm2 not installed" in place of the reference.
//!
//! Every home (FLOTILLA_HOME, PM2_HOME) is a temporary folder; FLOTILLA_* and PM2_* variables
//! other than those are removed from the children's environment. Every command runs under a
//! deadline, and everything the bench started is stopped at the end (`flotilla kill`,
//! `pm2 kill`), on error and on Ctrl-C too. BENCHMARKS.md records a run and what it means.

mod common;

use common::procfs::{Exits, alive, cpu_of, vm_rss};
use common::stats::{median, median_duration};
use common::table::{mib, print_aligned};
use common::{clear_tool_env, knob, machine};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Rounds of each start case (BENCH_ROUNDS overrides it).
const ROUNDS: usize = 5;
/// Calls of each listing command (BENCH_LS_CALLS overrides it).
const LS_CALLS: usize = 20;
/// Workers started by every tool.
const WORKERS: usize = 4;
/// Longest one command may take before it is killed.
const COMMAND_WITHIN: Duration = Duration::from_secs(60);
/// Longest pm2 may take to show its workers online after `pm2 start`.
const ONLINE_WITHIN: Duration = Duration::from_secs(60);
/// Longest the whole bench may take (checked between steps).
const TOTAL_WITHIN: Duration = Duration::from_secs(600);
/// Longest the workers (and, after a kill, the daemon) may take to exit after a delete or a
/// kill; the next measurement starts only once they have, so that exiting processes do not
/// overlap it.
const EXIT_WITHIN: Duration = Duration::from_secs(10);
/// Pause before the steady-state readings (ls, memory), after the workers started.
const STEADY_AFTER: Duration = Duration::from_secs(2);

/// The app every tool runs: alive until SIGINT. Its first line creates an empty file named by
/// its pid in `BENCH_MARK_DIR` (every tool passes its environment on to the workers), so that
/// the bench sees, by the same means for every tool, when the four workers have actually booted
/// (a tool's "online" may come before or after that).
const APP_JS: &str = include_str!("js/cli/app.js");

/// The floor: a Node cluster primary forking the app `BENCH_W` times; prints ALL_ONLINE once
/// every worker's 'online' has come, and on SIGTERM stops them with SIGINT and exits.
const PRIMARY_JS: &str = include_str!("js/cli/primary.js");

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

type Res<T> = Result<T, String>;

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("cli: a benchmark; run it with `cargo bench --bench cli`");
        return;
    }
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe {
            nix::sys::signal::signal(s, nix::sys::signal::SigHandler::Handler(on_signal))
        };
    }
    let started = Instant::now();
    let root = match tempfile::Builder::new()
        .prefix("flotilla-cli-bench")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cli bench: cannot create a temporary folder: {e}");
            std::process::exit(1);
        }
    };
    // The bench drops at the end of this statement: every stack and pm2 daemon it started is
    // stopped, whatever the outcome.
    let outcome = Bench::new(root.path()).measure();
    match outcome {
        Ok(()) => eprintln!(
            "cli bench finished in {:.0} s",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("cli bench failed: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands.

/// One finished command.
struct Ran {
    wall: Duration,
    /// User + system CPU of the process and the descendants it waited for.
    cpu: Duration,
    /// Its max RSS (KiB).
    maxrss_kib: u64,
    out: String,
}

/// Which home a command gets.
#[derive(Clone, Copy)]
enum Home<'a> {
    Flotilla(&'a Path),
    Pm2(&'a Path),
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// Kills `pid` unless `done` says within `within` that it was reaped.
fn watchdog(pid: i32, within: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(within) {
            // SAFETY: plain kill(2); the child is not reaped until the waiter returns.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    tx
}

/// User + system CPU in `ru`.
fn rusage_cpu(ru: &libc::rusage) -> Duration {
    let tv =
        |t: libc::timeval| Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Waits for `pid` with `wait4`, returning its status and rusage.
fn wait4(pid: i32) -> Res<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return Ok((status, ru));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4({pid}): {e}"));
        }
    }
}

fn exit_text(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

struct Bench {
    root: PathBuf,
    flotilla: PathBuf,
    app_dir: PathBuf,
    pm2: bool,
    started: Instant,
    /// Every FLOTILLA_HOME used (stopped at the end).
    flotilla_homes: Vec<PathBuf>,
    /// Every PM2_HOME used (its daemon killed at the end).
    pm2_homes: Vec<PathBuf>,
    /// Stopping what was started: no deadline or interruption applies.
    cleaning: bool,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.cleaning = true;
        for h in self.flotilla_homes.clone() {
            if h.join("daemon.lock").exists()
                && let Err(e) = self.run(&self.flotilla.clone(), &["kill"], Home::Flotilla(&h))
            {
                eprintln!("cleanup: flotilla kill in {}: {e}", h.display());
            }
        }
        for h in self.pm2_homes.clone() {
            if let Some(pid) = pm2_daemon_pid(&h).filter(|p| alive(*p)) {
                self.stop_pm2(&h, pid);
            }
        }
    }
}

fn pm2_daemon_pid(home: &Path) -> Option<u32> {
    std::fs::read_to_string(home.join("pm2.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Bench {
    fn new(root: &Path) -> Bench {
        Bench {
            root: root.to_path_buf(),
            flotilla: PathBuf::from(env!("CARGO_BIN_EXE_flotilla")),
            app_dir: root.join("app"),
            pm2: false,
            started: Instant::now(),
            flotilla_homes: vec![],
            pm2_homes: vec![],
            cleaning: false,
        }
    }

    fn check(&self) -> Res<()> {
        if self.cleaning {
            return Ok(());
        }
        if STOP.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        if self.started.elapsed() > TOTAL_WITHIN {
            return Err(format!("not finished within {TOTAL_WITHIN:?}"));
        }
        Ok(())
    }

    /// A command in the app's folder, with only `home` of the FLOTILLA_* / PM2_* variables.
    fn command(&self, program: &Path, args: &[&str], home: Home) -> Command {
        let mut c = Command::new(program);
        c.args(args).current_dir(&self.app_dir);
        clear_tool_env(&mut c);
        c.env("BENCH_MARK_DIR", self.marks());
        match home {
            Home::Flotilla(h) => c.env("FLOTILLA_HOME", h),
            Home::Pm2(h) => c.env("PM2_HOME", h),
        };
        c
    }

    /// Runs a command to its end: wall time from just before spawn to its reaping, its CPU and
    /// max RSS, its stdout. A non-zero exit is an error (with its stderr).
    fn run(&self, program: &Path, args: &[&str], home: Home) -> Res<Ran> {
        self.check()?;
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let out_path = self.root.join(format!("out-{n}"));
        let err_path = self.root.join(format!("err-{n}"));
        let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut c = self.command(program, args, home);
        c.stdin(Stdio::null())
            .stdout(file(&out_path)?)
            .stderr(file(&err_path)?);
        let what = format!("{} {}", program.display(), args.join(" "));
        let t0 = Instant::now();
        let child = c.spawn().map_err(|e| format!("{what}: {e}"))?;
        let pid = child.id() as i32;
        let dog = watchdog(pid, COMMAND_WITHIN);
        let (status, ru) = wait4(pid)?;
        let wall = t0.elapsed();
        let _ = dog.send(());
        let out = std::fs::read_to_string(&out_path).unwrap_or_default();
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            return Err(format!(
                "`{what}` failed after {:.0} ms ({}): {}{}",
                wall.as_secs_f64() * 1e3,
                exit_text(status),
                err.trim(),
                if err.trim().is_empty() {
                    out.trim()
                } else {
                    ""
                }
            ));
        }
        Ok(Ran {
            wall,
            cpu: rusage_cpu(&ru),
            maxrss_kib: ru.ru_maxrss as u64,
            out,
        })
    }

    /// Where the workers leave their boot marks.
    fn marks(&self) -> PathBuf {
        self.root.join("marks")
    }

    /// Empties the marks folder and watches it for the next [`WORKERS`] marks.
    fn watch_marks(&self) -> Res<Marks> {
        let dir = self.marks();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Marks::watch(&dir, WORKERS, COMMAND_WITHIN)
    }

    /// The workers that left the last boot marks (their pid names the mark) and `more`,
    /// watched for their exit. Call it while they run: after the boot marks, before the stop.
    fn workers(&self, more: &[u32]) -> Exits {
        let mut pids: Vec<u32> = std::fs::read_dir(self.marks())
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        pids.extend_from_slice(more);
        Exits::watch(&pids)
    }

    /// Waits for `what` (watched by [`Bench::workers`]) to have exited: an error when some
    /// still run after [`EXIT_WITHIN`].
    fn exited(&self, exits: &mut Exits, what: &str) -> Res<()> {
        if exits.wait(EXIT_WITHIN) {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} still running {EXIT_WITHIN:?} after the stop",
                exits.running()
            ))
        }
    }

    /// `pm2 kill` in `home`, then waits for its daemon `pid` to be gone (SIGKILL after 5 s).
    fn stop_pm2(&self, home: &Path, pid: u32) {
        if let Err(e) = self.pm2(&["kill"], home) {
            eprintln!("cleanup: pm2 kill in {}: {e}", home.display());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            // SAFETY: plain kill(2) of the daemon this bench started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    fn fl(&self, args: &[&str], home: &Path) -> Res<Ran> {
        self.run(&self.flotilla, args, Home::Flotilla(home))
    }

    fn pm2(&self, args: &[&str], home: &Path) -> Res<Ran> {
        self.run(Path::new("pm2"), args, Home::Pm2(home))
    }

    fn new_flotilla_home(&mut self, name: &str) -> PathBuf {
        let h = self.root.join(name);
        self.flotilla_homes.push(h.clone());
        h
    }

    fn new_pm2_home(&mut self, name: &str) -> PathBuf {
        let h = self.root.join(name);
        self.pm2_homes.push(h.clone());
        h
    }

    // -----------------------------------------------------------------------------------------
    // The cases.

    /// Node cluster primary: from spawn to ALL_ONLINE, and to the 4th boot mark; returns once
    /// the primary and its workers have exited.
    fn floor(&self) -> Res<(Duration, Duration)> {
        self.check()?;
        let marks = self.watch_marks()?;
        let mut c = Command::new("node");
        c.arg(self.app_dir.join("primary.js"))
            .current_dir(&self.app_dir)
            .env("BENCH_MARK_DIR", self.marks())
            .env("BENCH_APP", self.app_dir.join("app.js"))
            .env("BENCH_W", WORKERS.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let t0 = Instant::now();
        let mut child = c.spawn().map_err(|e| format!("node: {e}"))?;
        let pid = child.id() as i32;
        let dog = watchdog(pid, COMMAND_WITHIN);
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let mut took = None;
        for l in lines.by_ref() {
            if l.map_err(|e| e.to_string())?.trim() == "ALL_ONLINE" {
                took = Some(t0.elapsed());
                break;
            }
        }
        let booted = marks.wait().map(|at| at.saturating_duration_since(t0));
        let mut workers = self.workers(&[]);
        // SAFETY: plain kill(2) of our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (status, _) = wait4(pid)?;
        let _ = dog.send(());
        self.exited(&mut workers, "the Node cluster workers")?;
        let took =
            took.ok_or_else(|| format!("the Node cluster primary ended ({})", exit_text(status)))?;
        Ok((
            took,
            booted.ok_or("the Node cluster workers left no boot marks")?,
        ))
    }

    /// `flotilla start app.js -i 4` in `home`: the command, when it started (for the log's
    /// stamps), the time to the 4th boot mark, and the workers watched for their exit; checks
    /// that 4 are online afterwards.
    fn flotilla_start(&self, home: &Path) -> Res<(Ran, SystemTime, Duration, Exits)> {
        let marks = self.watch_marks()?;
        let at = SystemTime::now();
        let t0 = Instant::now();
        let r = self.fl(&["start", "app.js", "-i", &WORKERS.to_string()], home)?;
        let booted = marks
            .wait()
            .ok_or("the flotilla workers left no boot marks")?
            .saturating_duration_since(t0);
        let workers = self.workers(&[]);
        let ls = self.fl(&["ls", "--json"], home)?;
        let online = count_online(&ls.out, |p| p.get("status"));
        if online != WORKERS {
            return Err(format!(
                "after `flotilla start` {online} of {WORKERS} are online: {}",
                ls.out
            ));
        }
        Ok((r, at, booted, workers))
    }

    /// pm2 cold: `pm2 start` (its return time), then `pm2 jlist` until 4 are online; the
    /// polls that took, the time to the 4th boot mark, and the workers and pm2's daemon watched
    /// for their exit.
    fn pm2_cold(&self, home: &Path) -> Res<Pm2Cold> {
        let marks = self.watch_marks()?;
        let t0 = Instant::now();
        let r = self.pm2(&["start", "app.js", "-i", &WORKERS.to_string()], home)?;
        let mut polls = 0;
        loop {
            let j = self.pm2(&["jlist"], home)?;
            polls += 1;
            let online = count_online(&j.out, |p| p.get("pm2_env").and_then(|e| e.get("status")));
            if online >= WORKERS {
                let online = t0.elapsed();
                let booted = marks
                    .wait()
                    .ok_or("the pm2 workers left no boot marks")?
                    .saturating_duration_since(t0);
                let daemon = pm2_daemon_pid(home).into_iter().collect::<Vec<_>>();
                return Ok(Pm2Cold {
                    ret: r.wall,
                    online,
                    polls,
                    last_poll: j.wall,
                    booted,
                    exits: self.workers(&daemon),
                });
            }
            if t0.elapsed() > ONLINE_WITHIN {
                return Err(format!(
                    "pm2: {online} of {WORKERS} online {ONLINE_WITHIN:?} after `pm2 start`"
                ));
            }
        }
    }

    fn measure(&mut self) -> Res<()> {
        std::fs::create_dir_all(&self.app_dir).map_err(|e| e.to_string())?;
        for (name, text) in [("app.js", APP_JS), ("primary.js", PRIMARY_JS)] {
            std::fs::write(self.app_dir.join(name), text).map_err(|e| e.to_string())?;
        }
        let rounds = knob("BENCH_ROUNDS", ROUNDS).max(1);
        let ls_calls = knob("BENCH_LS_CALLS", LS_CALLS).max(1);

        let probe = self.new_pm2_home("pm2-probe");
        let pm2_version = self
            .pm2(&["--version"], &probe)
            .ok()
            .map(|r| r.out.trim().lines().last().unwrap_or("?").to_string());
        self.pm2 = pm2_version.is_some();
        println!(
            "{}",
            machine(&format!(
                "; pm2 {}",
                pm2_version.as_deref().unwrap_or("not installed")
            ))
        );
        println!(
            "app: {} (setInterval, exits on SIGINT); {WORKERS} workers per tool; {rounds} interleaved rounds; {ls_calls} calls per listing command",
            self.app_dir.join("app.js").display()
        );
        println!();

        // The warm stack, started once (not measured), with one discarded start/delete.
        let warm = self.new_flotilla_home("flotilla-warm");
        self.fl(&["ls"], &warm)?;
        let (_, _, _, mut workers) = self.flotilla_start(&warm)?;
        self.fl(&["delete", "all"], &warm)?;
        self.exited(&mut workers, "the deleted flotilla workers")?;
        self.floor()?;

        let mut s = Samples::default();
        for round in 0..rounds {
            let mut steps: Vec<u8> = vec![0, 1, 2, 3];
            if round % 2 == 1 {
                steps.reverse();
            }
            eprintln!("round {}/{rounds}", round + 1);
            for step in steps {
                match step {
                    0 => {
                        let (online, booted) = self.floor()?;
                        s.floor.push(online);
                        s.floor_booted.push(booted);
                    }
                    1 => {
                        let (r, at, booted, mut workers) = self.flotilla_start(&warm)?;
                        s.warm.push(r.wall);
                        s.warm_booted.push(booted);
                        s.warm_cpu.push(r.cpu);
                        s.warm_phases.push(phases(&warm, at, r.wall, false));
                        let d = self.fl(&["delete", "all"], &warm)?;
                        s.delete.push(d.wall);
                        self.exited(&mut workers, "the deleted flotilla workers")?;
                    }
                    2 => {
                        let home = self.new_flotilla_home(&format!("flotilla-cold-{round}"));
                        let (r, at, booted, workers) = self.flotilla_start(&home)?;
                        let (daemon, nats) = stack_pids(&home)?;
                        let mut all = Exits::watch(&[daemon, nats]);
                        all.extend(workers);
                        s.cold.push(r.wall);
                        s.cold_booted.push(booted);
                        s.cold_phases.push(phases(&home, at, r.wall, true));
                        let k = self.fl(&["kill"], &home)?;
                        s.kill.push(k.wall);
                        self.exited(&mut all, "the killed flotilla stack and workers")?;
                    }
                    _ if self.pm2 => {
                        let home = self.new_pm2_home(&format!("pm2-cold-{round}"));
                        let mut c = self.pm2_cold(&home)?;
                        s.pm2_return.push(c.ret);
                        s.pm2_online.push(c.online);
                        s.pm2_polls.push(c.polls);
                        s.pm2_booted.push(c.booted);
                        s.pm2_last_poll.push(c.last_poll);
                        let k = self.pm2(&["kill"], &home)?;
                        s.pm2_kill.push(k.wall);
                        self.exited(&mut c.exits, "the killed pm2 daemon and workers")?;
                    }
                    _ => {}
                }
            }
        }

        // Steady state: 4 workers under the warm stack, and under a pm2 daemon.
        eprintln!("steady state: ls and memory");
        self.flotilla_start(&warm)?;
        let steady_pm2 = self.new_pm2_home("pm2-steady");
        if self.pm2 {
            self.pm2_cold(&steady_pm2)?;
        }
        std::thread::sleep(STEADY_AFTER);
        let stack = stack_pids(&warm)?;
        let pm2_pid = if self.pm2 {
            Some(pm2_daemon_pid(&steady_pm2).ok_or("pm2.pid is missing")?)
        } else {
            None
        };
        let mem_before = self.memory(stack, pm2_pid)?;

        // Warm-up calls, then the interleaved listing calls.
        let cmds: Vec<(&str, bool, &[&str])> = [
            ("flotilla ls", true, &["ls"][..]),
            ("flotilla ls --json", true, &["ls", "--json"][..]),
            ("pm2 ls", false, &["ls"][..]),
            ("pm2 jlist", false, &["jlist"][..]),
        ]
        .into_iter()
        .filter(|(_, f, _)| *f || self.pm2)
        .collect();
        let mut calls: Vec<Calls> = cmds.iter().map(|_| Calls::default()).collect();
        for (_, f, args) in &cmds {
            if *f {
                self.fl(args, &warm)?;
            } else {
                self.pm2(args, &steady_pm2)?;
            }
        }
        for i in 0..ls_calls {
            for k in 0..cmds.len() {
                let k = (k + i) % cmds.len();
                let (_, f, args) = cmds[k];
                let server: Vec<u32> = if f {
                    vec![stack.0, stack.1]
                } else {
                    pm2_pid.into_iter().collect()
                };
                let before: f64 = cpu_of(&server);
                let r = if f {
                    self.fl(args, &warm)?
                } else {
                    self.pm2(args, &steady_pm2)?
                };
                let after: f64 = cpu_of(&server);
                let c = &mut calls[k];
                c.wall.push(r.wall);
                c.cpu.push(r.cpu);
                c.rss.push(r.maxrss_kib);
                c.server_cpu_s += after - before;
                if i == 0 && f && args == ["ls"] && r.out.matches("online").count() != WORKERS {
                    return Err(format!(
                        "`flotilla ls` does not show {WORKERS} online:\n{}",
                        r.out
                    ));
                }
            }
        }
        let mem_after = self.memory(stack, pm2_pid)?;

        s.print(&calls, &cmds, mem_before, mem_after, self.pm2);
        Ok(())
    }

    /// Median over 5 readings, 200 ms apart: (daemon, nats-server, pm2 daemon) VmRSS in KiB.
    fn memory(&self, stack: (u32, u32), pm2: Option<u32>) -> Res<Mem> {
        let mut d = vec![];
        let mut n = vec![];
        let mut p = vec![];
        for i in 0..5 {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            self.check()?;
            d.push(vm_rss(stack.0).ok_or("the daemon is gone")?);
            n.push(vm_rss(stack.1).ok_or("nats-server is gone")?);
            if let Some(pid) = pm2 {
                p.push(vm_rss(pid).ok_or("pm2's daemon is gone")?);
            }
        }
        Ok(Mem {
            daemon: median(d).unwrap_or(0),
            nats: median(n).unwrap_or(0),
            pm2: pm2.map(|_| median(p.clone()).unwrap_or(0)),
        })
    }
}

/// Entries of a JSON array (after any text before the `[`) whose status is "online".
fn count_online(out: &str, status: impl Fn(&Value) -> Option<&Value>) -> usize {
    let Some(start) = out.find('[') else {
        return 0;
    };
    let Ok(Value::Array(v)) = serde_json::from_str::<Value>(&out[start..]) else {
        return 0;
    };
    v.iter()
        .filter(|p| status(p).and_then(Value::as_str) == Some("online"))
        .count()
}

/// (daemon pid, nats-server pid) from `<home>/stack.json`.
fn stack_pids(home: &Path) -> Res<(u32, u32)> {
    let text = std::fs::read_to_string(home.join("stack.json")).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let get = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|p| p as u32)
            .ok_or(format!("stack.json has no {k}"))
    };
    Ok((get("pid")?, get("nats_pid")?))
}

/// Watches a folder (inotify) for `n` new files in a thread; [`Marks::wait`] says when the
/// `n`th came.
struct Marks {
    done: mpsc::Receiver<Option<Instant>>,
}

impl Marks {
    fn watch(dir: &Path, n: usize, within: Duration) -> Res<Marks> {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain inotify calls; the fd is owned by the thread below, which closes it.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(format!("inotify: {}", std::io::Error::last_os_error()));
        }
        let mut c = dir.as_os_str().as_bytes().to_vec();
        c.push(0);
        // SAFETY: `c` is NUL-terminated.
        let wd = unsafe {
            libc::inotify_add_watch(fd, c.as_ptr().cast(), libc::IN_CREATE | libc::IN_MOVED_TO)
        };
        if wd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: ours.
            unsafe { libc::close(fd) };
            return Err(format!("inotify on {}: {e}", dir.display()));
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let deadline = Instant::now() + within;
            let mut seen = 0;
            let mut buf = vec![0u8; 64 * 1024];
            let at = loop {
                if Instant::now() > deadline {
                    break None;
                }
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
                // SAFETY: reading into our buffer.
                let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if got <= 0 {
                    continue;
                }
                let now = Instant::now();
                let (mut off, got) = (0usize, got as usize);
                let head = std::mem::size_of::<libc::inotify_event>();
                while off + head <= got {
                    // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                    let ev: libc::inotify_event =
                        unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                    seen += 1;
                    off += head + ev.len as usize;
                }
                if seen >= n {
                    break Some(now);
                }
            };
            // SAFETY: ours.
            unsafe { libc::close(fd) };
            let _ = tx.send(at);
        });
        Ok(Marks { done: rx })
    }

    /// When the `n`th file came (None: not within the deadline).
    fn wait(self) -> Option<Instant> {
        self.done.recv().ok().flatten()
    }
}

// ---------------------------------------------------------------------------------------------
// Phases of a start, from the daemon's log.

/// Milliseconds from the CLI's spawn to: nats-server up, stack ready (cold only), the first and
/// the last worker online; and the CLI's exit.
#[derive(Clone, Copy, Default)]
struct Phases {
    nats_up: Option<f64>,
    ready: Option<f64>,
    first_online: Option<f64>,
    last_online: Option<f64>,
    exit: f64,
}

/// Epoch microseconds of a log line's RFC 3339 UTC stamp ("2026-12-01T21:51:56.511974Z").
fn stamp_us(line: &str) -> Option<i64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let frac_us = format!("{frac:0<6}")[..6].parse::<i64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + frac_us)
}

fn phases(home: &Path, at: SystemTime, wall: Duration, cold: bool) -> Phases {
    let t0 = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let end = t0 + wall.as_micros() as i64;
    let log = std::fs::read_to_string(home.join("daemon.log")).unwrap_or_default();
    let mut p = Phases {
        exit: wall.as_secs_f64() * 1e3,
        ..Phases::default()
    };
    let ms = |us: i64| (us - t0) as f64 / 1e3;
    let mut online = 0;
    for line in log.lines() {
        let Some(us) = stamp_us(line) else { continue };
        if us < t0 || us > end {
            continue;
        }
        if cold && line.contains("nats-server is up") {
            p.nats_up.get_or_insert(ms(us));
        } else if cold && line.contains("the local stack is ready") {
            p.ready.get_or_insert(ms(us));
        } else if line.contains("worker online") {
            online += 1;
            p.first_online.get_or_insert(ms(us));
            if online <= WORKERS {
                p.last_online = Some(ms(us));
            }
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Results.

struct Pm2Cold {
    ret: Duration,
    online: Duration,
    polls: usize,
    /// The wall time of the `pm2 jlist` call that found the 4 online.
    last_poll: Duration,
    booted: Duration,
    exits: Exits,
}

#[derive(Default)]
struct Samples {
    floor: Vec<Duration>,
    floor_booted: Vec<Duration>,
    warm_booted: Vec<Duration>,
    cold_booted: Vec<Duration>,
    pm2_booted: Vec<Duration>,
    warm: Vec<Duration>,
    warm_cpu: Vec<Duration>,
    warm_phases: Vec<Phases>,
    delete: Vec<Duration>,
    cold: Vec<Duration>,
    cold_phases: Vec<Phases>,
    kill: Vec<Duration>,
    pm2_return: Vec<Duration>,
    pm2_online: Vec<Duration>,
    pm2_polls: Vec<usize>,
    pm2_last_poll: Vec<Duration>,
    pm2_kill: Vec<Duration>,
}

#[derive(Default)]
struct Calls {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
    rss: Vec<u64>,
    server_cpu_s: f64,
}

#[derive(Clone, Copy)]
struct Mem {
    daemon: u64,
    nats: u64,
    pm2: Option<u64>,
}

fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1e3;
    if m < 100.0 {
        format!("{m:.1} ms")
    } else {
        format!("{m:.0} ms")
    }
}

fn list(v: &[Duration]) -> String {
    v.iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ratio flotilla / reference and whether it meets `target` (a ratio at most this).
fn judge(f: f64, r: Option<f64>, target: Option<f64>) -> (String, String) {
    match r {
        Some(r) if r > 0.0 => {
            let x = f / r;
            let met = target.map_or("-".into(), |t| {
                if x <= t {
                    "met".into()
                } else {
                    "MISSED".into()
                }
            });
            (format!("{x:.2}x"), met)
        }
        Some(_) => ("-".into(), "-".into()),
        None => (
            "-".into(),
            target.map_or("-".into(), |_| "- (no pm2)".into()),
        ),
    }
}

impl Samples {
    fn print(
        &self,
        calls: &[Calls],
        cmds: &[(&str, bool, &[&str])],
        mem: Mem,
        mem_after: Mem,
        pm2: bool,
    ) {
        let none = "pm2 not installed".to_string();
        let mut rows: Vec<[String; 6]> = vec![];
        let mut row =
            |figure: &str, f: String, r: String, (ratio, met): (String, String), target: &str| {
                rows.push([figure.into(), f, r, ratio, target.into(), met]);
            };
        let secs = |d: Duration| d.as_secs_f64();

        // The warm target is on the like-for-like row: both until the 4 workers have booted,
        // seen by the same means (their boot marks). Flotilla's "online" (the CLI's return)
        // and Node's 'online' event are different moments, so that row has no target.
        let (warm_b, floor_b) = (
            median_duration(&self.warm_booted),
            median_duration(&self.floor_booted),
        );
        row(
            "warm `start app.js -i 4`, until the 4 workers have booted (ref: Node cluster primary, same)",
            ms(warm_b),
            ms(floor_b),
            judge(secs(warm_b), Some(secs(floor_b)), Some(1.2)),
            "<= 1.2x",
        );
        let (warm, floor) = (median_duration(&self.warm), median_duration(&self.floor));
        row(
            "  warm, to the CLI's return, 4 online (ref: Node's 4 'online' events; not like for like)",
            ms(warm),
            ms(floor),
            judge(secs(warm), Some(secs(floor)), None),
            "-",
        );
        let cold = median_duration(&self.cold);
        let (pm2_online, pm2_ret) = (
            median_duration(&self.pm2_online),
            median_duration(&self.pm2_return),
        );
        // pm2's "online" is seen by polling `pm2 jlist`, a Node CLI whose own start costs a few
        // hundred ms: the poll that finds the 4 online adds its cost to the raw figure. The
        // adjusted reference takes out one call's cost, the median wall time of `pm2 jlist` on
        // a running daemon with 4 workers (the listing calls below). The earlier polls found
        // fewer than 4 online: their time is waiting pm2 really needed, and stays.
        let jlist = cmds
            .iter()
            .position(|(n, _, _)| *n == "pm2 jlist")
            .map(|i| median_duration(&calls[i].wall));
        let pm2_adjusted = jlist.map(|j| pm2_online.saturating_sub(j));
        row(
            "cold `start app.js -i 4`, stack spawned (ref: pm2 cold, until jlist shows 4 online, less one jlist call's cost)",
            ms(cold),
            match pm2_adjusted {
                Some(a) => ms(a),
                None => none.clone(),
            },
            judge(secs(cold), pm2_adjusted.map(secs), Some(0.4)),
            "<= 0.4x",
        );
        row(
            "  same, ref raw: until jlist shows 4 online, the last poll's cost included",
            ms(cold),
            if pm2 { ms(pm2_online) } else { none.clone() },
            judge(secs(cold), pm2.then(|| secs(pm2_online)), None),
            "-",
        );
        let (cold_b, pm2_b) = (
            median_duration(&self.cold_booted),
            median_duration(&self.pm2_booted),
        );
        row(
            "  same, both until the 4 workers have booted (their first line ran)",
            ms(cold_b),
            if pm2 { ms(pm2_b) } else { none.clone() },
            judge(secs(cold_b), pm2.then(|| secs(pm2_b)), None),
            "-",
        );
        row(
            "cold `start app.js -i 4` (ref: `pm2 start` returning)",
            ms(cold),
            if pm2 { ms(pm2_ret) } else { none.clone() },
            judge(secs(cold), pm2.then(|| secs(pm2_ret)), None),
            "-",
        );
        let find = |name: &str| {
            cmds.iter()
                .position(|(n, _, _)| *n == name)
                .map(|i| &calls[i])
        };
        let fl_ls = find("flotilla ls");
        let fl_json = find("flotilla ls --json");
        let pm_ls = find("pm2 ls");
        let pm_jl = find("pm2 jlist");
        let wall = |c: Option<&Calls>| c.map(|c| median_duration(&c.wall));
        let cpu = |c: Option<&Calls>| c.map(|c| median_duration(&c.cpu));
        let rss = |c: Option<&Calls>| c.map(|c| median(c.rss.clone()).unwrap_or(0));
        let srv = |c: Option<&Calls>| c.map(|c| c.server_cpu_s * 1e3 / c.wall.len().max(1) as f64);
        let or_none = |v: Option<String>| v.unwrap_or_else(|| none.clone());
        if let Some(l) = wall(fl_ls) {
            let met = if l < Duration::from_millis(20) {
                "met"
            } else {
                "MISSED"
            };
            let (ratio, _) = judge(secs(l), wall(pm_ls).map(secs), None);
            row(
                "`ls`, 4 workers, wall (ref: `pm2 ls`)",
                ms(l),
                or_none(wall(pm_ls).map(ms)),
                (ratio, met.into()),
                "< 20 ms",
            );
        }
        if let Some(l) = wall(fl_json) {
            row(
                "`ls --json`, wall (ref: `pm2 jlist`)",
                ms(l),
                or_none(wall(pm_jl).map(ms)),
                judge(secs(l), wall(pm_jl).map(secs), None),
                "-",
            );
        }
        if let Some(c) = cpu(fl_ls) {
            row(
                "`ls`, CPU of the CLI process, user+sys (ref: `pm2 ls`)",
                ms(c),
                or_none(cpu(pm_ls).map(ms)),
                judge(secs(c), cpu(pm_ls).map(secs), None),
                "-",
            );
        }
        if let Some(m) = rss(fl_ls) {
            row(
                "`ls`, max RSS of the CLI process (ref: `pm2 ls`)",
                mib(m),
                or_none(rss(pm_ls).map(mib)),
                judge(m as f64, rss(pm_ls).map(|v| v as f64), None),
                "-",
            );
        }
        if let Some(c) = srv(fl_ls) {
            row(
                "`ls`, CPU of the stack answering: daemon + nats-server (ref: pm2 daemon)",
                format!("{c:.1} ms"),
                or_none(srv(pm_ls).map(|v| format!("{v:.1} ms"))),
                judge(c, srv(pm_ls), None),
                "-",
            );
        }
        let fl_mem = mem.daemon + mem.nats;
        row(
            "RSS, 4 workers: daemon + nats-server (ref: pm2 daemon, PM2_HOME/pm2.pid)",
            format!("{} ({} + {})", mib(fl_mem), mib(mem.daemon), mib(mem.nats)),
            or_none(mem.pm2.map(mib)),
            judge(fl_mem as f64, mem.pm2.map(|v| v as f64), Some(0.5)),
            "<= 0.5x",
        );
        print_aligned(
            &["figure", "flotilla", "reference", "ratio", "target", "met?"],
            &rows,
            &[false, true, true, true, false, false],
        );
        println!(
            "(Medians: start cases over {} interleaved rounds, listing commands over {} calls each, RSS over 5 readings 200 ms apart taken 2 s after the workers started. Ratio = flotilla / reference.)",
            self.warm.len(),
            fl_ls.map_or(0, |c| c.wall.len())
        );
        println!();
        println!("Rounds in run order (ms):");
        let mut lines: Vec<(&str, String)> = vec![
            ("Node cluster floor, 4 online", list(&self.floor)),
            ("Node cluster floor, 4 booted", list(&self.floor_booted)),
            ("flotilla warm start", list(&self.warm)),
            ("flotilla warm, 4 booted", list(&self.warm_booted)),
            ("flotilla cold start", list(&self.cold)),
            ("flotilla cold, 4 booted", list(&self.cold_booted)),
        ];
        if pm2 {
            lines.push(("pm2 cold, until 4 online", list(&self.pm2_online)));
            lines.push(("pm2 cold, 4 booted", list(&self.pm2_booted)));
            lines.push(("pm2 cold, `pm2 start` returned", list(&self.pm2_return)));
            lines.push(("pm2 cold, the last jlist poll", list(&self.pm2_last_poll)));
            lines.push((
                "pm2 jlist polls until online",
                self.pm2_polls
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        lines.push(("flotilla delete all (4 workers)", list(&self.delete)));
        lines.push(("flotilla kill (4 workers)", list(&self.kill)));
        if pm2 {
            lines.push(("pm2 kill (4 workers)", list(&self.pm2_kill)));
        }
        for (name, v) in &lines {
            println!("  {name:32} {v}");
        }
        println!(
            "  warm start CPU of the CLI process: median {}",
            ms(median_duration(&self.warm_cpu))
        );
        println!();
        println!(
            "Where a flotilla start's time goes (ms from the CLI's spawn, medians; from the daemon's log stamps):"
        );
        let ph = |v: &[Phases], f: fn(&Phases) -> Option<f64>| {
            median(v.iter().filter_map(f).collect()).map_or("-".into(), |m| format!("{m:.1}"))
        };
        for (name, v) in [("cold", &self.cold_phases), ("warm", &self.warm_phases)] {
            println!(
                "  {name}: nats-server up {} | stack ready {} | first worker online {} | 4th online {} | CLI exit {}",
                ph(v, |p| p.nats_up),
                ph(v, |p| p.ready),
                ph(v, |p| p.first_online),
                ph(v, |p| p.last_online),
                ph(v, |p| Some(p.exit)),
            );
        }
        println!();
        println!(
            "Listing commands ({} calls each; wall min-median-max, CPU and max RSS of the CLI process, CPU of the server side per call):",
            fl_ls.map_or(0, |c| c.wall.len())
        );
        for ((name, _, _), c) in cmds.iter().zip(calls) {
            let mut w = c.wall.clone();
            w.sort();
            println!(
                "  {name:20} {} / {} / {} | CPU {} | RSS {} | server {:.1} ms",
                ms(w[0]),
                ms(median_duration(&w)),
                ms(w[w.len() - 1]),
                ms(median_duration(&c.cpu)),
                mib(median(c.rss.clone()).unwrap_or(0)),
                c.server_cpu_s * 1e3 / c.wall.len().max(1) as f64
            );
        }
        println!(
            "RSS after the listing calls: daemon {} + nats-server {}{}",
            mib(mem_after.daemon),
            mib(mem_after.nats),
            mem_after
                .pm2
                .map_or(String::new(), |p| format!("; pm2 daemon {}", mib(p)))
        );
    }
}
