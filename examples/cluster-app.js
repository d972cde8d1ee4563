// An ordinary pm2-style cluster app: every instance reports to the bus once a second and
// answers messages sent to it. Run it with `-i 4`; nothing here knows about Flotilla.
process.on('SIGINT', () => {
  console.log(`instance ${process.env.NODE_APP_INSTANCE} stopping`);
  process.exit(0);
});
const instance = Number(process.env.NODE_APP_INSTANCE || 0);
let n = 0;
console.log(`instance ${instance} up (pid ${process.pid}, pm_id ${process.env.pm_id})`);
setInterval(() => {
  n += 1;
  process.send({ type: 'process:msg', data: { instance, n, rss: process.memoryUsage().rss } });
}, 1000);
process.on('message', (msg) => {
  console.log(`instance ${instance} got ${JSON.stringify(msg)}`);
  process.send({ type: 'app:pong', data: { instance, got: msg } });
});
