//! Relay benchmark: `cargo bench --bench relay`.
//!
//! Measures, in one run on this machine, side by side:
//! 1. the Node IPC ceiling: a plain Node parent forking 4 children that `process.send` bursts;
//! 2. the same 4 unmodified Node workers under a real `flotilla agent` process, counted by a
//!    `pm.>` subscriber (loss, p50/p99 worker-to-subscriber latency, agent RSS and CPU);
//! 3. a native source (this binary re-executed with `BENCH_NATIVE_SOURCE=1`, writing ready-made
//!    JSON lines to fd 3) through the agent, against raw async-nats publishing the same envelopes;
//! 4. scaling with 1, 4, 16 and 64 native workers;
//! 5. latency at a paced 4k msgs/s, agent against raw async-nats paced the same way;
//! 6. agent RSS with idle workers and through a 200k-message burst;
//! 7. pm2's bus with the same Node workers, when `pm2` is on PATH.
//!
//! The burst cases (1, 2, 3, 4 and 7) run [`ROUNDS`] times, interleaved round by round so that
//! drift on a shared machine hits every case alike; the table shows the median of each figure
//! and the lowest and highest msgs/s, and ratios are taken between medians.
//!
//! Every wait is an awaited event under a deadline; the whole run is bounded. The bench starts
//! its own `nats-server` on a free loopback port and kills everything it started at the end.
//! BENCHMARKS.md records a run and what the figures mean.

mod common;

use async_nats::{Client, ConnectOptions, HeaderMap, Subscriber};
use bytes::Bytes;
use common::procfs::{clk_tck, cpu_of, cpu_secs, mem_kib, reset_hwm, self_cpu};
use common::stats::{median, percentile, tail};
use common::table::{mib, print_aligned};
use common::{knob, machine};
use flotilla::protocol::control::{SendRequest, StartRequest, TargetRequest};
use flotilla::protocol::reply::AgentStats;
use flotilla::protocol::{AppSpec, Envelope, Reply, Request, Target};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader as AsyncBufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// The agent's host id.
const HOST: &str = "bench";
/// Node workers in the ceiling, relay and pm2 cases, and messages each sends.
const NODE_WORKERS: usize = 4;
const NODE_N: u64 = 50_000;
/// Native workers and messages each in the throughput case (the 200k-message burst).
const NATIVE_WORKERS: usize = 4;
const NATIVE_N: u64 = 50_000;
/// Scaling: worker counts, and the total messages each point sends.
const SCALE_WORKERS: [usize; 4] = [1, 4, 16, 64];
const SCALE_TOTAL: u64 = 200_000;
/// Paced latency: workers, messages per second each, seconds.
/// (BENCH_PACED_WORKERS, BENCH_PACED_RATE and BENCH_PACED_SECS override them, to investigate.)
const PACED_WORKERS: u64 = 4;
const PACED_RATE: u64 = 1_000;
const PACED_SECS: u64 = 5;
/// Padding so that one channel line is 400 bytes with its newline.
const PAD: usize = 328;
/// Deadline for readiness events and control replies.
const WAIT: Duration = Duration::from_secs(30);
/// A burst ends early when nothing arrives for this long (only when messages were lost).
const IDLE: Duration = Duration::from_secs(5);
/// Longest one burst may take.
const BURST_DEADLINE: Duration = Duration::from_secs(120);
/// Longest the whole bench may take.
const TOTAL_DEADLINE: Duration = Duration::from_secs(480);
/// Rounds of each burst case (BENCH_ROUNDS overrides it, to investigate).
const ROUNDS: u64 = 3;
/// The agent's heartbeat interval in the bench (BENCH_AGENT_FLOTILLA_HEARTBEAT_INTERVAL
/// overrides it). The agent trims its heap at the first heartbeat after a burst, and the bench
/// awaits that heartbeat before reading the agent's RSS; a short interval keeps that wait short.
const HEARTBEAT_INTERVAL: &str = "200ms";
/// A heartbeat stamped at least this long after the last message of a burst arrived comes from
/// a tick after the agent's queue had drained (the agent trims, asks its supervisor for a
/// summary, then stamps the heartbeat: well under this margin), so it has had its chance to trim.
const HEARTBEAT_MARGIN_MS: u64 = 50;

/// The worker for the Node cases: only `process.send` and `process.on('message')`, so it runs
/// unmodified under a Node parent, the agent and pm2. It announces itself, waits for `go`
/// (a message, or a pm2 packet whose `data` has `go`), then sends `n` messages in
/// `setImmediate` batches, waiting for the last send's callback whenever `send()` returned
/// false (Node's own backpressure signal), and says when it is done.
const NODE_WORKER_JS: &str = include_str!("js/relay/worker.js");

/// Helpers shared by the Node parent and the pm2 subscriber: the bench writes each of those two
/// programs as this text followed by its own (they are not runnable alone).
const NODE_COMMON_JS: &str = include_str!("js/relay/common.js");

/// The Node ceiling: a plain parent forking the workers with the channel on fd 3, counting.
const NODE_PARENT_JS: &str = include_str!("js/relay/parent.js");

/// pm2: subscribes with `launchBus`, says BUS_READY, waits for the workers the bench starts
/// with `pm2 start worker.js -i 4`, sends `go` with `sendDataToProcessId`, counts.
const PM2_SUB_JS: &str = include_str!("js/relay/pm2sub.js");

fn main() {
    match std::env::var("BENCH_NATIVE_SOURCE").as_deref() {
        Ok("nats") => return native_nats_source(),
        Ok(_) => return native_source(),
        Err(_) => {}
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("relay: a benchmark; run it with `cargo bench --bench relay`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    // Ctrl-C or SIGTERM drops the run, whose children are killed on drop.
    let interrupted = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    };
    let outcome = rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(TOTAL_DEADLINE, run()) => r,
            _ = interrupted => Ok(Err("interrupted".into())),
        }
    });
    match outcome {
        Ok(Ok(())) => eprintln!(
            "relay bench finished in {:.0} s",
            started.elapsed().as_secs_f64()
        ),
        Ok(Err(e)) => {
            eprintln!("relay bench failed: {e}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("relay bench did not finish within {TOTAL_DEADLINE:?}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The native source: runs as a worker under the agent, channel on fd 3.

/// Says `bench:ready`, then for each `{"go":1,"n":N,"rate":R}` line sends N lines (R per
/// second when R > 0, else as fast as the channel takes them) and a `bench:done` line.
fn native_source() {
    use std::os::fd::FromRawFd;
    // SAFETY: the agent (like Node's fork) gives the worker its channel on fd 3, open and
    // owned by nobody else in this process.
    let ch = unsafe { std::os::unix::net::UnixStream::from_raw_fd(3) };
    let mut w = &ch;
    let ready = format!(
        "{{\"type\":\"bench:ready\",\"data\":{{\"pid\":{}}}}}\n",
        std::process::id()
    );
    if w.write_all(ready.as_bytes()).is_err() {
        return;
    }
    let pad = "x".repeat(PAD);
    let mut lines = BufReader::new(&ch);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v.get("go").is_none() {
            continue;
        }
        let n = v["n"].as_u64().unwrap_or(0);
        let rate = v["rate"].as_u64().unwrap_or(0);
        let res = if rate == 0 {
            flat_out(&ch, n, &pad)
        } else {
            paced(&ch, n, rate, &pad)
        };
        let done = format!("{{\"type\":\"bench:done\",\"data\":{{\"sent\":{n}}}}}\n");
        if res.and_then(|()| w.write_all(done.as_bytes())).is_err() {
            return;
        }
    }
}

/// The same paced source as a separate process publishing straight to NATS (no agent): says
/// `ready` on stdout once connected, starts on a line on stdin, publishes the envelope the
/// agent would have made (BENCH_META is its `process`), then `bench:done`.
fn native_nats_source() {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let (url, app, meta) = (var("BENCH_NATS_URL"), var("BENCH_APP"), var("BENCH_META"));
    let n: u64 = var("BENCH_N").parse().unwrap_or(0);
    let rate: u64 = var("BENCH_RATE").parse().unwrap_or(1000);
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    else {
        return;
    };
    let Ok(client) = rt.block_on(connect(&url, None)) else {
        return;
    };
    println!("ready");
    let mut go = String::new();
    if std::io::stdin().read_line(&mut go).is_err() {
        return;
    }
    let t = RawTemplate::from_meta(&meta);
    let subject = format!("pm.default.{app}.process:msg");
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    for i in 1..=n {
        pace(start + period * (i as u32 - 1));
        let (headers, payload) = t.message(i);
        if rt
            .block_on(client.publish_with_headers(subject.clone(), headers, payload))
            .is_err()
        {
            return;
        }
    }
    let done = format!("pm.default.{app}.bench:done");
    let _ = rt.block_on(async {
        client.publish(done, Bytes::from_static(b"{}")).await?;
        client.flush().await.map_err(BoxError::from)
    });
}

fn write_line(out: &mut impl Write, i: u64, pad: &str) -> std::io::Result<()> {
    writeln!(
        out,
        "{{\"type\":\"process:msg\",\"data\":{{\"t\":{},\"i\":{i},\"pad\":\"{pad}\"}}}}",
        now_us()
    )
}

fn flat_out(ch: &std::os::unix::net::UnixStream, n: u64, pad: &str) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, ch);
    for i in 1..=n {
        write_line(&mut out, i, pad)?;
    }
    out.flush()
}

fn paced(ch: &std::os::unix::net::UnixStream, n: u64, rate: u64, pad: &str) -> std::io::Result<()> {
    let period = 1e9 / rate.max(1) as f64;
    let due = |i: u64| Duration::from_nanos((i as f64 * period) as u64);
    let start = Instant::now();
    // Lines go out one write each while on schedule; when behind, the late ones go together.
    let mut out = std::io::BufWriter::with_capacity(64 << 10, ch);
    for i in 0..n {
        pace(start + due(i));
        write_line(&mut out, i + 1, pad)?;
        if i + 1 == n || start + due(i + 1) > Instant::now() {
            out.flush()?;
        }
    }
    Ok(())
}

/// Sleeps until `at` (a pacing loop, not a readiness wait).
fn pace(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Progress detail on stderr when BENCH_TRACE is set.
fn trace(what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    if std::env::var_os("BENCH_TRACE").is_some() {
        eprintln!("  [{:7.3} s] {what}", start.elapsed().as_secs_f64());
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The `t` of `"data":{"t":<µs>` in an envelope.
fn field_t(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"data\":{\"t\":";
    let at = memchr::memmem::find(payload, KEY)? + KEY.len();
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The envelope's `at` (epoch ms), its first field.
fn field_at(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(b"{\"at\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Where the latency of the messages at or above `p` goes: mean µs from the worker to the
/// agent's `at` stamp (whole ms, so +500 µs corrects the truncation on average) and from
/// there to the subscriber.
fn split_at(split: &[(i64, i64)], p: f64) -> Option<(f64, f64)> {
    let mut lats: Vec<i64> = split.iter().map(|s| s.0).collect();
    lats.sort_unstable();
    let cut = percentile(&lats, p)? as i64;
    let tail: Vec<&(i64, i64)> = split.iter().filter(|s| s.0 >= cut).collect();
    let n = tail.len() as f64;
    let to_agent = tail.iter().map(|s| s.1 as f64 + 500.0).sum::<f64>() / n;
    let total = tail.iter().map(|s| s.0 as f64).sum::<f64>() / n;
    Some((to_agent, total - to_agent))
}

fn which(name: &str) -> Option<PathBuf> {
    flotilla::which::which(name, None)
}

/// Reads lines from a child's stdout, returning the first one for which `f` says yes.
async fn await_line<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut tokio::io::Lines<AsyncBufReader<R>>,
    within: Duration,
    what: &str,
    mut f: impl FnMut(&str) -> bool,
) -> Res<String> {
    let fut = async {
        while let Some(l) = lines.next_line().await? {
            if f(&l) {
                return Ok::<_, BoxError>(l);
            }
        }
        Err(format!("the process ended before {what}").into())
    };
    tokio::time::timeout(within, fut)
        .await
        .map_err(|_| format!("timed out after {within:?} waiting for {what}"))?
}

// ---------------------------------------------------------------------------------------------
// nats-server and the agent.

struct Nats {
    child: Child,
    pid: u32,
    url: String,
}

impl Nats {
    async fn start(store: &Path) -> Res<Nats> {
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run nats-server ({e}): install it (scripts/deps)"))?;
        let pid = child.id().ok_or("nats-server exited at once")?;
        let mut lines = AsyncBufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
        let line = await_line(
            &mut lines,
            Duration::from_secs(10),
            "nats-server's port",
            |l| l.contains("Listening for client connections on "),
        )
        .await?;
        let port: u16 = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| format!("no port in {line:?}"))?;
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Nats {
            child,
            pid,
            url: format!("nats://127.0.0.1:{port}"),
        })
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

struct Agent {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Agent {
    async fn start(nats: &Nats, home: &Path, watch: &Client) -> Res<Agent> {
        let mut online = watch
            .subscribe(format!("pm._fleet.{HOST}.host:event"))
            .await?;
        watch.flush().await?;
        std::fs::create_dir_all(home)?;
        let log = home.join("agent.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLOTILLA_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("FLOTILLA_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL);
        // BENCH_AGENT_FLOTILLA_X=v gives the agent FLOTILLA_X=v (settings for variant runs).
        for (k, v) in std::env::vars() {
            if let Some(setting) = k.strip_prefix("BENCH_AGENT_") {
                cmd.env(setting, v);
            }
        }
        let child = cmd
            .arg("agent")
            .env("FLOTILLA_NATS_URL", &nats.url)
            .env("FLOTILLA_HOST_ID", HOST)
            .env("FLOTILLA_HOME", home)
            .env("FLOTILLA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the agent exited at once")?;
        let fut = async {
            while let Some(m) = online.next().await {
                let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
                if v["event"] == "online" {
                    return Ok::<_, BoxError>(());
                }
            }
            Err("subscription ended".into())
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .map_err(|_| "the agent did not come online within 30 s (see its log)")??;
        Ok(Agent { child, pid, log })
    }

    /// SIGTERM, and wait for a clean exit.
    async fn stop(mut self) -> Res<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    return Err(format!("the agent exited with {status}").into());
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.start_kill();
                Err("the agent did not stop within 30 s of SIGTERM".into())
            }
        }
    }
}

async fn connect(url: &str, slow: Option<Arc<AtomicU64>>) -> Res<Client> {
    let mut o = ConnectOptions::new()
        .client_capacity(8192)
        .subscription_capacity(1 << 20);
    if let Some(slow) = slow {
        o = o.event_callback(move |ev| {
            let slow = slow.clone();
            async move {
                if let async_nats::Event::SlowConsumer(_) = ev {
                    slow.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    Ok(o.connect(url).await?)
}

async fn request(client: &Client, req: Request) -> Res<Reply> {
    let subject = format!("pmctl.agent.{HOST}.{}", req.verb());
    let msg = tokio::time::timeout(WAIT, client.request(subject, req.to_body().into()))
        .await
        .map_err(|_| format!("no reply to '{}' within 30 s", req.verb()))??;
    let reply: Reply = serde_json::from_slice(&msg.payload)?;
    match reply.error {
        Some(e) => Err(format!("'{}' failed: {e}", req.verb()).into()),
        None => Ok(reply),
    }
}

fn targeted(target: &str) -> TargetRequest {
    TargetRequest::new(Target::parse(target).expect("valid target"))
}

async fn agent_stats(ctl: &Client) -> Res<AgentStats> {
    request(ctl, Request::List(targeted("all")))
        .await?
        .agent
        .ok_or_else(|| "list reply without agent figures".into())
}

// ---------------------------------------------------------------------------------------------
// Measuring.

/// One case's figures. `relay_*` is the process between workers and subscribers: the agent,
/// the Node parent (ceiling) or pm2's daemon.
#[derive(Debug, Default, Clone)]
struct Measured {
    received: u64,
    expected: u64,
    secs: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// Tail detail: p90, p99.9, max (agent and raw cases).
    tail_us: Option<[f64; 3]>,
    relay_cpu_s: Option<f64>,
    relay_peak_kib: Option<u64>,
    relay_after_kib: Option<u64>,
    nats_cpu_s: Option<f64>,
    bench_cpu_s: Option<f64>,
    workers_cpu_s: Option<f64>,
    agent_drops: Option<u64>,
    slow_consumer: u64,
    /// Latencies, sorted (agent and raw cases).
    lat_us: Arc<Vec<i64>>,
    /// Latency split at the agent's `at` stamp (agent cases).
    split_us: Arc<Vec<(i64, i64)>>,
    /// Agent cases: the RSS after the burst was read without the heartbeat that follows it
    /// (none came within [`HEARTBEAT_WAIT`]), so the agent may not have trimmed yet.
    no_heartbeat: u64,
    /// Rounds summarised by [`Measured::median`] (0: one run, or rounds pooled).
    rounds: usize,
    /// With `rounds`: the median msgs/s, and the lowest and the highest.
    rate_median: Option<f64>,
    rate_range: Option<(f64, f64)>,
}

impl Measured {
    /// Several rounds of one case as one: sums, and percentiles over every sample.
    fn pool(rounds: &[Measured]) -> Measured {
        let add = |f: fn(&Measured) -> Option<f64>| rounds.iter().map(f).sum::<Option<f64>>();
        let mut lat: Vec<i64> = rounds
            .iter()
            .flat_map(|m| m.lat_us.iter().copied())
            .collect();
        lat.sort_unstable();
        Measured {
            received: rounds.iter().map(|m| m.received).sum(),
            expected: rounds.iter().map(|m| m.expected).sum(),
            secs: rounds.iter().map(|m| m.secs).sum(),
            p50_us: percentile(&lat, 0.50),
            p99_us: percentile(&lat, 0.99),
            tail_us: tail(&lat),
            relay_cpu_s: add(|m| m.relay_cpu_s),
            relay_peak_kib: rounds.iter().filter_map(|m| m.relay_peak_kib).max(),
            relay_after_kib: rounds.last().and_then(|m| m.relay_after_kib),
            nats_cpu_s: add(|m| m.nats_cpu_s),
            bench_cpu_s: add(|m| m.bench_cpu_s),
            workers_cpu_s: add(|m| m.workers_cpu_s),
            agent_drops: rounds.iter().map(|m| m.agent_drops).sum(),
            slow_consumer: rounds.iter().map(|m| m.slow_consumer).sum(),
            lat_us: Arc::new(lat),
            split_us: Arc::new(
                rounds
                    .iter()
                    .flat_map(|m| m.split_us.iter().copied())
                    .collect(),
            ),
            no_heartbeat: rounds.iter().map(|m| m.no_heartbeat).sum(),
            ..Measured::default()
        }
    }

    /// Rounds of one burst case as one row: the median of each rate, latency and CPU figure
    /// (each on its own), the lowest and highest rate, losses summed, the highest RSS.
    fn median(rounds: &[Measured]) -> Measured {
        let med = |f: fn(&Measured) -> Option<f64>| median(rounds.iter().filter_map(f).collect());
        let rates: Vec<f64> = rounds.iter().map(Measured::rate).collect();
        let lo = rates.iter().copied().reduce(f64::min);
        let hi = rates.iter().copied().reduce(f64::max);
        Measured {
            received: rounds.iter().map(|m| m.received).sum(),
            expected: rounds.iter().map(|m| m.expected).sum(),
            secs: med(|m| Some(m.secs)).unwrap_or(0.0),
            p50_us: med(|m| m.p50_us),
            p99_us: med(|m| m.p99_us),
            relay_cpu_s: med(|m| m.relay_cpu_s),
            relay_peak_kib: rounds.iter().filter_map(|m| m.relay_peak_kib).max(),
            relay_after_kib: rounds.iter().filter_map(|m| m.relay_after_kib).max(),
            nats_cpu_s: med(|m| m.nats_cpu_s),
            bench_cpu_s: med(|m| m.bench_cpu_s),
            workers_cpu_s: med(|m| m.workers_cpu_s),
            agent_drops: rounds.iter().map(|m| m.agent_drops).sum(),
            slow_consumer: rounds.iter().map(|m| m.slow_consumer).sum(),
            no_heartbeat: rounds.iter().map(|m| m.no_heartbeat).sum(),
            rounds: rounds.len(),
            rate_median: median(rates),
            rate_range: lo.zip(hi),
            ..Measured::default()
        }
    }

    /// Messages received in one round (the total over the rounds when summarised).
    fn received_per_round(&self) -> f64 {
        self.received as f64 / self.rounds.max(1) as f64
    }

    fn rate(&self) -> f64 {
        if let Some(r) = self.rate_median {
            r
        } else if self.secs > 0.0 {
            self.received as f64 / self.secs
        } else {
            0.0
        }
    }
    fn loss(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }
}

/// What a subscriber saw of one burst.
#[derive(Default)]
struct Collected {
    received: u64,
    secs: f64,
    lat_us: Vec<i64>,
    /// (latency, worker to the agent's `at` stamp) per message, in µs; `at` is whole ms.
    split_us: Vec<(i64, i64)>,
    sample: Option<Bytes>,
}

/// Counts `process:msg` of `app` until every worker's `bench:done` arrived (they follow each
/// worker's messages in order), or nothing arrives for [`IDLE`].
async fn collect(
    sub: &mut Subscriber,
    app: &str,
    expected: u64,
    workers: usize,
    t0: Instant,
) -> Collected {
    let msg_subject = format!("pm.default.{app}.process:msg");
    let done_subject = format!("pm.default.{app}.bench:done");
    let mut c = Collected {
        lat_us: Vec::with_capacity(expected as usize),
        ..Collected::default()
    };
    let mut last = t0;
    let mut done = 0;
    let deadline = t0 + BURST_DEADLINE;
    loop {
        // Other subjects (heartbeats) do not count as activity.
        let until = (last.max(t0) + IDLE).min(deadline);
        let m = match tokio::time::timeout_at(until.into(), sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        let subject = m.subject.as_str();
        if subject == msg_subject {
            let us = now_us() as i64;
            last = Instant::now();
            c.received += 1;
            if let Some(t) = field_t(&m.payload) {
                c.lat_us.push(us - t as i64);
                if let Some(at) = field_at(&m.payload) {
                    c.split_us
                        .push((us - t as i64, at as i64 * 1000 - t as i64));
                }
            }
            if c.sample.is_none() {
                c.sample = Some(m.payload.clone());
            }
        } else if subject == done_subject {
            done += 1;
            if done >= workers {
                break;
            }
        }
    }
    c.secs = (last - t0).as_secs_f64();
    c.lat_us.sort_unstable();
    c
}

/// Everything the agent cases share.
struct Bench {
    dir: PathBuf,
    nats: Nats,
    agent: Agent,
    ctl: Client,
    subs: Client,
    slow: Arc<AtomicU64>,
    /// Agent RSS (KiB) with the 4 Node workers online and idle.
    rss_idle_workers: Option<u64>,
    /// One envelope the agent relayed for a native worker: the raw publisher's template.
    sample: Option<Bytes>,
}

/// A case through the agent: start `spec`, await every instance online and ready, send `go`,
/// collect, measure, delete.
struct AgentCase<'a> {
    app: &'a str,
    spec: AppSpec,
    workers: usize,
    per_worker: u64,
    rate: u64,
}

impl Bench {
    async fn agent_case(&mut self, case: AgentCase<'_>, idle_rss: bool) -> Res<Measured> {
        let app = case.app;
        let native = case.spec_is_native();
        trace(&format!("{app}: subscribing"));
        let mut sub = self.subs.subscribe("pm.>").await?;
        self.subs.flush().await?;
        trace(&format!("{app}: starting"));
        let mut spec = case.spec;
        spec.instances = Some(case.workers as u32);
        spec.autorestart = false;
        request(
            &self.ctl,
            StartRequest {
                request_id: Uuid::new_v4(),
                app: spec,
                force: false,
            }
            .into(),
        )
        .await?;
        trace(&format!("{app}: awaiting ready"));
        let pids = await_ready(&mut sub, app, case.workers).await?;
        trace(&format!("{app}: ready"));
        if idle_rss {
            self.rss_idle_workers = Some(mem_kib(self.agent.pid).0);
        }
        let before = agent_stats(&self.ctl).await?;
        let slow0 = self.slow.load(Ordering::Relaxed);
        let hwm_reset = reset_hwm(self.agent.pid);
        let (agent0, nats0, self0, workers0) = (
            cpu_secs(self.agent.pid).unwrap_or(0.0),
            cpu_secs(self.nats.pid).unwrap_or(0.0),
            self_cpu(),
            cpu_of(&pids),
        );
        let expected = case.workers as u64 * case.per_worker;
        let go = SendRequest {
            request_id: Uuid::new_v4(),
            target: Target::parse(app).expect("valid app name"),
            message: serde_json::json!({"go": 1, "n": case.per_worker, "rate": case.rate}),
            pm_ids: vec![],
        };
        let t0 = Instant::now();
        let ctl = self.ctl.clone();
        let sent = tokio::spawn(async move { request(&ctl, go.into()).await.map(|_| ()) });
        trace(&format!("{app}: go sent, collecting"));
        let c = collect(&mut sub, app, expected, case.workers, t0).await;
        trace(&format!("{app}: collected {}", c.received));
        let (agent1, nats1, self1, workers1) = (
            cpu_secs(self.agent.pid).unwrap_or(0.0),
            cpu_secs(self.nats.pid).unwrap_or(0.0),
            self_cpu(),
            cpu_of(&pids),
        );
        // The agent trims its heap at the first heartbeat once its queue is empty: read the RSS
        // after that heartbeat, not at once.
        let heartbeat = await_heartbeat(&mut sub, now_us() / 1000).await?;
        trace(&format!("{app}: heartbeat after the burst: {heartbeat}"));
        let (rss_after, hwm) = mem_kib(self.agent.pid);
        sent.await??;
        let after = agent_stats(&self.ctl).await?;
        if self.sample.is_none() && native {
            self.sample = c.sample.clone();
        }
        trace(&format!("{app}: deleting"));
        request(&self.ctl, Request::Delete(targeted(app))).await?;
        trace(&format!("{app}: deleted"));
        Ok(Measured {
            received: c.received,
            expected,
            secs: c.secs,
            p50_us: percentile(&c.lat_us, 0.50),
            p99_us: percentile(&c.lat_us, 0.99),
            tail_us: tail(&c.lat_us),
            relay_cpu_s: Some(agent1 - agent0),
            relay_peak_kib: hwm_reset.then_some(hwm),
            relay_after_kib: Some(rss_after),
            nats_cpu_s: Some(nats1 - nats0),
            bench_cpu_s: Some(self1 - self0),
            workers_cpu_s: Some(workers1 - workers0),
            agent_drops: Some(after.counters.dropped - before.counters.dropped),
            slow_consumer: self.slow.load(Ordering::Relaxed) - slow0,
            lat_us: Arc::new(c.lat_us),
            split_us: Arc::new(c.split_us),
            no_heartbeat: u64::from(!heartbeat),
            ..Measured::default()
        })
    }

    /// The agent's RSS once it has had its chance to trim (after its next heartbeat).
    async fn settled_rss(&self) -> Res<(u64, bool)> {
        let mut sub = self
            .subs
            .subscribe(format!("pm._fleet.{HOST}.host:heartbeat"))
            .await?;
        self.subs.flush().await?;
        let heartbeat = await_heartbeat(&mut sub, now_us() / 1000).await?;
        Ok((mem_kib(self.agent.pid).0, heartbeat))
    }

    /// The same envelopes published straight from this process with async-nats (one client,
    /// as the agent has), flat out (`rate` 0) from one task, or paced from one thread per
    /// simulated worker; with `via_relay`, paced through the agent's own relay queue and
    /// publisher task (`flotilla::agent::publisher::Relay`) instead of calling async-nats directly.
    async fn raw_case(
        &mut self,
        app: &str,
        workers: usize,
        per_worker: u64,
        rate: u64,
        via_relay: bool,
    ) -> Res<Measured> {
        let template = RawTemplate::from_sample(self.sample.as_ref().ok_or("no sample envelope")?)?;
        let mut sub = self.subs.subscribe("pm.>").await?;
        self.subs.flush().await?;
        let publisher = connect(&self.nats.url, None).await?;
        let slow0 = self.slow.load(Ordering::Relaxed);
        let (nats0, self0) = (cpu_secs(self.nats.pid).unwrap_or(0.0), self_cpu());
        let subject = format!("pm.default.{app}.process:msg");
        let done = format!("pm.default.{app}.bench:done");
        let expected = workers as u64 * per_worker;
        let tracker = tokio_util::task::TaskTracker::new();
        let t0 = Instant::now();
        let mut threads = vec![];
        if rate == 0 {
            let (p, t) = (publisher.clone(), template.clone());
            let (subject, done) = (subject.clone(), done.clone());
            tokio::spawn(async move {
                for i in 1..=per_worker {
                    for _ in 0..workers {
                        let (headers, payload) = t.message(i);
                        if p.publish_with_headers(subject.clone(), headers, payload)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                for _ in 0..workers {
                    let _ = p.publish(done.clone(), Bytes::from_static(b"{}")).await;
                }
                let _ = p.flush().await;
            });
        } else {
            let handle = tokio::runtime::Handle::current();
            let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
            let relay = via_relay.then(|| {
                flotilla::agent::publisher::Relay::start(
                    std::future::ready(Some(publisher.clone())),
                    flotilla::agent::publisher::QueueLimits {
                        messages: 16_384,
                        bytes: 32 << 20,
                        max_wait: Duration::from_millis(250),
                    },
                    &tracker,
                )
            });
            for _ in 0..workers {
                let (p, t, h) = (publisher.clone(), template.clone(), handle.clone());
                let (subject, done) = (subject.clone(), done.clone());
                let relay = relay.clone();
                threads.push(std::thread::spawn(move || {
                    use flotilla::agent::publisher::Outgoing;
                    let dropping = std::sync::atomic::AtomicBool::new(false);
                    for i in 1..=per_worker {
                        pace(t0 + period * (i as u32 - 1));
                        let sent = match &relay {
                            Some(r) => {
                                let (id, payload) = t.payload(i);
                                let subject = subject.clone();
                                let mut one = vec![Outgoing::new(subject, id, payload)];
                                h.block_on(r.relay_batch(&mut one, &dropping)) == 0
                            }
                            None => {
                                let (headers, payload) = t.message(i);
                                let subject = subject.clone();
                                h.block_on(p.publish_with_headers(subject, headers, payload))
                                    .is_ok()
                            }
                        };
                        if !sent {
                            return;
                        }
                    }
                    let payload = Bytes::from_static(b"{}");
                    match &relay {
                        Some(r) => {
                            let id = Uuid::new_v4();
                            let _ = r.send_event(Outgoing::new(done, id, payload));
                        }
                        None => {
                            let _ = h.block_on(p.publish(done, payload));
                        }
                    }
                }));
            }
        }
        let c = collect(&mut sub, app, expected, workers, t0).await;
        let (nats1, self1) = (cpu_secs(self.nats.pid).unwrap_or(0.0), self_cpu());
        for t in threads {
            let _ = t.join();
        }
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
        Ok(Measured {
            received: c.received,
            expected,
            secs: c.secs,
            p50_us: percentile(&c.lat_us, 0.50),
            p99_us: percentile(&c.lat_us, 0.99),
            tail_us: tail(&c.lat_us),
            nats_cpu_s: Some(nats1 - nats0),
            bench_cpu_s: Some(self1 - self0),
            slow_consumer: self.slow.load(Ordering::Relaxed) - slow0,
            lat_us: Arc::new(c.lat_us),
            ..Measured::default()
        })
    }

    /// Paced raw publishing from `workers` separate processes (this binary), no agent.
    async fn raw_procs_case(
        &mut self,
        app: &str,
        workers: usize,
        per_worker: u64,
        rate: u64,
    ) -> Res<Measured> {
        #[derive(Deserialize)]
        struct Parts<'a> {
            #[serde(borrow)]
            process: &'a RawValue,
        }
        let sample = self.sample.clone().ok_or("no sample envelope")?;
        let meta = serde_json::from_slice::<Parts<'_>>(&sample)?
            .process
            .get()
            .to_string();
        let mut sub = self.subs.subscribe("pm.>").await?;
        self.subs.flush().await?;
        let mut kids = vec![];
        for _ in 0..workers {
            let mut child = Command::new(std::env::current_exe()?)
                .env("BENCH_NATIVE_SOURCE", "nats")
                .env("BENCH_NATS_URL", &self.nats.url)
                .env("BENCH_APP", app)
                .env("BENCH_META", &meta)
                .env("BENCH_N", per_worker.to_string())
                .env("BENCH_RATE", rate.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let mut lines = AsyncBufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
            await_line(&mut lines, WAIT, "a raw source's ready line", |l| {
                l == "ready"
            })
            .await?;
            kids.push(child);
        }
        let pids: Vec<u32> = kids.iter().filter_map(|k| k.id()).collect();
        let slow0 = self.slow.load(Ordering::Relaxed);
        let (nats0, self0, kids0) = (
            cpu_secs(self.nats.pid).unwrap_or(0.0),
            self_cpu(),
            cpu_of(&pids),
        );
        let t0 = Instant::now();
        for k in &mut kids {
            if let Some(stdin) = k.stdin.as_mut() {
                tokio::io::AsyncWriteExt::write_all(stdin, b"go\n").await?;
            }
        }
        let c = collect(&mut sub, app, workers as u64 * per_worker, workers, t0).await;
        let (nats1, self1, kids1) = (
            cpu_secs(self.nats.pid).unwrap_or(0.0),
            self_cpu(),
            cpu_of(&pids),
        );
        for mut k in kids {
            if tokio::time::timeout(Duration::from_secs(10), k.wait())
                .await
                .is_err()
            {
                let _ = k.start_kill();
            }
        }
        Ok(Measured {
            received: c.received,
            expected: workers as u64 * per_worker,
            secs: c.secs,
            p50_us: percentile(&c.lat_us, 0.50),
            p99_us: percentile(&c.lat_us, 0.99),
            tail_us: tail(&c.lat_us),
            nats_cpu_s: Some(nats1 - nats0),
            bench_cpu_s: Some(self1 - self0),
            workers_cpu_s: Some(kids1 - kids0),
            slow_consumer: self.slow.load(Ordering::Relaxed) - slow0,
            lat_us: Arc::new(c.lat_us),
            ..Measured::default()
        })
    }

    fn native_spec(&self, app: &str) -> AppSpec {
        let exe = std::env::current_exe().expect("own path");
        let mut s = AppSpec::new(app, exe);
        s.interpreter = Some("none".into());
        s.env.insert("BENCH_NATIVE_SOURCE".into(), "1".into());
        s.cwd = Some(self.dir.clone());
        s
    }

    fn node_spec(&self, app: &str) -> AppSpec {
        AppSpec::new(app, self.dir.join("worker.js"))
    }
}

impl AgentCase<'_> {
    fn spec_is_native(&self) -> bool {
        self.spec.env.contains_key("BENCH_NATIVE_SOURCE")
    }
}

/// Longest wait for the heartbeat that follows a burst (the agent's interval is
/// [`HEARTBEAT_INTERVAL`] unless a variant run sets another).
const HEARTBEAT_WAIT: Duration = Duration::from_secs(3);

/// Awaits the agent's first heartbeat stamped [`HEARTBEAT_MARGIN_MS`] or more after `after_ms`
/// (epoch ms), skipping everything else `sub` brings. False when none came within
/// [`HEARTBEAT_WAIT`] (a variant run with a long interval).
async fn await_heartbeat(sub: &mut Subscriber, after_ms: u64) -> Res<bool> {
    let subject = format!("pm._fleet.{HOST}.host:heartbeat");
    let fut = async {
        while let Some(m) = sub.next().await {
            if m.subject.as_str() != subject {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
            if v["at"]
                .as_u64()
                .is_some_and(|at| at >= after_ms + HEARTBEAT_MARGIN_MS)
            {
                return Ok::<_, BoxError>(());
            }
        }
        Err("subscription ended".into())
    };
    match tokio::time::timeout(HEARTBEAT_WAIT, fut).await {
        Ok(r) => r.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// Awaits `workers` online events and `bench:ready` messages of `app`; returns worker pids.
async fn await_ready(sub: &mut Subscriber, app: &str, workers: usize) -> Res<Vec<u32>> {
    let event = format!("pm.default.{app}.process:event");
    let ready = format!("pm.default.{app}.bench:ready");
    let mut online = std::collections::BTreeSet::new();
    let mut pids = std::collections::BTreeSet::new();
    let fut = async {
        while let Some(m) = sub.next().await {
            let s = m.subject.as_str();
            if s != event && s != ready {
                continue;
            }
            let env: Envelope = serde_json::from_slice(&m.payload)?;
            if s == ready {
                if let Some(pid) = env.data.as_ref().and_then(|d| d["pid"].as_u64()) {
                    pids.insert(pid as u32);
                }
            } else if env
                .event
                .as_ref()
                .is_some_and(|e| e.event.as_str() == "online")
            {
                online.insert(env.process.pm_id);
            }
            if online.len() >= workers && pids.len() >= workers {
                return Ok::<_, BoxError>(());
            }
        }
        Err("subscription ended".into())
    };
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .map_err(|_| format!("{app}: workers not online and ready within 60 s"))??;
    Ok(pids.into_iter().collect())
}

/// The agent's envelope for a native worker's line, rebuilt per message with a fresh `t`,
/// `at` and id: same size, same shape, same `Nats-Msg-Id` header.
#[derive(Clone)]
struct RawTemplate {
    meta: Arc<str>,
    pad: Arc<str>,
}

impl RawTemplate {
    fn from_sample(sample: &[u8]) -> Res<RawTemplate> {
        #[derive(Deserialize)]
        struct Parts<'a> {
            #[serde(borrow)]
            process: &'a RawValue,
        }
        let p: Parts<'_> = serde_json::from_slice(sample)?;
        Ok(RawTemplate::from_meta(p.process.get()))
    }

    fn from_meta(meta: &str) -> RawTemplate {
        RawTemplate {
            meta: meta.into(),
            pad: "x".repeat(PAD).into(),
        }
    }

    fn message(&self, i: u64) -> (HeaderMap, Bytes) {
        let (id, payload) = self.payload(i);
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.to_string().as_str());
        (headers, payload)
    }

    fn payload(&self, i: u64) -> (Uuid, Bytes) {
        let id = Uuid::new_v4();
        let t = now_us();
        let mut s = String::with_capacity(self.meta.len() + self.pad.len() + 160);
        let _ = write!(
            s,
            "{{\"at\":{},\"data\":{{\"t\":{t},\"i\":{i},\"pad\":\"{}\"}},\"process\":{},\"id\":\"{id}\"}}",
            t / 1000,
            self.pad,
            self.meta
        );
        (id, Bytes::from(s))
    }
}

// ---------------------------------------------------------------------------------------------
// Node ceiling and pm2.

#[derive(Deserialize)]
struct NodeResult {
    received: u64,
    secs: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    relay_cpu_s: f64,
    relay_peak_kib: u64,
    relay_after_kib: u64,
    workers_cpu_s: f64,
    #[serde(default)]
    bench_cpu_s: Option<f64>,
}

impl NodeResult {
    fn measured(self, expected: u64) -> Measured {
        Measured {
            received: self.received,
            expected,
            secs: self.secs,
            p50_us: self.p50_us,
            p99_us: self.p99_us,
            relay_cpu_s: Some(self.relay_cpu_s),
            relay_peak_kib: Some(self.relay_peak_kib),
            relay_after_kib: Some(self.relay_after_kib),
            workers_cpu_s: Some(self.workers_cpu_s),
            bench_cpu_s: self.bench_cpu_s,
            ..Measured::default()
        }
    }
}

fn node_env(cmd: &mut Command, workers: usize, n: u64) {
    cmd.env("BENCH_W", workers.to_string())
        .env("BENCH_N", n.to_string())
        .env("BENCH_PAD", PAD.to_string())
        .env("BENCH_CLK_TCK", format!("{}", clk_tck() as u64));
}

async fn node_ceiling(dir: &Path) -> Res<Measured> {
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("parent.js"))
        .env("BENCH_WORKER", dir.join("worker.js"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    node_env(&mut cmd, NODE_WORKERS, NODE_N);
    let mut child = cmd.spawn().map_err(|e| format!("cannot run node: {e}"))?;
    let mut lines = AsyncBufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let line = await_line(
        &mut lines,
        BURST_DEADLINE,
        "the Node parent's result",
        |l| l.starts_with("RESULT "),
    )
    .await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let r: NodeResult = serde_json::from_str(&line["RESULT ".len()..])?;
    Ok(r.measured(NODE_WORKERS as u64 * NODE_N))
}

/// pm2's bus, or `None` when pm2 is not installed.
async fn pm2_case(dir: &Path) -> Res<Option<(Measured, String)>> {
    let Some(bin) = which("pm2") else {
        return Ok(None);
    };
    let pkg = std::fs::canonicalize(&bin)?
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or("cannot find pm2's package folder")?;
    let version = std::fs::read_to_string(pkg.join("package.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["version"].as_str().map(String::from))
        .unwrap_or_else(|| "?".into());
    let home = dir.join("pm2home");
    std::fs::create_dir_all(&home)?;
    let app = "pm2bench";
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("pm2sub.js"))
        .env("PM2_HOME", &home)
        .env("BENCH_PM2_DIR", &pkg)
        .env("BENCH_APP", app)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("pm2sub.err"))?)
        .kill_on_drop(true);
    node_env(&mut cmd, NODE_WORKERS, NODE_N);
    let mut sub = cmd.spawn()?;
    let mut lines = AsyncBufReader::new(sub.stdout.take().ok_or("no stdout")?).lines();
    let result = async {
        await_line(&mut lines, Duration::from_secs(60), "pm2's bus", |l| {
            l == "BUS_READY"
        })
        .await?;
        let mut start = Command::new(&bin);
        start
            .arg("start")
            .arg(dir.join("worker.js"))
            .args(["-i", &NODE_WORKERS.to_string(), "--name", app])
            .env("PM2_HOME", &home)
            .env("BENCH_PAD", PAD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let status = tokio::time::timeout(Duration::from_secs(60), start.status())
            .await
            .map_err(|_| "pm2 start did not return within 60 s")??;
        if !status.success() {
            return Err(format!("pm2 start failed: {status}").into());
        }
        let line = await_line(
            &mut lines,
            BURST_DEADLINE,
            "the pm2 subscriber's result",
            |l| l.starts_with("RESULT "),
        )
        .await?;
        let r: NodeResult = serde_json::from_str(&line["RESULT ".len()..])?;
        Ok::<_, BoxError>(r.measured(NODE_WORKERS as u64 * NODE_N))
    }
    .await;
    let _ = sub.start_kill();
    let mut kill = Command::new(&bin);
    kill.arg("kill")
        .env("PM2_HOME", &home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), kill.status()).await;
    Ok(Some((result?, version)))
}

// ---------------------------------------------------------------------------------------------
// Where the agent's time goes: its own relay code, in-process, on one thread.

/// Per-message costs of the agent's hot path, measured with the agent's own code on one
/// thread (a current-thread runtime, so nothing overlaps): the reader side (`LineReader` +
/// `classify` + `WorkerRelay::message`: envelope, id, subject, queue), then the publisher side
/// (`Relay`'s publish loop draining that queue through async-nats to nats-server), then a
/// plain async-nats publish loop doing what that loop does per message (header map, id
/// string, `publish_with_headers`).
#[derive(Debug, Default, Clone, Copy)]
struct Stages {
    lines: u64,
    reader_us: f64,
    publisher_us: f64,
    raw_publish_us: f64,
    parse_only_us: f64,
    build_us: f64,
}

fn stages(url: String, lines: u64) -> Res<Stages> {
    use flotilla::agent::ipc::{Frame, LineReader};
    use flotilla::agent::publisher::Relay;
    use flotilla::agent::relay::RelayHub;
    use flotilla::protocol::envelope::{self, EnvelopeOut};
    use flotilla::protocol::message::{Classified, classify};
    use flotilla::protocol::{AppKey, ExecMode, ProcessMeta, Status, Subjects};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let pad = "x".repeat(PAD);
        let mut input = Vec::with_capacity(lines as usize * 400);
        for i in 1..=lines {
            write_line(&mut input, i, &pad)?;
        }
        let client = connect(&url, None).await?;
        let tracker = tokio_util::task::TaskTracker::new();
        // An eighth of the capacity is reserved for events: room for every line.
        let relay = Relay::start(
            std::future::ready(Some(client.clone())),
            flotilla::agent::publisher::QueueLimits {
                messages: 2 * lines as usize,
                bytes: 1 << 30,
                max_wait: Duration::from_millis(250),
            },
            &tracker,
        );
        let hub = RelayHub::new(relay.clone(), Subjects::new("pm")?);
        let meta = ProcessMeta {
            pm_id: 0,
            name: "stages".into(),
            namespace: "default".into(),
            rev: None,
            host: HOST.into(),
            pid: std::process::id(),
            instance: 0,
            exec_mode: ExecMode::Cluster,
            status: Status::Online,
            restart_time: 0,
            pm_uptime: now_us() / 1000,
            app_id: Uuid::new_v4(),
        };
        let worker = hub.worker(&AppKey::new("default", "stages")?, &meta);

        // Parsing alone: line splitting and classification (best of 3: these loops only
        // compute, so the fastest run is the one least disturbed by the rest of the machine).
        let mut seen = 0u64;
        let mut parse_only = f64::MAX;
        for _ in 0..3 {
            let mut reader = LineReader::new(1 << 20);
            seen = 0;
            let t = Instant::now();
            reader.feed(&input, |f, _| {
                if let Frame::Line(l) = f
                    && classify(l).is_ok()
                {
                    seen += 1;
                }
            });
            parse_only = parse_only.min(t.elapsed().as_secs_f64());
        }

        // Plus what `WorkerRelay` builds per message (same calls), dropped at once: no queue.
        let meta_raw = envelope::encode_meta(&meta);
        let mut build = f64::MAX;
        for _ in 0..3 {
            let mut reader = LineReader::new(1 << 20);
            let t = Instant::now();
            reader.feed(&input, |f, _| {
                if let Frame::Line(l) = f
                    && let Ok(Classified::Typed { ty, data }) = classify(l)
                {
                    let id = Uuid::new_v4();
                    let payload = envelope::encode(&EnvelopeOut {
                        at: now_us() / 1000,
                        data: Some(data),
                        raw: None,
                        process: &meta_raw,
                        event: None,
                        id,
                    });
                    let subject = format!("pm.default.stages.{}", ty.as_str());
                    std::hint::black_box((Bytes::from(payload), subject));
                }
            });
            build = build.min(t.elapsed().as_secs_f64());
        }

        // The reader side, then the publisher side draining what it queued, in chunks of 10k
        // lines (the agent's queue holds 16k): on a current-thread runtime the publisher task
        // cannot run until the reader loop yields, so the two are timed apart.
        let mut reader = LineReader::new(1 << 20);
        let (mut read, mut publish) = (0.0, 0.0);
        let chunk = 10_000 * 400;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut fed = 0;
        let mut out = Vec::new();
        for part in input.chunks(chunk) {
            let t = Instant::now();
            reader.feed(part, |f, _| {
                if let Frame::Line(l) = f
                    && let Ok(c) = classify(l)
                {
                    out.extend(worker.message(0, &c));
                }
            });
            let queued = out.len() as u64;
            let dropped_before = worker.dropped();
            worker.push(&mut out).await;
            fed += queued - (worker.dropped() - dropped_before);
            read += t.elapsed().as_secs_f64();
            let t = Instant::now();
            // Lets the publisher run (same thread) until it has published every queued line.
            while relay.stats().relayed < fed && Instant::now() < deadline {
                tokio::task::yield_now().await;
            }
            client.flush().await?;
            publish += t.elapsed().as_secs_f64();
        }
        let relayed = relay.stats().relayed;
        let queued = fed;

        // Plain async-nats doing the same per-message work.
        let payloads: Vec<Bytes> = (0..lines)
            .map(|i| {
                RawTemplate::from_meta(&serde_json::to_string(&meta).unwrap())
                    .message(i)
                    .1
            })
            .collect();
        let subject = "pm.default.stages.process:msg".to_string();
        let t = Instant::now();
        for p in payloads {
            let id = Uuid::new_v4();
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.to_string().as_str());
            client
                .publish_with_headers(subject.clone(), headers, p)
                .await?;
        }
        client.flush().await?;
        let raw = t.elapsed().as_secs_f64();
        drop(worker);
        drop(hub);
        drop(relay);
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
        if seen != lines || relayed != lines || queued != lines {
            return Err(format!(
                "stages: parsed {seen}, queued {queued}, relayed {relayed} of {lines}"
            )
            .into());
        }
        let per = |s: f64| s * 1e6 / lines as f64;
        Ok(Stages {
            lines,
            reader_us: per(read),
            publisher_us: per(publish),
            raw_publish_us: per(raw),
            parse_only_us: per(parse_only),
            build_us: per(build),
        })
    })
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Which cases to run: all, or those named in BENCH_CASES (comma-separated: ceiling, node,
/// native, raw, scale, paced, ladder, pm2), for investigating one at a time.
fn want(case: &str) -> bool {
    match std::env::var("BENCH_CASES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|c| c.trim() == case),
        _ => true,
    }
}

/// Total rates (msgs/s, over 4 native workers) of the lossless-capacity ladder, 2 s each.
const LADDER: [u64; 4] = [25_000, 50_000, 100_000, 150_000];
const LADDER_SECS: u64 = 2;

async fn run() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    trace(&format!("work dir {}", tmp.path().display()));
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("worker.js"), NODE_WORKER_JS)?;
    std::fs::write(
        dir.join("parent.js"),
        format!("{NODE_COMMON_JS}{NODE_PARENT_JS}"),
    )?;
    std::fs::write(
        dir.join("pm2sub.js"),
        format!("{NODE_COMMON_JS}{PM2_SUB_JS}"),
    )?;

    let machine = machine("");
    eprintln!("{machine}");

    // The agent and its NATS (idle while the Node ceiling and pm2 run).
    let nats = Nats::start(&dir.join("nats")).await?;
    let slow = Arc::new(AtomicU64::new(0));
    let subs = connect(&nats.url, Some(slow.clone())).await?;
    let ctl = connect(&nats.url, None).await?;
    let agent = Agent::start(&nats, &dir.join("home"), &ctl).await?;
    let rss_no_workers = mem_kib(agent.pid).0;
    let mut b = Bench {
        dir: dir.clone(),
        nats,
        agent,
        ctl,
        subs,
        slow,
        rss_idle_workers: None,
        sample: None,
    };

    // 1, 2, 7, 3 and 4: the burst cases, interleaved round by round (each round runs every
    // case once, in the same order), so drift on the machine hits every case alike.
    let rounds = knob("BENCH_ROUNDS", ROUNDS).max(1) as usize;
    let mut burst = Bursts::default();
    let mut pm2_version = None;
    let mut pm2_note = None;
    for round in 1..=rounds {
        let of = format!("round {round}/{rounds}");
        if want("ceiling") {
            eprintln!("running: Node IPC ceiling ({NODE_WORKERS} x {NODE_N}), {of}");
            burst.ceiling.push(node_ceiling(&dir).await?);
        }
        if want("node") {
            // The agent's RSS with the workers idle is taken before the first `go`.
            eprintln!("running: Node workers through the agent ({NODE_WORKERS} x {NODE_N}), {of}");
            let app = format!("node{round}");
            let spec = b.node_spec(&app);
            let m = b
                .agent_case(
                    AgentCase {
                        app: &app,
                        spec,
                        workers: NODE_WORKERS,
                        per_worker: NODE_N,
                        rate: 0,
                    },
                    round == 1,
                )
                .await?;
            burst.node.push(m);
        }
        if want("pm2") && pm2_note.is_none() {
            eprintln!("running: pm2 bus ({NODE_WORKERS} x {NODE_N}), if pm2 is installed, {of}");
            match pm2_case(&dir).await {
                Ok(Some((m, v))) => {
                    burst.pm2.push(m);
                    pm2_version = Some(v);
                }
                Ok(None) => pm2_note = Some("not installed".to_string()),
                Err(e) => pm2_note = Some(format!("failed: {e}")),
            }
        }
        // The native 200k burst through the agent, then raw async-nats publishing the
        // envelope the agent made (the first round's native run provides it).
        if want("native") || want("raw") {
            let app = format!("native{round}");
            eprintln!(
                "running: native source through the agent ({NATIVE_WORKERS} x {NATIVE_N}), {of}"
            );
            let spec = b.native_spec(&app);
            let m = b
                .agent_case(
                    AgentCase {
                        app: &app,
                        spec,
                        workers: NATIVE_WORKERS,
                        per_worker: NATIVE_N,
                        rate: 0,
                    },
                    false,
                )
                .await?;
            burst.native.push(m);
            eprintln!("running: raw async-nats ({NATIVE_WORKERS} x {NATIVE_N}), {of}");
            let m = b.raw_case(&app, NATIVE_WORKERS, NATIVE_N, 0, false).await?;
            burst.raw.push(m);
        }
        if want("scale") {
            for (i, w) in SCALE_WORKERS.into_iter().enumerate() {
                let app = format!("scale{w}r{round}");
                let per = SCALE_TOTAL / w as u64;
                eprintln!("running: scaling, {w} native workers x {per}, {of}");
                let spec = b.native_spec(&app);
                let m = b
                    .agent_case(
                        AgentCase {
                            app: &app,
                            spec,
                            workers: w,
                            per_worker: per,
                            rate: 0,
                        },
                        false,
                    )
                    .await?;
                burst.scaling[i].push(m);
            }
        }
    }
    let sample_len = b.sample.as_ref().map_or(0, |s| s.len());
    let raw_len = b
        .sample
        .as_ref()
        .and_then(|s| RawTemplate::from_sample(s).ok())
        .map_or(0, |t| t.message(1).1.len());

    // 3b. Lossless capacity: 4 native workers paced at rising total rates.
    let mut ladder = vec![];
    if want("ladder") {
        for total in LADDER {
            let app = format!("ladder{}k", total / 1000);
            let per_rate = total / NATIVE_WORKERS as u64;
            eprintln!("running: native paced {NATIVE_WORKERS} x {per_rate}/s for {LADDER_SECS} s");
            let spec = b.native_spec(&app);
            let m = b
                .agent_case(
                    AgentCase {
                        app: &app,
                        spec,
                        workers: NATIVE_WORKERS,
                        per_worker: per_rate * LADDER_SECS,
                        rate: per_rate,
                    },
                    false,
                )
                .await?;
            ladder.push((per_rate, m));
        }
    }

    // 5. Paced latency.
    let (pw, pr, ps) = (
        knob("BENCH_PACED_WORKERS", PACED_WORKERS) as usize,
        knob("BENCH_PACED_RATE", PACED_RATE),
        knob("BENCH_PACED_SECS", PACED_SECS),
    );
    let paced_n = pr * ps;
    let paced_rounds = knob("BENCH_PACED_ROUNDS", 3);
    let (mut paced, mut paced_raw, mut paced_via, mut paced_procs) = (None, None, None, None);
    let (mut paced_p99s, mut raw_p99s, mut via_p99s, mut procs_p99s) =
        (vec![], vec![], vec![], vec![]);
    if want("paced") {
        let (mut a, mut r, mut v, mut pp) = (vec![], vec![], vec![], vec![]);
        for round in 1..=paced_rounds {
            eprintln!(
                "running: paced {pw} x {pr}/s for {ps} s, agent, round {round}/{paced_rounds}"
            );
            let app = format!("paced{round}");
            let spec = b.native_spec(&app);
            let m = b
                .agent_case(
                    AgentCase {
                        app: &app,
                        spec,
                        workers: pw,
                        per_worker: paced_n,
                        rate: pr,
                    },
                    false,
                )
                .await?;
            paced_p99s.push(m.p99_us);
            a.push(m);
            if b.sample.is_some() {
                eprintln!(
                    "running: paced {pw} x {pr}/s for {ps} s, raw, round {round}/{paced_rounds}"
                );
                let m = b.raw_case(&app, pw, paced_n, pr, false).await?;
                raw_p99s.push(m.p99_us);
                r.push(m);
                eprintln!(
                    "running: paced {pw} x {pr}/s for {ps} s, raw through the agent's Relay, round {round}/{paced_rounds}"
                );
                let m = b.raw_case(&app, pw, paced_n, pr, true).await?;
                via_p99s.push(m.p99_us);
                v.push(m);
                eprintln!(
                    "running: paced {pw} x {pr}/s for {ps} s, raw from {pw} processes, round {round}/{paced_rounds}"
                );
                let m = b.raw_procs_case(&app, pw, paced_n, pr).await?;
                procs_p99s.push(m.p99_us);
                pp.push(m);
            }
        }
        paced = Some(Measured::pool(&a));
        paced_raw = (!r.is_empty()).then(|| Measured::pool(&r));
        paced_via = (!v.is_empty()).then(|| Measured::pool(&v));
        paced_procs = (!pp.is_empty()).then(|| Measured::pool(&pp));
    }

    // Where the agent's time goes: its code in-process, on one thread.
    let stage = if want("stages") {
        eprintln!("running: agent hot path in-process ({SCALE_TOTAL} lines)");
        let url = b.nats.url.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(stages(url, SCALE_TOTAL).map_err(|e| e.to_string()));
        });
        Some(
            tokio::time::timeout(Duration::from_secs(120), rx)
                .await
                .map_err(|_| "the in-process stages did not finish in 120 s")??,
        )
    } else {
        None
    };

    let final_stats = agent_stats(&b.ctl).await?;
    let (rss_end, end_heartbeat) = b.settled_rss().await?;
    let Bench {
        nats,
        agent,
        rss_idle_workers,
        ..
    } = b;
    let agent_log = agent.log.clone();
    let stopped = agent.stop().await;
    nats.stop().await;
    if let Err(e) = &stopped {
        eprintln!("warning: {e}");
    }
    let warnings = std::fs::read_to_string(&agent_log)
        .map(|s| s.lines().filter(|l| l.contains("WARN")).count())
        .unwrap_or(0);

    // The table: the burst cases as medians of their rounds.
    let med = |v: &[Measured]| (!v.is_empty()).then(|| Measured::median(v));
    let ceiling = med(&burst.ceiling);
    let node = med(&burst.node);
    let pm2 = med(&burst.pm2);
    let raw = med(&burst.raw);
    let native = med(&burst.native);
    let c_rate = ceiling.as_ref().map(Measured::rate);
    let r_rate = raw.as_ref().map(Measured::rate);
    let vs = |m: &Measured, base: Option<f64>, of: &'static str| base.map(|b| (m.rate() / b, of));
    let mut rows: Vec<Row> = vec![];
    let mut cpu_rows: Vec<(String, Measured)> = vec![];
    let mut add = |rows: &mut Vec<Row>, name: String, m: &Measured, ratio: Option<(f64, &str)>| {
        rows.push(Row::of(&name, m, ratio));
        cpu_rows.push((name, m.clone()));
    };
    if let Some(m) = &ceiling {
        add(
            &mut rows,
            format!("Node IPC ceiling, Node parent ({NODE_WORKERS} x {NODE_N})"),
            m,
            None,
        );
    }
    if let Some(m) = &node {
        add(
            &mut rows,
            format!("Flotilla, Node workers ({NODE_WORKERS} x {NODE_N})"),
            m,
            vs(m, c_rate, "ceiling"),
        );
    }
    if let Some(m) = &pm2 {
        add(
            &mut rows,
            format!("pm2 bus, Node workers ({NODE_WORKERS} x {NODE_N})"),
            m,
            vs(m, c_rate, "ceiling"),
        );
    }
    if let Some(e) = &pm2_note {
        rows.push(Row::note("pm2", e));
    }
    if let Some(m) = &raw {
        add(
            &mut rows,
            format!("raw async-nats ({NATIVE_WORKERS} x {NATIVE_N})"),
            m,
            None,
        );
    }
    if let Some(m) = &native {
        add(
            &mut rows,
            format!("Flotilla, native ({NATIVE_WORKERS} x {NATIVE_N}, 200k burst)"),
            m,
            vs(m, r_rate, "raw"),
        );
    }
    for (per_rate, m) in &ladder {
        // No ratio: a paced row's rate is the rate the bench asked for, not a capacity, so
        // dividing it by raw's burst rate would compare the bench's own setting with raw.
        add(
            &mut rows,
            format!("Flotilla, native paced {NATIVE_WORKERS} x {per_rate}/s"),
            m,
            None,
        );
    }
    for (w, rounds) in SCALE_WORKERS.iter().zip(&burst.scaling) {
        if let Some(m) = med(rounds) {
            add(
                &mut rows,
                format!("Flotilla, native scaling {w} x {}", SCALE_TOTAL / *w as u64),
                &m,
                vs(&m, r_rate, "raw"),
            );
        }
    }
    if let Some(m) = &paced_raw {
        add(
            &mut rows,
            format!("raw async-nats paced {pw} x {pr}/s, {paced_rounds} x {ps} s"),
            m,
            None,
        );
    }
    if let Some(m) = &paced_procs {
        add(
            &mut rows,
            format!("raw paced from {pw} processes, {paced_rounds} x {ps} s"),
            m,
            None,
        );
    }
    if let Some(m) = &paced_via {
        add(
            &mut rows,
            format!("raw paced through the agent's Relay, {paced_rounds} x {ps} s"),
            m,
            None,
        );
    }
    if let Some(m) = &paced {
        add(
            &mut rows,
            format!("Flotilla, native paced {pw} x {pr}/s, {paced_rounds} x {ps} s"),
            m,
            None,
        );
    }
    rows.push(Row::note(
        "agent RSS: no workers / 4 idle Node workers",
        &format!(
            "{} / {}",
            mib(rss_no_workers),
            rss_idle_workers.map_or("-".into(), mib)
        ),
    ));
    println!();
    println!("{machine}");
    println!();
    print_table(&rows);
    println!(
        "(Rows with a min-max are {rounds} interleaved rounds: msgs/s, p50, p99 and CPU are medians, ratios are between medians, loss is summed over the rounds, RSS is the highest of the rounds. Paced rows are single runs, or rounds pooled.)"
    );
    println!(
        "('agent' RSS/CPU: the flotilla agent; in the ceiling row the Node parent; in the pm2 row pm2's daemon. RSS peak is VmHWM reset before the burst, except the Node parent's: its lifetime maxRSS. The agent's 'after' is read after its first heartbeat following the burst, when it has trimmed its heap.)"
    );
    println!();
    println!(
        "CPU seconds during each burst (medians of the rounds; relay = agent, Node parent or pm2 daemon; bench = this process: the subscriber, plus the publisher in raw rows; the pm2 subscriber is a Node process)"
    );
    print_cpu(&cpu_rows);
    burst.print_rounds();

    // Targets.
    println!();
    println!("Targets (shown, not asserted):");
    let yes = |b: bool| if b { "met" } else { "MISSED" };
    if let (Some(n), Some(c)) = (&node, c_rate) {
        let r = n.rate() / c;
        println!(
            "  Flotilla >= 0.9x Node ceiling, zero loss ........ {r:.2}x, loss {} -> {} (per round {})",
            n.loss(),
            yes(r >= 0.9 && n.loss() == 0),
            paired(&burst.node, &burst.ceiling)
        );
    }
    if let (Some(n), Some(r)) = (&native, r_rate) {
        let x = n.rate() / r;
        println!(
            "  native >= 0.8x raw ............................... {x:.2}x (loss {}) -> {} (per round {})",
            n.loss(),
            yes(x >= 0.8 && n.loss() == 0),
            paired(&burst.native, &burst.raw)
        );
    }
    if let (Some(a), Some(r)) = (&paced, &paced_raw)
        && let (Some(pa), Some(pr)) = (a.p99_us, r.p99_us)
    {
        let d = (pa - pr) / 1000.0;
        println!(
            "  p99 within 0.5 ms of raw's at 4k/s ............... {d:+.3} ms ({} vs {}) -> {}",
            fmt_lat(a.p99_us),
            fmt_lat(r.p99_us),
            yes(d <= 0.5)
        );
        if let Some(pp) = paced_procs.as_ref().and_then(|m| m.p99_us) {
            println!(
                "    (against raw publishing from the same number of worker processes: {:+.3} ms, {} vs {})",
                (pa - pp) / 1000.0,
                fmt_lat(a.p99_us),
                fmt_lat(Some(pp))
            );
        }
    }
    if let Some(idle) = rss_idle_workers {
        println!(
            "  agent RSS < 15 MiB with 4 idle workers ........... {} -> {}",
            mib(idle),
            yes(idle < 15 * 1024)
        );
    }
    if let Some(n) = &native {
        let afters: Vec<Option<u64>> = burst.native.iter().map(|m| m.relay_after_kib).collect();
        // The idle figure the agent must come back to: with its 4 idle Node workers when that
        // case ran, else with none.
        let idle = rss_idle_workers.unwrap_or(rss_no_workers);
        let (verdict, why) = rss_bounded(n.relay_peak_kib, &afters, rss_end, idle);
        println!(
            "  agent RSS bounded through the 200k burst ......... peak {} (highest of {rounds}), after the next heartbeat {} ({}), at the end {}{}; idle {} -> {verdict}{why}",
            n.relay_peak_kib.map_or("?".into(), mib),
            n.relay_after_kib.map_or("?".into(), mib),
            afters
                .iter()
                .map(|a| a.map_or("?".into(), mib))
                .collect::<Vec<_>>()
                .join(", "),
            mib(rss_end),
            if end_heartbeat {
                ""
            } else {
                " (no heartbeat came)"
            },
            mib(idle),
        );
        println!(
            "    (bounded: peak < {RSS_PEAK_LIMIT_MIB} MiB, and every round's 'after' and the end within {RSS_RETURN_WITHIN_MIB} MiB of idle)"
        );
    }
    let p99s = |v: &[Option<f64>]| v.iter().map(|p| fmt_lat(*p)).collect::<Vec<_>>().join(", ");
    if !paced_p99s.is_empty() {
        println!(
            "  paced p99 per round: Flotilla {}; raw {}; raw through the agent's Relay {}; raw from {pw} processes {}",
            p99s(&paced_p99s),
            p99s(&raw_p99s),
            p99s(&via_p99s),
            p99s(&procs_p99s)
        );
    }
    for (name, m) in [
        ("raw", &paced_raw),
        ("raw through the agent's Relay", &paced_via),
        ("raw from processes", &paced_procs),
        ("Flotilla", &paced),
    ] {
        if let Some(m) = m
            && let Some([p90, p999, max]) = m.tail_us
        {
            println!(
                "  paced {name}: p50 {} p90 {} p99 {} p99.9 {} max {}",
                fmt_lat(m.p50_us),
                fmt_lat(Some(p90)),
                fmt_lat(m.p99_us),
                fmt_lat(Some(p999)),
                fmt_lat(Some(max))
            );
        }
    }
    if let Some(m) = &paced {
        let show = |v: Option<(f64, f64)>| {
            v.map_or("-".into(), |(a, b)| {
                format!(
                    "{:.2} ms to the agent + {:.2} ms on",
                    a / 1000.0,
                    b / 1000.0
                )
            })
        };
        println!(
            "  paced Flotilla, mean split at the agent's `at` stamp: all messages {}; the slowest 1% {}",
            show(split_at(&m.split_us, 0.0)),
            show(split_at(&m.split_us, 0.99))
        );
    }
    if let Some(Ok(st)) = &stage {
        println!();
        println!(
            "Agent hot path, in-process on one thread ({} lines of 400 B through the agent's own LineReader, classify, WorkerRelay and Relay):",
            st.lines
        );
        println!(
            "  split + classify {:.2} us/line; + envelope, id, subject (dropped at once) {:.2}; reader side as the agent runs it (+ queue) {:.2} us/line",
            st.parse_only_us, st.build_us, st.reader_us
        );
        println!(
            "  publisher side (Relay's publish loop -> async-nats -> nats-server) {:.2} us/msg; plain async-nats loop with the same per-message work {:.2} us/msg",
            st.publisher_us, st.raw_publish_us
        );
    } else if let Some(Err(e)) = &stage {
        println!("Agent hot path in-process: failed: {e}");
    }
    println!();
    let slow_total: u64 = cpu_rows.iter().map(|(_, m)| m.slow_consumer).sum();
    let no_heartbeat: u64 = cpu_rows.iter().map(|(_, m)| m.no_heartbeat).sum();
    println!(
        "envelope bytes: agent {sample_len}, raw {raw_len}; channel line 400 bytes; agent totals: relayed {}, dropped {}, ipc_errors {}; agent log warnings: {warnings}; subscriber slow-consumer events: {slow_total}",
        final_stats.counters.relayed, final_stats.counters.dropped, final_stats.counters.ipc_errors,
    );
    let interval = std::env::var("BENCH_AGENT_FLOTILLA_HEARTBEAT_INTERVAL")
        .unwrap_or_else(|_| HEARTBEAT_INTERVAL.into());
    println!(
        "agent heartbeat interval {interval}; RSS 'after' read without a following heartbeat: {no_heartbeat} times"
    );
    if let Some(v) = &pm2_version {
        println!(
            "pm2 {v}: `pm2 start worker.js -i {NODE_WORKERS}` (cluster mode), subscriber `launchBus`"
        );
    }
    stopped
}

/// Every round of each burst case, in run order.
struct Bursts {
    ceiling: Vec<Measured>,
    node: Vec<Measured>,
    pm2: Vec<Measured>,
    native: Vec<Measured>,
    raw: Vec<Measured>,
    /// Per entry of [`SCALE_WORKERS`].
    scaling: Vec<Vec<Measured>>,
}

impl Default for Bursts {
    fn default() -> Bursts {
        Bursts {
            ceiling: vec![],
            node: vec![],
            pm2: vec![],
            native: vec![],
            raw: vec![],
            scaling: vec![vec![]; SCALE_WORKERS.len()],
        }
    }
}

impl Bursts {
    /// msgs/s of every round, and each round's ratio to the same round's baseline.
    fn print_rounds(&self) {
        if self.ceiling.len() + self.node.len() + self.native.len() + self.raw.len() == 0 {
            return;
        }
        println!();
        println!(
            "Burst rounds in run order (msgs/s; a ratio is to the same round's ceiling or raw):"
        );
        let rates = |v: &[Measured], base: &[Measured]| {
            v.iter()
                .enumerate()
                .map(|(i, m)| match base.get(i) {
                    Some(b) if b.rate() > 0.0 => {
                        format!("{} ({:.2}x)", fmt_rate(m.rate()), m.rate() / b.rate())
                    }
                    _ => fmt_rate(m.rate()),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut lines = vec![
            ("Node IPC ceiling".to_string(), rates(&self.ceiling, &[])),
            (
                "Flotilla, Node workers".into(),
                rates(&self.node, &self.ceiling),
            ),
            ("pm2 bus".into(), rates(&self.pm2, &self.ceiling)),
            ("raw async-nats".into(), rates(&self.raw, &[])),
            (
                "Flotilla, native 200k burst".into(),
                rates(&self.native, &self.raw),
            ),
        ];
        for (w, v) in SCALE_WORKERS.iter().zip(&self.scaling) {
            lines.push((
                format!("scaling {w} x {}", SCALE_TOTAL / *w as u64),
                rates(v, &self.raw),
            ));
        }
        let width = lines.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, r) in lines.into_iter().filter(|(_, r)| !r.is_empty()) {
            println!("  {name:width$}  {r}");
        }
    }
}

/// Each round's ratio of `v` to the same round of `base`, e.g. "0.66x, 0.71x, 0.62x".
/// The highest the agent's RSS may reach through the 200k burst (VmHWM, MiB).
const RSS_PEAK_LIMIT_MIB: u64 = 64;
/// How close to its idle RSS the agent must come back after a burst (MiB).
const RSS_RETURN_WITHIN_MIB: u64 = 4;

/// The "agent RSS bounded" verdict: `met` when the peak is known and under
/// [`RSS_PEAK_LIMIT_MIB`], and every round's RSS after the burst (`afters`, all known) and the
/// RSS at the end are within [`RSS_RETURN_WITHIN_MIB`] of `idle` (all KiB); else `MISSED` and
/// why.
fn rss_bounded(
    peak: Option<u64>,
    afters: &[Option<u64>],
    end: u64,
    idle: u64,
) -> (&'static str, String) {
    let back = idle + RSS_RETURN_WITHIN_MIB * 1024;
    let mut why = vec![];
    match peak {
        None => why.push("peak unknown".to_string()),
        Some(p) if p >= RSS_PEAK_LIMIT_MIB * 1024 => {
            why.push(format!("peak {} >= {RSS_PEAK_LIMIT_MIB} MiB", mib(p)))
        }
        Some(_) => {}
    }
    if afters.is_empty() || afters.iter().any(Option::is_none) {
        why.push("an 'after' is unknown".into());
    }
    for a in afters.iter().flatten().filter(|a| **a > back) {
        why.push(format!(
            "after {} > idle + {RSS_RETURN_WITHIN_MIB} MiB",
            mib(*a)
        ));
    }
    if end > back {
        why.push(format!(
            "end {} > idle + {RSS_RETURN_WITHIN_MIB} MiB",
            mib(end)
        ));
    }
    if why.is_empty() {
        ("met", String::new())
    } else {
        ("MISSED", format!(" ({})", why.join("; ")))
    }
}

fn paired(v: &[Measured], base: &[Measured]) -> String {
    v.iter()
        .zip(base)
        .filter(|(_, b)| b.rate() > 0.0)
        .map(|(m, b)| format!("{:.2}x", m.rate() / b.rate()))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Printing.

struct Row {
    cells: [String; 9],
}

fn fmt_lat(us: Option<f64>) -> String {
    match us {
        None => "-".into(),
        Some(u) if u.abs() < 10_000.0 => format!("{:.2} ms", u / 1000.0),
        Some(u) => format!("{:.0} ms", u / 1000.0),
    }
}

fn fmt_rate(r: f64) -> String {
    let r = r.round() as u64;
    let s = r.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl Row {
    fn of(case: &str, m: &Measured, ratio: Option<(f64, &str)>) -> Row {
        let loss = m.loss();
        let mut loss_s = if loss == 0 {
            "0".to_string()
        } else {
            format!(
                "{loss} ({:.1}%)",
                100.0 * loss as f64 / m.expected.max(1) as f64
            )
        };
        if let Some(d) = m.agent_drops.filter(|d| *d > 0) {
            let _ = write!(loss_s, ", agent dropped {d}");
        }
        if m.slow_consumer > 0 {
            let _ = write!(loss_s, ", slow consumer");
        }
        let rss = match (m.relay_peak_kib, m.relay_after_kib) {
            (Some(p), Some(a)) => format!("{} / {}", mib(p), mib(a)),
            (None, Some(a)) => format!("? / {}", mib(a)),
            _ => "-".into(),
        };
        let cpu = match m.relay_cpu_s {
            Some(c) if m.received > 0 => {
                format!("{c:.2} s ({:.1} us/msg)", c * 1e6 / m.received_per_round())
            }
            Some(c) => format!("{c:.2} s"),
            None => "-".into(),
        };
        Row {
            cells: [
                case.to_string(),
                fmt_rate(m.rate()),
                m.rate_range.map_or("-".into(), |(lo, hi)| {
                    format!("{}-{}", fmt_rate(lo), fmt_rate(hi))
                }),
                ratio.map_or("-".into(), |(r, of)| format!("{r:.2}x {of}")),
                loss_s,
                fmt_lat(m.p50_us),
                fmt_lat(m.p99_us),
                rss,
                cpu,
            ],
        }
    }

    fn note(case: &str, text: &str) -> Row {
        Row {
            cells: [
                case.to_string(),
                text.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        }
    }
}

fn print_table(rows: &[Row]) {
    print_aligned(
        &[
            "case",
            "msgs/s",
            "min-max msgs/s",
            "ratio",
            "loss",
            "p50",
            "p99",
            "agent RSS peak / after",
            "agent CPU",
        ],
        &rows.iter().map(|r| r.cells.to_vec()).collect::<Vec<_>>(),
        &[false, true, true, true, false, true, true, true, false],
    );
}

fn print_cpu(rows: &[(String, Measured)]) {
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(name, m)| {
            let total: f64 = [m.relay_cpu_s, m.nats_cpu_s, m.bench_cpu_s, m.workers_cpu_s]
                .iter()
                .flatten()
                .sum();
            vec![
                name.clone(),
                format!("{:.2}", m.secs),
                f(m.relay_cpu_s),
                f(m.nats_cpu_s),
                f(m.bench_cpu_s),
                f(m.workers_cpu_s),
                format!("{:.0}%", 100.0 * total / (2.0 * m.secs.max(1e-9))),
            ]
        })
        .collect();
    print_aligned(
        &[
            "case",
            "wall s",
            "relay",
            "nats-server",
            "bench",
            "workers",
            "busy of 2 cores",
        ],
        &table,
        &[false, true, true, true, true, true, true],
    );
}
