'use strict';
if (process.env.BENCH_MARK_DIR) require('fs').writeFileSync(process.env.BENCH_MARK_DIR + '/' + process.pid, '');
const keep = setInterval(() => {}, 1 << 30);
process.on('SIGINT', () => { clearInterval(keep); process.exit(0); });
