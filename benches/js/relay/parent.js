
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
