"""Each worker's budget of native threads: usable CPUs ÷ workers, at least 1.

numpy's OpenBLAS (and OpenMP, MKL, ...) start one thread per core of the host in every process
that loads them: W workers on W cores then run WxW busy threads, and measured here two workers
with two threads each multiply 400x400 matrices 3.7 times slower than with one each. So the
master sizes each worker's pools to its share of the CPUs, twice over:

- the usual variables (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ...), exported by the
  master before the app is loaded, so a library loaded afterwards (in a worker, or in the
  master under ``preload_app``) starts with that many threads — they are read only at load;
- ``threadpoolctl`` in each worker just after the fork, for a library that was loaded before
  the variables were set (by the config file, say) and so runs a pool of the host's size.

The kit owns these variables: a value set by hand is replaced (with a warning naming it), and
``HEAVYAPP_THREADS_PER_WORKER`` is the one way to choose another size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from workers.settings import NATIVE_THREADS, native_threads

#: Read when a native library loads: OpenMP, OpenBLAS, MKL, Apple Accelerate, numexpr.
VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


@dataclass(frozen=True)
class ThreadBudget:
    threads: int  # native threads per worker
    usable: int  # usable CPUs of the master (workers/master/sizing.py)
    workers: int
    chosen: bool  # HEAVYAPP_THREADS_PER_WORKER set it, not the division

    @classmethod
    def of(cls, usable: int, workers: int, chosen: int | None) -> ThreadBudget:
        """``chosen`` if given; else each worker's share of the usable CPUs, at least 1."""
        share = max(1, usable // max(1, workers))
        return cls(chosen or share, usable, workers, chosen is not None)

    def describe(self) -> str:
        """For the start log and heavyctl, e.g. ``1 (2 usable CPUs / 2 workers)``."""
        if self.chosen:
            return f"{self.threads} (HEAVYAPP_THREADS_PER_WORKER; {self.usable} usable CPUs)"
        plural = "s" if self.workers != 1 else ""
        return f"{self.threads} ({self.usable} usable CPUs / {self.workers} worker{plural})"


def export_budget(
    budget: ThreadBudget,
    env: MutableMapping[str, str] = os.environ,
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """Set every variable to the budget, for the libraries loaded from now on; return (and
    ``warn`` about) the operator's own values it replaced."""
    ours = env.get(NATIVE_THREADS)  # the kit's last value: a reload's are not the operator's
    replaced = []
    for name in VARIABLES:
        old = env.get(name)
        if old is not None and old not in (ours, str(budget.threads)):
            replaced.append(f"{name}={old}")
        env[name] = str(budget.threads)
    env[NATIVE_THREADS] = str(budget.threads)
    if replaced and warn:
        warn(
            f"native threads: replaced {', '.join(replaced)} by {budget.threads}; "
            "set HEAVYAPP_THREADS_PER_WORKER to choose the size of every pool"
        )
    return replaced


def limit_loaded_pools() -> list[str]:
    """In a worker: cap the pools of native libraries already loaded (under ``preload_app``)
    at the exported budget; the pools changed, as ``openblas 2->1``."""
    limit = native_threads()
    if limit is None:
        return []
    from threadpoolctl import ThreadpoolController  # scans the loaded libraries: only here

    controller = ThreadpoolController()
    changed = [
        f"{lib.internal_api} {lib.num_threads}->{limit}"
        for lib in controller.lib_controllers
        if lib.num_threads != limit
    ]
    if changed:
        controller.limit(limits=limit)
    return changed
