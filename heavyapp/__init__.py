"""heavyapp: a CPU-bound Flask service, served by ``gunicorn -c gunicorn_conf.py heavyapp:app``.

``heavyapp.app`` is built on first access (PEP 562), not at import: importing the package for
its settings or its factory builds no app and no model. Gunicorn and Granian get
``heavyapp:app`` by ``getattr``, so it is built then, once per process that asks; uWSGI reads
the module's dict instead, so give it the factory: ``--module 'heavyapp:create_app()'``.
"""

from __future__ import annotations

from typing import Any

from heavyapp.app import create_app

# The import above bound the factory's module to the name ``app``; the package's ``app`` is the
# Flask app, so that binding goes and ``__getattr__`` answers for it.
globals().pop("app")


def __getattr__(name: str) -> Any:
    if name == "app":
        built = globals()["app"] = create_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "create_app"]
