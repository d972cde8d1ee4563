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
//! Every wait is an awaited event under a deadline; the whole run is bounded. The bench starts
//! its own `nats-server` on a free loopback port and kills everything it started at the end.
//! BENCHMARKS.md records a run and what the figures mean.

use async_nats::{Client, ConnectOptions, HeaderMap, Subscriber};
use bytes::Bytes;
use flotilla::protocol::control::{AgentStats, SendRequest, StartRequest, TargetRequest};
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
const PACED_WORKERS: usize = 4;
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
const TOTAL_DEADLINE: Duration = Duration::from_secs(360);

/// The worker for the Node cases: only `process.send` and `process.on('message')`, so it runs
/// unmodified under a Node parent, the agent and pm2. It announces itself, waits for `go`
/// (a message, or a pm2 packet whose `data` has `go`), then sends `n` messages in
/// `setImmediate` batches, waiting for the last send's callback whenever `send()` returned
/// false (Node's own backpressure signal), and says when it is done.
const NODE_WORKER_JS: &str = r#"'use strict';
const { performance } = require('perf_hooks');
const PAD = 'x'.repeat(Number(process.env.BENCH_PAD || 328));
const BATCH = 500;
const origin = performance.timeOrigin;
const nowUs = () => Math.round((origin + performance.now()) * 1000);
let busy = false;
function burst(n) {
  busy = true;
  let i = 0;
  let waiting = false;
  const onLast = () => { if (waiting) { waiting = false; next(); } };
  const next = () => (i < n ? setImmediate(step) : finish());
  function step() {
    let full = false;
    const end = Math.min(n, i + BATCH);
    while (i < end) {
      i++;
      const m = { type: 'process:msg', data: { t: nowUs(), i, pad: PAD } };
      if (!(i === end ? process.send(m, onLast) : process.send(m))) full = true;
    }
    if (full) waiting = true; else next();
  }
  function finish() { busy = false; process.send({ type: 'bench:done', data: { sent: n } }); }
  step();
}
process.on('message', (m) => {
  const g = m && (m.go ? m : (m.data && m.data.go ? m.data : null));
  if (g && !busy) burst(Number(g.n) || 0);
});
process.send({ type: 'bench:ready', data: { pid: process.pid } });
"#;

/// Helpers shared by the Node parent and the pm2 subscriber.
const NODE_COMMON_JS: &str = r#"'use strict';
const fs = require('fs');
const { performance } = require('perf_hooks');
const W = Number(process.env.BENCH_W);
const N = Number(process.env.BENCH_N);
const TCK = Number(process.env.BENCH_CLK_TCK || 100);
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const cpuOf = (pid) => {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / TCK;
  } catch (e) { return 0; }
};
const memOf = (pid) => {
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const get = (k) => Number((s.match(new RegExp(k + ':\\s+(\\d+)')) || [0, 0])[1]);
    return { rss: get('VmRSS'), hwm: get('VmHWM') };
  } catch (e) { return { rss: 0, hwm: 0 }; }
};
const lats = new Float64Array(W * N);
let count = 0, done = 0, t0 = 0, tLast = 0, lastSeen = 0;
function onData(d) {
  const now = nowUs();
  if (count < lats.length) lats[count] = now - d.t;
  count++;
  tLast = performance.now();
}
function percentiles() {
  const l = lats.subarray(0, Math.min(count, lats.length)).sort();
  const pct = (p) => (l.length ? l[Math.min(l.length - 1, Math.floor(l.length * p))] : null);
  return { p50_us: pct(0.5), p99_us: pct(0.99) };
}
// Ends a burst whose done markers never come (lost messages): nothing new for 5 s.
function watchdog(finish) {
  setInterval(() => {
    if (t0 && count === lastSeen) finish();
    lastSeen = count;
  }, 5000).unref();
}
"#;

/// The Node ceiling: a plain parent forking the workers with the channel on fd 3, counting.
const NODE_PARENT_JS: &str = r#"
const { fork } = require('child_process');
const kids = [];
let ready = 0, cpu0 = null, kidsCpu0 = 0;
for (let w = 0; w < W; w++) {
  const c = fork(process.env.BENCH_WORKER, [], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  c.on('message', onMessage);
  kids.push(c);
}
function onMessage(m) {
  if (m.type === 'process:msg') return onData(m.data);
  if (m.type === 'bench:ready') { if (++ready === W) go(); }
  else if (m.type === 'bench:done') { if (++done === W) finish(); }
}
function go() {
  kidsCpu0 = kids.reduce((a, k) => a + cpuOf(k.pid), 0);
  cpu0 = process.cpuUsage();
  t0 = performance.now();
  for (const k of kids) k.send({ go: 1, n: N });
}
let finished = false;
function finish() {
  if (finished) return;
  finished = true;
  const cpu = process.cpuUsage(cpu0);
  const out = Object.assign({
    received: count, secs: (tLast - t0) / 1000,
    relay_cpu_s: (cpu.user + cpu.system) / 1e6,
    relay_peak_kib: process.resourceUsage().maxRSS,
    relay_after_kib: Math.round(process.memoryUsage().rss / 1024),
    workers_cpu_s: kids.reduce((a, k) => a + cpuOf(k.pid), 0) - kidsCpu0,
  }, percentiles());
  console.log('RESULT ' + JSON.stringify(out));
  for (const k of kids) k.kill('SIGKILL');
  process.exit(0);
}
watchdog(finish);
"#;

/// pm2: subscribes with `launchBus`, says BUS_READY, waits for the workers the bench starts
/// with `pm2 start worker.js -i 4`, sends `go` with `sendDataToProcessId`, counts.
const PM2_SUB_JS: &str = r#"
const pm2 = require(process.env.BENCH_PM2_DIR);
const NAME = process.env.BENCH_APP;
const ids = new Set();
const pids = [];
let god = 0, godCpu0 = 0, kidsCpu0 = 0, cpu0 = null;
const mine = (p) => p && p.process && p.process.name === NAME;
pm2.connect((err) => {
  if (err) { console.error(err); process.exit(1); }
  pm2.launchBus((err, bus) => {
    if (err) { console.error(err); process.exit(1); }
    bus.on('process:msg', (p) => { if (mine(p) && p.data && p.data.t !== undefined) onData(p.data); });
    bus.on('bench:ready', (p) => {
      if (!mine(p) || ids.has(p.process.pm_id)) return;
      ids.add(p.process.pm_id);
      pids.push(p.data.pid);
      if (ids.size === W) go();
    });
    bus.on('bench:done', (p) => { if (mine(p) && ++done === W) finish(); });
    console.log('BUS_READY');
  });
});
function go() {
  god = Number(fs.readFileSync(process.env.PM2_HOME + '/pm2.pid', 'utf8'));
  try { fs.writeFileSync(`/proc/${god}/clear_refs`, '5'); } catch (e) {}
  godCpu0 = cpuOf(god);
  kidsCpu0 = pids.reduce((a, p) => a + cpuOf(p), 0);
  cpu0 = process.cpuUsage();
  t0 = performance.now();
  for (const id of ids) {
    pm2.sendDataToProcessId(id, { type: 'process:msg', data: { go: 1, n: N }, topic: 'go' }, (e) => {
      if (e) { console.error(e); process.exit(1); }
    });
  }
}
let finished = false;
function finish() {
  if (finished) return;
  finished = true;
  const cpu = process.cpuUsage(cpu0);
  const m = memOf(god);
  const out = Object.assign({
    received: count, secs: (tLast - t0) / 1000,
    relay_cpu_s: cpuOf(god) - godCpu0, relay_peak_kib: m.hwm, relay_after_kib: m.rss,
    workers_cpu_s: pids.reduce((a, p) => a + cpuOf(p), 0) - kidsCpu0,
    bench_cpu_s: (cpu.user + cpu.system) / 1e6,
  }, percentiles());
  console.log('RESULT ' + JSON.stringify(out));
  process.exit(0);
}
watchdog(finish);
"#;

fn main() {
    if std::env::var_os("BENCH_NATIVE_SOURCE").is_some() {
        native_source();
        return;
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
    match rt.block_on(tokio::time::timeout(TOTAL_DEADLINE, run())) {
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
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    let mut buf = Vec::with_capacity(512);
    let mut w = ch;
    for i in 1..=n {
        pace(start + period * (i as u32 - 1));
        buf.clear();
        write_line(&mut buf, i, pad)?;
        w.write_all(&buf)?;
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

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds of a process (all its threads).
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split(' ').collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

fn self_cpu() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(0.0)
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_secs(*p)).sum()
}

/// (VmRSS, VmHWM) in KiB.
fn mem_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// Resets the peak RSS (VmHWM) so the next reading is the peak of what follows.
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
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

fn percentile(sorted: &[i64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    Some(sorted[i] as f64)
}

fn which(name: &str) -> Option<PathBuf> {
    flotilla::agent::spawn::which(name, None)
}

fn command_line(program: &str, args: &[&str]) -> String {
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
    TargetRequest {
        request_id: Uuid::new_v4(),
        target: Target::parse(target).expect("valid target"),
    }
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
    relay_cpu_s: Option<f64>,
    relay_peak_kib: Option<u64>,
    relay_after_kib: Option<u64>,
    nats_cpu_s: Option<f64>,
    bench_cpu_s: Option<f64>,
    workers_cpu_s: Option<f64>,
    agent_drops: Option<u64>,
    slow_consumer: u64,
}

impl Measured {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
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
    let deadline = Instant::now() + BURST_DEADLINE;
    loop {
        let wait = IDLE.min(deadline.saturating_duration_since(Instant::now()));
        let m = match tokio::time::timeout(wait, sub.next()).await {
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
    /// Agent RSS (KiB) right after it came online, no workers.
    rss_no_workers: u64,
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
        let mut sub = self.subs.subscribe("pm.>").await?;
        self.subs.flush().await?;
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
        let pids = await_ready(&mut sub, app, case.workers).await?;
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
        };
        let t0 = Instant::now();
        let ctl = self.ctl.clone();
        let sent = tokio::spawn(async move { request(&ctl, go.into()).await.map(|_| ()) });
        let c = collect(&mut sub, app, expected, case.workers, t0).await;
        let (agent1, nats1, self1, workers1) = (
            cpu_secs(self.agent.pid).unwrap_or(0.0),
            cpu_secs(self.nats.pid).unwrap_or(0.0),
            self_cpu(),
            cpu_of(&pids),
        );
        let (rss_after, hwm) = mem_kib(self.agent.pid);
        sent.await??;
        let after = agent_stats(&self.ctl).await?;
        if self.sample.is_none() && native {
            self.sample = c.sample.clone();
        }
        request(&self.ctl, Request::Delete(targeted(app))).await?;
        Ok(Measured {
            received: c.received,
            expected,
            secs: c.secs,
            p50_us: percentile(&c.lat_us, 0.50),
            p99_us: percentile(&c.lat_us, 0.99),
            relay_cpu_s: Some(agent1 - agent0),
            relay_peak_kib: hwm_reset.then_some(hwm),
            relay_after_kib: Some(rss_after),
            nats_cpu_s: Some(nats1 - nats0),
            bench_cpu_s: Some(self1 - self0),
            workers_cpu_s: Some(workers1 - workers0),
            agent_drops: Some(after.dropped - before.dropped),
            slow_consumer: self.slow.load(Ordering::Relaxed) - slow0,
        })
    }

    /// The same envelopes published straight from this process with async-nats (one client,
    /// as the agent has), flat out (`rate` 0) from one task, or paced from one thread per
    /// simulated worker.
    async fn raw_case(
        &mut self,
        app: &str,
        workers: usize,
        per_worker: u64,
        rate: u64,
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
            let period = Duration::from_nanos(1_000_000_000 / rate);
            for _ in 0..workers {
                let (p, t, h) = (publisher.clone(), template.clone(), handle.clone());
                let (subject, done) = (subject.clone(), done.clone());
                threads.push(std::thread::spawn(move || {
                    for i in 1..=per_worker {
                        pace(t0 + period * (i as u32 - 1));
                        let (headers, payload) = t.message(i);
                        if h.block_on(p.publish_with_headers(subject.clone(), headers, payload))
                            .is_err()
                        {
                            return;
                        }
                    }
                    let _ = h.block_on(p.publish(done, Bytes::from_static(b"{}")));
                }));
            }
        }
        let c = collect(&mut sub, app, expected, workers, t0).await;
        let (nats1, self1) = (cpu_secs(self.nats.pid).unwrap_or(0.0), self_cpu());
        for t in threads {
            let _ = t.join();
        }
        Ok(Measured {
            received: c.received,
            expected,
            secs: c.secs,
            p50_us: percentile(&c.lat_us, 0.50),
            p99_us: percentile(&c.lat_us, 0.99),
            nats_cpu_s: Some(nats1 - nats0),
            bench_cpu_s: Some(self1 - self0),
            slow_consumer: self.slow.load(Ordering::Relaxed) - slow0,
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
            } else if env.event.as_ref().is_some_and(|e| e.event == "online") {
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
        Ok(RawTemplate {
            meta: p.process.get().into(),
            pad: "x".repeat(PAD).into(),
        })
    }

    fn message(&self, i: u64) -> (HeaderMap, Bytes) {
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
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.to_string().as_str());
        (headers, Bytes::from(s))
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
// The run.

async fn run() -> Res<()> {
    let tmp = tempfile::tempdir()?;
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

    let machine = machine();
    eprintln!("{machine}");
    let mut rows: Vec<Row> = vec![];
    let mut cpu_rows: Vec<(String, Measured)> = vec![];

    // 1. The Node IPC ceiling.
    eprintln!("running: Node IPC ceiling ({NODE_WORKERS} x {NODE_N})");
    let ceiling = node_ceiling(&dir).await?;

    // The agent and its NATS.
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
        rss_no_workers,
        rss_idle_workers: None,
        sample: None,
    };

    // 2. The same Node workers through the agent (RSS with them idle is taken before `go`).
    eprintln!("running: Node workers through the agent ({NODE_WORKERS} x {NODE_N})");
    let spec = b.node_spec("node");
    let node = b
        .agent_case(
            AgentCase {
                app: "node",
                spec,
                workers: NODE_WORKERS,
                per_worker: NODE_N,
                rate: 0,
            },
            true,
        )
        .await?;

    // 3 and 6. Native source through the agent (the 200k burst), then raw async-nats.
    eprintln!("running: native source through the agent ({NATIVE_WORKERS} x {NATIVE_N})");
    let spec = b.native_spec("native");
    let native = b
        .agent_case(
            AgentCase {
                app: "native",
                spec,
                workers: NATIVE_WORKERS,
                per_worker: NATIVE_N,
                rate: 0,
            },
            false,
        )
        .await?;
    let sample_len = b.sample.as_ref().map_or(0, |s| s.len());
    eprintln!("running: raw async-nats ({NATIVE_WORKERS} x {NATIVE_N})");
    let raw = b.raw_case("native", NATIVE_WORKERS, NATIVE_N, 0).await?;
    let raw_len = b
        .sample
        .as_ref()
        .and_then(|s| RawTemplate::from_sample(s).ok())
        .map_or(0, |t| t.message(1).1.len());

    // 4. Scaling.
    let mut scaling = vec![];
    for w in SCALE_WORKERS {
        let app = format!("scale{w}");
        let per = SCALE_TOTAL / w as u64;
        eprintln!("running: scaling, {w} native workers x {per}");
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
        scaling.push((w, per, m));
    }

    // 5. Paced latency.
    let paced_n = PACED_RATE * PACED_SECS;
    eprintln!("running: paced {PACED_WORKERS} x {PACED_RATE}/s for {PACED_SECS} s, agent");
    let spec = b.native_spec("paced");
    let paced = b
        .agent_case(
            AgentCase {
                app: "paced",
                spec,
                workers: PACED_WORKERS,
                per_worker: paced_n,
                rate: PACED_RATE,
            },
            false,
        )
        .await?;
    eprintln!("running: paced {PACED_WORKERS} x {PACED_RATE}/s for {PACED_SECS} s, raw");
    let paced_raw = b
        .raw_case("paced", PACED_WORKERS, paced_n, PACED_RATE)
        .await?;

    let final_stats = agent_stats(&b.ctl).await?;
    let rss_end = mem_kib(b.agent.pid).0;
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

    // 7. pm2.
    eprintln!("running: pm2 bus ({NODE_WORKERS} x {NODE_N}), if pm2 is installed");
    let pm2 = match pm2_case(&dir).await {
        Ok(p) => p.map(Ok),
        Err(e) => Some(Err(e.to_string())),
    };

    // The table.
    let c_rate = ceiling.rate();
    let r_rate = raw.rate();
    rows.push(Row::of(
        &format!("Node IPC ceiling ({NODE_WORKERS} x {NODE_N}, Node parent)"),
        &ceiling,
        None,
    ));
    rows.push(Row::of(
        &format!("Flotilla, Node workers ({NODE_WORKERS} x {NODE_N})"),
        &node,
        Some((node.rate() / c_rate, "ceiling")),
    ));
    match &pm2 {
        Some(Ok((m, _))) => rows.push(Row::of(
            &format!("pm2 bus, Node workers ({NODE_WORKERS} x {NODE_N})"),
            m,
            Some((m.rate() / c_rate, "ceiling")),
        )),
        Some(Err(e)) => rows.push(Row::note("pm2 bus", &format!("failed: {e}"))),
        None => rows.push(Row::note("pm2", "not installed")),
    }
    rows.push(Row::of(
        &format!("raw async-nats ({NATIVE_WORKERS} x {NATIVE_N})"),
        &raw,
        None,
    ));
    rows.push(Row::of(
        &format!("Flotilla, native ({NATIVE_WORKERS} x {NATIVE_N}, 200k burst)"),
        &native,
        Some((native.rate() / r_rate, "raw")),
    ));
    for (w, per, m) in &scaling {
        rows.push(Row::of(
            &format!("Flotilla, native scaling {w} x {per}"),
            m,
            Some((m.rate() / r_rate, "raw")),
        ));
    }
    rows.push(Row::of(
        &format!("raw async-nats paced {PACED_WORKERS} x {PACED_RATE}/s"),
        &paced_raw,
        None,
    ));
    rows.push(Row::of(
        &format!("Flotilla, native paced {PACED_WORKERS} x {PACED_RATE}/s"),
        &paced,
        None,
    ));
    rows.push(Row::note(
        "agent RSS: no workers / 4 idle Node workers",
        &format!(
            "{} / {}",
            mib(rss_no_workers),
            rss_idle_workers.map_or("?".into(), mib)
        ),
    ));
    println!();
    println!("{machine}");
    println!();
    print_table(&rows);

    cpu_rows.push(("Node IPC ceiling".into(), ceiling.clone()));
    cpu_rows.push(("Flotilla, Node workers".into(), node.clone()));
    if let Some(Ok((m, _))) = &pm2 {
        cpu_rows.push(("pm2 bus, Node workers".into(), m.clone()));
    }
    cpu_rows.push(("raw async-nats".into(), raw.clone()));
    cpu_rows.push(("Flotilla, native x4".into(), native.clone()));
    for (w, _, m) in &scaling {
        cpu_rows.push((format!("Flotilla, native scaling {w}"), m.clone()));
    }
    cpu_rows.push(("raw async-nats paced".into(), paced_raw.clone()));
    cpu_rows.push(("Flotilla, native paced".into(), paced.clone()));
    println!();
    println!(
        "CPU seconds during each burst (relay = agent, Node parent or pm2 daemon; bench = this process: subscriber, and publisher in raw rows)"
    );
    print_cpu(&cpu_rows);

    // Targets.
    let p99_diff = match (paced.p99_us, paced_raw.p99_us) {
        (Some(a), Some(r)) => Some((a - r) / 1000.0),
        _ => None,
    };
    println!();
    println!("Targets (shown, not asserted):");
    let yes = |b: bool| if b { "met" } else { "MISSED" };
    let node_ratio = node.rate() / c_rate;
    println!(
        "  Flotilla >= 0.9x Node ceiling, zero loss ........ {:.2}x, loss {} -> {}",
        node_ratio,
        node.loss(),
        yes(node_ratio >= 0.9 && node.loss() == 0)
    );
    let native_ratio = native.rate() / r_rate;
    println!(
        "  native >= 0.8x raw ............................... {:.2}x (loss {}) -> {}",
        native_ratio,
        native.loss(),
        yes(native_ratio >= 0.8)
    );
    match p99_diff {
        Some(d) => println!(
            "  p99 within 0.5 ms of raw's at 4k/s ............... {:+.3} ms ({} vs {}) -> {}",
            d,
            fmt_lat(paced.p99_us),
            fmt_lat(paced_raw.p99_us),
            yes(d <= 0.5)
        ),
        None => println!("  p99 within 0.5 ms of raw's at 4k/s ............... no data"),
    }
    let idle = rss_idle_workers.unwrap_or(0);
    println!(
        "  agent RSS < 15 MiB with 4 idle workers ........... {} -> {}",
        mib(idle),
        yes(idle > 0 && idle < 15 * 1024)
    );
    println!(
        "  agent RSS bounded through the 200k burst ......... peak {}, after {}, at the end {}",
        native.relay_peak_kib.map_or("?".into(), mib),
        native.relay_after_kib.map_or("?".into(), mib),
        mib(rss_end)
    );
    println!();
    println!(
        "envelope bytes: agent {sample_len}, raw {raw_len}; channel line 400 bytes; agent totals: relayed {}, dropped {}, ipc_errors {}; agent log warnings: {warnings}; subscriber slow-consumer events: {}",
        final_stats.relayed,
        final_stats.dropped,
        final_stats.ipc_errors,
        node.slow_consumer
            + native.slow_consumer
            + raw.slow_consumer
            + paced.slow_consumer
            + paced_raw.slow_consumer
            + scaling.iter().map(|s| s.2.slow_consumer).sum::<u64>()
    );
    if let Some(Ok((_, v))) = &pm2 {
        println!(
            "pm2 {v}: `pm2 start worker.js -i {NODE_WORKERS}` (cluster mode), subscriber `launchBus`"
        );
    }
    stopped
}

fn machine() -> String {
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
    format!(
        "date: {}\nmachine: {cores} cores ({cpu}), Linux {kernel}; node {}; {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command_line("node", &["--version"]),
        command_line("nats-server", &["--version"]),
    )
}

// ---------------------------------------------------------------------------------------------
// Printing.

struct Row {
    cells: [String; 8],
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
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
        if i > 0 && (s.len() - i) % 3 == 0 {
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
                format!("{c:.2} s ({:.1} us/msg)", c * 1e6 / m.received as f64)
            }
            Some(c) => format!("{c:.2} s"),
            None => "-".into(),
        };
        Row {
            cells: [
                case.to_string(),
                fmt_rate(m.rate()),
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
            ],
        }
    }
}

fn print_aligned(header: &[&str], rows: &[Vec<String>], right: &[bool]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        // A note row (all cells after the second empty) does not widen the columns.
        if r.iter().skip(2).all(|c| c.is_empty()) {
            continue;
        }
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        let note = cells.iter().skip(2).all(|c| c.is_empty());
        for (i, c) in cells.iter().enumerate() {
            if note && i >= 2 {
                break;
            }
            if i > 0 {
                s.push_str(" | ");
            }
            let pad = width[i].saturating_sub(c.chars().count());
            if right[i] && !note {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if !(note && i == 1) {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        println!("{}", s.trim_end());
    };
    let h: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    line(&h);
    println!(
        "{}",
        width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-")
    );
    for r in rows {
        line(r);
    }
}

fn print_table(rows: &[Row]) {
    print_aligned(
        &[
            "case",
            "msgs/s",
            "ratio",
            "loss",
            "p50",
            "p99",
            "agent RSS peak / after",
            "agent CPU",
        ],
        &rows.iter().map(|r| r.cells.to_vec()).collect::<Vec<_>>(),
        &[false, true, true, false, true, true, true, false],
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
