"""Gunicorn configuration for heavyapp: one sync worker per usable CPU, and a server that explains
itself. Run it as ``gunicorn -c gunicorn_conf.py heavyapp:app``.

Everything is read from the environment (the table in README.md). Gunicorn's own conventions
hold: ``WEB_CONCURRENCY`` sets the worker count, ``PORT`` the port, and ``GUNICORN_CMD_ARGS``
or command-line flags override anything set here. The effective configuration is logged once,
as one line, when the master starts.
"""

import os

from workers.gates.headwait import head_timeout
from workers.heavy import max_rss_mb
from workers.master import hooks as lifecycle
from workers.master.roster import Backoff
from workers.master.sizing import cpu_budget, worker_count
from workers.settings import SettingsError, bind_address, positive_int, run_dir
from workers.shared.jsonlog import log_format

env = os.environ

try:
    # Loopback unless told otherwise (HOST=0.0.0.0 in the container): a laptop never exposes it.
    bind = [bind_address(env)]
    workers = worker_count(env, cpu_budget())
    timeout = positive_int(env, "TIMEOUT", 30)
    graceful_timeout = positive_int(env, "GRACEFUL_TIMEOUT", 30)
    max_requests = positive_int(env, "MAX_REQUESTS", 0, allow_zero=True)
    max_requests_jitter = positive_int(env, "MAX_REQUESTS_JITTER", 0, allow_zero=True)
    log_format(env)  # HEAVYAPP_LOG_FORMAT=json: checked here, applied by workers/logs.py
    max_rss_mb(env)  # checked here, applied by each worker after every request
    head_timeout(env, timeout)  # checked here, applied by each worker to every connection
    lifecycle.ROSTER.backoff = Backoff.from_env(env)
except SettingsError as exc:
    raise SystemExit(f"heavyapp: refusing to start: {exc}") from None

worker_class = "workers.heavy.HeavyWorker"
proc_name = "heavyapp"
logger_class = "workers.shared.logs.HeavyLogger"

# Heartbeat files on a RAM disk: a slow or read-only disk must not make healthy workers look hung.
if os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"

# One control socket per server (not Gunicorn's one-per-user default), found by heavyctl too.
control_socket = str(run_dir(env) / "gunicorn.ctl")

accesslog = "-"  # stdout, one line per request, with pid and worker id (see workers/logs.py)
errorlog = "-"  # stderr
loglevel = env.get("LOG_LEVEL", "info")
access_log_format = '%(h)s "%(r)s" %(s)s %(b)sB %(M)sms'

# Request size limits: a CPU-heavy service has no use for long URLs or many headers.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

on_starting = lifecycle.on_starting
when_ready = lifecycle.when_ready
on_reload = lifecycle.on_reload
pre_fork = lifecycle.pre_fork
post_fork = lifecycle.post_fork
child_exit = lifecycle.child_exit
nworkers_changed = lifecycle.nworkers_changed
on_exit = lifecycle.on_exit
