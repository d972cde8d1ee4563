'use strict';
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
