const http = require('http');
http.createServer((req, res) => res.end('x')).listen(3999);
