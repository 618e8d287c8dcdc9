"""The Gunicorn side of the kit. Its top level is what a user touches:

- ``heavy.py``: ``HeavyWorker``, the worker class (``worker_class = "workers.heavy.HeavyWorker"``);
- ``settings.py``: every kit setting, declared once (``docs/configuration.md`` is made from it);
- ``crashes.py``: the crash journal and the ``on_crash`` hooks;
- ``flask_ext.py``: ``init_app(app)``, the kit's Flask side (worker headers, JSON errors,
  ``/metrics``, ``/readyz``);
- ``ctl.py``: ``heavyctl``;
- ``gunicorn_internals.py``: every use of Gunicorn beyond its documented hooks and settings.

Below it, by where the code runs: ``master/`` (the server hooks and the master's state),
``gates/`` (what a connection passes in a worker before the app runs), ``shared/`` (what passes
between the master and its workers).
"""
