"""CPU figures shared by the load client, the experiment and the benchmarks, so that each is
computed in one place and all of them divide by the same core count."""

from __future__ import annotations

import contextlib

import psutil

from harness.server import GunicornServer
from workers.master.sizing import cpu_budget


def usable_cores() -> int:
    """The CPUs this process may use (affinity and cgroup quota), as the kit sizes its pool:
    on a container limited to 2 CPUs, ``psutil.cpu_count()`` would say the host's 64."""
    return cpu_budget().usable


def server_cpu_s(server: GunicornServer) -> float:
    """CPU seconds (user + system) used so far by every live process under the server's master.

    The master itself is left out: it serves no request. Recursive, so a peer server whose
    workers sit deeper in its process tree is counted the same way. Read from /proc via psutil.
    """
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in psutil.Process(server.master_pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    return total
