
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
