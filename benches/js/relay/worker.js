'use strict';
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
