"""heavyapp: a CPU-bound Flask service, served by ``gunicorn -c gunicorn_conf.py heavyapp:app``."""

from heavyapp.app import create_app

app = create_app()

__all__ = ["app", "create_app"]
