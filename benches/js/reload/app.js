'use strict';
const http = require('http');
http.createServer((req, res) => res.end('ok\n')).listen(Number(process.env.PORT));
