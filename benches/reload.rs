//! Reload benchmark: `cargo bench --bench reload`.
//!
//! One unmodified Node http app (`listen(PORT)` in the app, nothing Flotilla-specific) runs as 4
//! cluster instances on one port, first under Flotilla (its local stack, a fresh
//! `FLOTILLA_HOME`), then under pm2 when it is installed (a fresh `PM2_HOME`). A load generator
//! in this process (tokio, loopback) keeps [`CLIENTS`] requests in flight while the bench waits
//! [`STEADY`], then runs `reload` [`RELOADS`] times with [`STEADY`] between them, and once more
//! [`STEADY`] after the last. Two load shapes, each a separate run per tool:
//! - `new connection`: every request opens its own connection (`Connection: close`), which is
//!   where a closed or missing listener shows as refused connections;
//! - `keep-alive`: each client keeps its connection (as wrk does); a worker that goes away
//!   closes connections other clients are about to use.
//!
//! Each tool runs [`RUNS`] times per shape, interleaved (flotilla then pm2, pm2 then flotilla,
//! ...), each run in a fresh home. The table shows medians over the runs of: requests served,
//! errors by kind (target 0), the request rate and latency percentiles in steady state
//! (outside any reload) and during the reloads, and the wall time of the reloads; then the
//! ratio of Flotilla's figure to pm2's. A reload's window runs from the `reload` command's
//! spawn until it has returned and every worker that ran before it has exited (watched through
//! pidfds; `reload` may return while old workers are still stopping), and a request counts as
//! "during" when it started inside a window. BENCHMARKS.md records a run.
//!
//! Every command runs under a deadline; everything the bench started is stopped at the end
//! (`flotilla kill`, `pm2 kill`), on error too.

mod common;

use common::procfs::Exits;
use common::stats::{median, percentile_duration};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Instances of the app.
const WORKERS: usize = 4;
/// Requests kept in flight (BENCH_CLIENTS overrides it).
const CLIENTS: usize = 16;
/// Reloads per run.
const RELOADS: usize = 3;
/// Steady load before, between and after the reloads.
const STEADY: Duration = Duration::from_secs(3);
/// Longest one request may take before it counts as an error.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);
/// Longest one command may take.
const COMMAND_WITHIN: Duration = Duration::from_secs(120);
/// Longest the workers that ran before a reload may take to exit after `reload` returned.
const OLD_EXIT_WITHIN: Duration = Duration::from_secs(30);
/// Runs of each tool per load shape (BENCH_RUNS overrides it).
const RUNS: usize = 3;

/// The app: unmodified, as pm2 users write it.
const APP_JS: &str = include_str!("js/reload/app.js");

type Res<T> = Result<T, String>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    NewConnection,
    KeepAlive,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::NewConnection => "new connection per request",
            Shape::KeepAlive => "keep-alive connections",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Flotilla,
    Pm2,
}

/// One request's outcome.
struct Sample {
    /// Since the load began.
    at: Duration,
    latency: Duration,
    error: Option<ErrorKind>,
    /// The request opened its connection (else it reused a kept-alive one).
    fresh: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ErrorKind {
    /// connect() failed (refused: no listener).
    Refused,
    /// The connection was reset or closed before a whole answer.
    Reset,
    /// No answer within REQUEST_WITHIN.
    Timeout,
}

/// The figures of one run.
struct Outcome {
    served: usize,
    refused: usize,
    reset: usize,
    timeout: usize,
    steady_rps: f64,
    reload_rps: f64,
    steady_p50: Duration,
    steady_p99: Duration,
    reload_p50: Duration,
    reload_p99: Duration,
    reload_max: Duration,
    /// Each reload's window: from the command's spawn until the old workers had exited.
    reload_wall: Vec<Duration>,
    /// Each `reload` command's own wall time.
    reload_cli: Vec<Duration>,
    /// Errors per reload window (a request that started during it), then outside any.
    errors_by_window: Vec<usize>,
    errors_outside: usize,
    /// The slowest answered requests: (started at, latency, on a new connection).
    slowest: Vec<(Duration, Duration, bool)>,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("reload: a benchmark; run it with `cargo bench --bench reload`");
        return;
    }
    let root = match tempfile::Builder::new()
        .prefix("flotilla-reload-bench")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("reload bench: cannot create a temporary folder: {e}");
            std::process::exit(1);
        }
    };
    let clients = common::knob("BENCH_CLIENTS", CLIENTS);
    let runs = common::knob("BENCH_RUNS", RUNS).max(1);
    let mut bench = Bench {
        root: root.path().to_path_buf(),
        flotilla: PathBuf::from(env!("CARGO_BIN_EXE_flotilla")),
        homes: vec![],
        pm2_homes: vec![],
    };
    // Its last line: pm2 may say other things first.
    let pm2 = common::command_line("pm2", &["--version"])
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let has_pm2 = pm2.chars().next().is_some_and(|c| c.is_ascii_digit());
    println!(
        "{}",
        common::machine(&format!(
            "; pm2 {}",
            if has_pm2 {
                pm2.as_str()
            } else {
                "not installed"
            }
        ))
    );
    println!(
        "load: {clients} requests in flight on loopback, {WORKERS} instances of an unmodified Node http \
         server, {RELOADS} reloads with {} s of steady load before, between and after; {runs} runs \
         of each tool per shape, interleaved; medians over the runs\n",
        STEADY.as_secs()
    );
    let mut failed = false;
    for shape in [Shape::NewConnection, Shape::KeepAlive] {
        let (mut fl, mut p2) = (vec![], vec![]);
        for run in 0..runs {
            let mut order = vec![Tool::Flotilla];
            if has_pm2 {
                order.push(Tool::Pm2);
            }
            if run % 2 == 1 {
                order.reverse();
            }
            for tool in order {
                let name = match tool {
                    Tool::Flotilla => "flotilla",
                    Tool::Pm2 => "pm2",
                };
                eprintln!("{} , {name}, run {}/{runs}", shape.label(), run + 1);
                match bench.run(tool, shape, clients) {
                    Ok(o) if tool == Tool::Flotilla => fl.push(o),
                    Ok(o) => p2.push(o),
                    Err(e) => {
                        eprintln!("{name} ({}): {e}", shape.label());
                        failed = true;
                    }
                }
            }
        }
        print_table(shape, &fl, has_pm2.then_some(&p2[..]));
    }
    drop(bench);
    if failed {
        std::process::exit(1);
    }
}

struct Bench {
    root: PathBuf,
    flotilla: PathBuf,
    homes: Vec<PathBuf>,
    pm2_homes: Vec<PathBuf>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for h in self.homes.clone() {
            if h.join("daemon.lock").exists()
                && let Err(e) = self.command(Tool::Flotilla, &h, &["kill"], 0)
            {
                eprintln!("cleanup: flotilla kill in {}: {e}", h.display());
            }
        }
        for h in self.pm2_homes.clone() {
            if let Err(e) = self.command(Tool::Pm2, &h, &["kill"], 0) {
                eprintln!("cleanup: pm2 kill in {}: {e}", h.display());
            }
        }
    }
}

impl Bench {
    /// Runs `flotilla ARGS` or `pm2 ARGS` with its own home and PORT, to its end, under a
    /// deadline; a non-zero exit is an error.
    fn command(&self, tool: Tool, home: &Path, args: &[&str], port: u16) -> Res<String> {
        let (program, home_var) = match tool {
            Tool::Flotilla => (self.flotilla.as_path(), "FLOTILLA_HOME"),
            Tool::Pm2 => (Path::new("pm2"), "PM2_HOME"),
        };
        let mut c = Command::new(program);
        c.args(args).current_dir(&self.root);
        common::clear_tool_env(&mut c);
        c.env(home_var, home).env("PORT", port.to_string());
        // Files, not pipes: a daemon the command starts must not hold our reading end open.
        let n = self.homes.len() * 1000 + self.pm2_homes.len() * 100 + args.len();
        let out_path = self.root.join(format!("out-{n}-{}", std::process::id()));
        let err_path = self.root.join(format!("err-{n}-{}", std::process::id()));
        let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        c.stdin(Stdio::null())
            .stdout(file(&out_path)?)
            .stderr(file(&err_path)?);
        let mut child = c
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        let deadline = Instant::now() + COMMAND_WITHIN;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} {args:?}: no end within {COMMAND_WITHIN:?}",
                        program.display()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for {}: {e}", program.display())),
            }
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        if !status.success() {
            return Err(format!(
                "{} {args:?} failed ({status}): {}",
                program.display(),
                read(&err_path).trim()
            ));
        }
        Ok(read(&out_path))
    }

    fn run(&mut self, tool: Tool, shape: Shape, clients: usize) -> Res<Outcome> {
        static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let home = self.root.join(format!("home-{n}"));
        match tool {
            Tool::Flotilla => self.homes.push(home.clone()),
            Tool::Pm2 => self.pm2_homes.push(home.clone()),
        }
        let app = self.root.join("server.js");
        std::fs::write(&app, APP_JS).map_err(|e| format!("{}: {e}", app.display()))?;
        let port = free_port()?;
        let app_s = app.to_string_lossy().to_string();
        let workers = WORKERS.to_string();
        match tool {
            Tool::Flotilla => {
                let env = format!("PORT={port}");
                self.command(
                    tool,
                    &home,
                    &[
                        "start", &app_s, "--name", "rb", "-i", &workers, "--env", &env,
                    ],
                    port,
                )?;
            }
            Tool::Pm2 => {
                self.command(
                    tool,
                    &home,
                    &["start", &app_s, "--name", "rb", "-i", &workers],
                    port,
                )?;
            }
        }
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_serving(addr)?;
        // The load runs on its own runtime while this thread drives the reloads.
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio: {e}"))?;
        let began = Instant::now();
        let load = {
            let stop = stop.clone();
            rt.spawn(async move {
                let tasks: Vec<_> = (0..clients)
                    .map(|_| tokio::spawn(client(addr, shape, began, stop.clone())))
                    .collect();
                let mut all = vec![];
                for t in tasks {
                    all.extend(t.await.unwrap_or_default());
                }
                all
            })
        };
        let mut windows = vec![];
        let mut cli = vec![];
        std::thread::sleep(STEADY);
        let mut result = Ok(());
        for _ in 0..RELOADS {
            // The workers running now, watched so that the window lasts until they are gone.
            let mut old = match self.pids(tool, &home, port) {
                Ok(p) => Exits::watch(&p),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let from = began.elapsed();
            if let Err(e) = self.command(tool, &home, &["reload", "rb"], port) {
                result = Err(e);
                break;
            }
            cli.push(began.elapsed() - from);
            if !old.wait(OLD_EXIT_WITHIN) {
                result = Err(format!(
                    "{} old workers still run {OLD_EXIT_WITHIN:?} after `reload` returned",
                    old.running()
                ));
                break;
            }
            windows.push((from, began.elapsed()));
            std::thread::sleep(STEADY);
        }
        stop.store(true, Ordering::SeqCst);
        let samples = rt
            .block_on(load)
            .map_err(|e| format!("the load generator failed: {e}"))?;
        let ended = began.elapsed();
        let _ = self.command(tool, &home, &["delete", "rb"], port);
        // Stop this run's stack or daemon now, so that it does not idle through the next runs.
        if self.command(tool, &home, &["kill"], port).is_ok() {
            self.homes.retain(|h| *h != home);
            self.pm2_homes.retain(|h| *h != home);
        }
        result?;
        let mut o = summarise(&samples, &windows, ended);
        o.reload_cli = cli;
        Ok(o)
    }

    /// The pids of the app's workers, from `flotilla ls --json` or `pm2 jlist`.
    fn pids(&self, tool: Tool, home: &Path, port: u16) -> Res<Vec<u32>> {
        let args: &[&str] = match tool {
            Tool::Flotilla => &["ls", "--json"],
            Tool::Pm2 => &["jlist"],
        };
        let out = self.command(tool, home, args, port)?;
        let list = out
            .find('[')
            .and_then(|i| serde_json::from_str::<serde_json::Value>(&out[i..]).ok())
            .and_then(|v| v.as_array().cloned())
            .ok_or_else(|| format!("{args:?}: not a JSON list: {out}"))?;
        let pids: Vec<u32> = list
            .iter()
            .filter_map(|p| p.get("pid")?.as_u64())
            .filter(|p| *p > 0)
            .map(|p| p as u32)
            .collect();
        if pids.len() != WORKERS {
            return Err(format!(
                "{args:?}: {} workers with a pid: {out}",
                pids.len()
            ));
        }
        Ok(pids)
    }
}

/// A free loopback port (bound and released; the app binds it next).
fn free_port() -> Res<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Waits until the app answers (its workers listen shortly after `start` returns).
fn wait_serving(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let mut out = String::new();
            if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok()
                && s.read_to_string(&mut out).is_ok()
                && out.contains("200 OK")
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("the app does not answer on {addr}"))
}

/// One client: requests back to back until `stop`.
async fn client(
    addr: SocketAddr,
    shape: Shape,
    began: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let request: &[u8] = match shape {
        Shape::NewConnection => b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        Shape::KeepAlive => b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
    };
    let mut samples = vec![];
    let mut conn: Option<tokio::net::TcpStream> = None;
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let at = start - began;
        let fresh = conn.is_none();
        let outcome = tokio::time::timeout(REQUEST_WITHIN, async {
            let mut c = match conn.take() {
                Some(c) => c,
                None => tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|_| ErrorKind::Refused)?,
            };
            c.write_all(request).await.map_err(|_| ErrorKind::Reset)?;
            let keep = read_response(&mut c, &mut buf).await?;
            if shape == Shape::KeepAlive && keep {
                conn = Some(c);
            }
            Ok::<(), ErrorKind>(())
        })
        .await;
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(ErrorKind::Timeout),
        };
        if error.is_some() {
            conn = None;
        }
        samples.push(Sample {
            at,
            latency: start.elapsed(),
            error,
            fresh,
        });
    }
    samples
}

/// Reads one HTTP/1.1 answer (headers, then `Content-Length` bytes, or to EOF without one);
/// returns whether the connection may be used again.
async fn read_response(c: &mut tokio::net::TcpStream, buf: &mut [u8]) -> Result<bool, ErrorKind> {
    let mut got: Vec<u8> = Vec::with_capacity(256);
    loop {
        let n = c.read(buf).await.map_err(|_| ErrorKind::Reset)?;
        if n == 0 {
            // Closed: a whole answer without Content-Length ends here; anything less is lost.
            return if head_end(&got).is_some() && content_length(&got).is_none() {
                Ok(false)
            } else {
                Err(ErrorKind::Reset)
            };
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = head_end(&got)
            && let Some(len) = content_length(&got[..end])
            && got.len() >= end + len
        {
            if !got.starts_with(b"HTTP/1.1 200") {
                return Err(ErrorKind::Reset);
            }
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            return Ok(!head.contains("connection: close"));
        }
    }
}

fn head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fn summarise(samples: &[Sample], windows: &[(Duration, Duration)], ended: Duration) -> Outcome {
    let during = |at: Duration| windows.iter().any(|(a, b)| at >= *a && at < *b);
    let (mut steady, mut reload) = (vec![], vec![]);
    let (mut refused, mut reset, mut timeout) = (0, 0, 0);
    let mut errors_by_window = vec![0; windows.len()];
    let mut errors_outside = 0;
    for s in samples.iter().filter(|s| s.error.is_some()) {
        match windows.iter().position(|(a, b)| s.at >= *a && s.at < *b) {
            Some(i) => errors_by_window[i] += 1,
            None => errors_outside += 1,
        }
    }
    for s in samples {
        match s.error {
            Some(ErrorKind::Refused) => refused += 1,
            Some(ErrorKind::Reset) => reset += 1,
            Some(ErrorKind::Timeout) => timeout += 1,
            None if during(s.at) => reload.push(s.latency),
            None => steady.push(s.latency),
        }
    }
    steady.sort();
    reload.sort();
    let reload_time: Duration = windows.iter().map(|(a, b)| *b - *a).sum();
    let steady_time = ended.saturating_sub(reload_time);
    let rate = |n: usize, d: Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    Outcome {
        served: steady.len() + reload.len(),
        refused,
        reset,
        timeout,
        steady_rps: rate(steady.len(), steady_time),
        reload_rps: rate(reload.len(), reload_time),
        steady_p50: percentile_duration(&steady, 0.50),
        steady_p99: percentile_duration(&steady, 0.99),
        reload_p50: percentile_duration(&reload, 0.50),
        reload_p99: percentile_duration(&reload, 0.99),
        reload_max: reload.last().copied().unwrap_or_default(),
        reload_wall: windows.iter().map(|(a, b)| *b - *a).collect(),
        reload_cli: vec![],
        errors_by_window,
        errors_outside,
        slowest: {
            let mut ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
            ok.sort_by_key(|s| std::cmp::Reverse(s.latency));
            ok.iter()
                .take(3)
                .map(|s| (s.at, s.latency, s.fresh))
                .collect()
        },
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The ratio cell: flotilla / pm2; `=` only when both are 0; `flotilla only` when pm2's is 0
/// and flotilla's is not; `-` when a side has no figure.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
        (Some(0.0), Some(_)) => "=".into(),
        (Some(_), Some(_)) => "flotilla only".into(),
        _ => "-".into(),
    }
}

fn print_table(shape: Shape, fl: &[Outcome], p2: Option<&[Outcome]>) {
    println!(
        "reload under load, {} (medians of {} flotilla and {} pm2 runs):",
        shape.label(),
        fl.len(),
        p2.map_or("no".into(), |p| p.len().to_string())
    );
    println!(
        "{:<34} {:>14} {:>14} {:>13}",
        "", "flotilla", "pm2", "ratio"
    );
    let med = |runs: &[Outcome], f: &dyn Fn(&Outcome) -> f64| median(runs.iter().map(f).collect());
    let row = |label: &str, f: &dyn Fn(&Outcome) -> f64, show: &dyn Fn(f64) -> String| {
        let a = med(fl, f);
        let b = p2.and_then(|p| med(p, f));
        println!(
            "{label:<34} {:>14} {:>14} {:>13}",
            a.map_or("failed".into(), show),
            match (p2, b) {
                (None, _) => "not installed".into(),
                (Some(_), None) => "failed".into(),
                (Some(_), Some(b)) => show(b),
            },
            ratio(a, b)
        );
    };
    let count = |v: f64| format!("{v:.0}");
    let rate = |v: f64| format!("{v:.0}/s");
    let dur = |v: f64| ms(Duration::from_secs_f64(v));
    let wall =
        |v: &[Duration]| median(v.iter().map(Duration::as_secs_f64).collect()).unwrap_or(0.0);
    row("requests served", &|o| o.served as f64, &count);
    row("errors: refused", &|o| o.refused as f64, &count);
    row("errors: reset or cut short", &|o| o.reset as f64, &count);
    row("errors: no answer in 5 s", &|o| o.timeout as f64, &count);
    row("rate, steady", &|o| o.steady_rps, &rate);
    row("rate, during reload", &|o| o.reload_rps, &rate);
    row("p50, steady", &|o| o.steady_p50.as_secs_f64(), &dur);
    row("p99, steady", &|o| o.steady_p99.as_secs_f64(), &dur);
    row("p50, during reload", &|o| o.reload_p50.as_secs_f64(), &dur);
    row("p99, during reload", &|o| o.reload_p99.as_secs_f64(), &dur);
    row("max, during reload", &|o| o.reload_max.as_secs_f64(), &dur);
    row(
        "reload, `reload` command's wall",
        &|o| wall(&o.reload_cli),
        &dur,
    );
    row(
        "reload, until old workers exited",
        &|o| wall(&o.reload_wall),
        &dur,
    );
    for (tool, runs) in [("flotilla", fl), ("pm2", p2.unwrap_or_default())] {
        for (i, o) in runs.iter().enumerate() {
            let errors = o.refused + o.reset + o.timeout;
            let slow: Vec<String> = o
                .slowest
                .iter()
                .map(|(at, lat, fresh)| {
                    format!(
                        "{} at {:.2} s ({})",
                        ms(*lat),
                        at.as_secs_f64(),
                        if *fresh {
                            "new connection"
                        } else {
                            "kept-alive"
                        }
                    )
                })
                .collect();
            println!(
                "{tool} run {}: errors {errors} (per reload {:?}, outside any reload {}); slowest answers {}",
                i + 1,
                o.errors_by_window,
                o.errors_outside,
                slow.join(", ")
            );
        }
    }
    println!();
}
