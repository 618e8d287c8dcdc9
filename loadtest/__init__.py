"""The before/after experiment (``make experiment``) around Locust, and its report; the load
clients it shares with the benchmarks are in ``harness/``."""
