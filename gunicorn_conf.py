"""Gunicorn configuration for heavyapp: one sync worker per usable CPU, and a server that explains
itself. Run it as ``gunicorn -c gunicorn_conf.py heavyapp:app``.

Every value comes from the kit's settings (``workers/settings.py``; ``docs/configuration.md``
lists them), read from the environment once and checked before anything starts. Gunicorn's own
conventions hold: ``WEB_CONCURRENCY`` sets the worker count, ``PORT`` the port, and
``GUNICORN_CMD_ARGS`` or command-line flags override anything set here. The effective
configuration is logged once, as one line, when the master starts.
"""

import os

from workers.master import hooks
from workers.master.sizing import cpu_budget, worker_count
from workers.settings import Settings, SettingsError

try:
    kit = Settings.from_env()
except SettingsError as exc:
    raise SystemExit(f"heavyapp: refusing to start: {exc}") from None

# Loopback unless told otherwise (HOST=0.0.0.0 in the container): a laptop never exposes it.
bind = [kit.bind_address]
workers = worker_count(kit, cpu_budget())
timeout = kit.timeout
graceful_timeout = kit.graceful_timeout
max_requests = kit.max_requests
max_requests_jitter = kit.max_requests_jitter
# HEAVYAPP_PRELOAD=1: the app and its model load once in the master; the workers share the pages.
preload_app = kit.preload_app

worker_class = "workers.heavy.HeavyWorker"
proc_name = "heavyapp"
logger_class = "workers.shared.logs.HeavyLogger"

# Heartbeat files on a RAM disk: a slow or read-only disk must not make healthy workers look hung.
if os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"

# One control socket per server (not Gunicorn's one-per-user default), found by heavyctl too.
control_socket = str(kit.run_dir() / "gunicorn.ctl")

accesslog = "-"  # stdout, one line per request, with pid and worker id (workers/shared/logs.py)
errorlog = "-"  # stderr
loglevel = kit.log_level
access_log_format = '%(h)s "%(r)s" %(s)s %(b)sB %(M)sms'

# Request size limits: a CPU-heavy service has no use for long URLs or many headers.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

on_starting = hooks.on_starting
when_ready = hooks.when_ready
on_reload = hooks.on_reload
pre_fork = hooks.pre_fork
post_fork = hooks.post_fork
child_exit = hooks.child_exit
nworkers_changed = hooks.nworkers_changed
on_exit = hooks.on_exit
