// pm2's own format, unchanged: Flotilla evaluates it with node.
module.exports = {
  apps: [
    {
      name: 'demo',
      script: '../examples/cluster-app.js',
      instances: 4,
      max_memory_restart: '200M',
      min_uptime: '1s',
      max_restarts: 16,
      kill_timeout: 1600,
      exp_backoff_restart_delay: 100,
      env: { NODE_ENV: 'development' },
      env_production: { NODE_ENV: 'production' },
    },
    {
      name: 'worker',
      namespace: 'jobs',
      script: '../examples/cluster-app.js',
      args: ['--queue', 'emails'],
      autorestart: true,
      stop_exit_codes: [0],
    },
  ],
};
