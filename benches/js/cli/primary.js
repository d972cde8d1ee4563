'use strict';
const cluster = require('cluster');
const W = Number(process.env.BENCH_W);
cluster.setupPrimary({ exec: process.env.BENCH_APP });
let online = 0;
cluster.on('online', () => { if (++online === W) process.stdout.write('ALL_ONLINE\n'); });
cluster.on('exit', () => { if (Object.keys(cluster.workers).length === 0) process.exit(0); });
process.on('SIGTERM', () => {
  for (const w of Object.values(cluster.workers)) w.process.kill('SIGINT');
  setTimeout(() => process.exit(0), 5000).unref();
});
for (let i = 0; i < W; i++) cluster.fork();
