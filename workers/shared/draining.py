"""Is this worker's master draining? One file in the run directory, named by the master's pid.

The master writes it when a graceful stop begins and removes it when the stop ends; a worker
asks about its own parent (``os.getppid()``), so during a USR2 upgrade, where two masters share
one run directory, the old master's drain never turns the new master's workers unready.
Asked only by ``/readyz`` (one ``stat``), so the request path pays nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


def flag(run_dir: Path, master_pid: int) -> Path:
    return run_dir / f"draining-{master_pid}"


def announce(run_dir: Path, master_pid: int) -> None:
    flag(run_dir, master_pid).touch()


def withdraw(run_dir: Path, master_pid: int) -> None:
    flag(run_dir, master_pid).unlink(missing_ok=True)


def clear(run_dir: Path) -> None:
    """Remove every flag: for a fresh master, which holds the run directory's lock, so any flag
    there was left by a master that died mid-drain (its pid may come back)."""
    for stale in run_dir.glob("draining-*"):
        stale.unlink(missing_ok=True)


def draining(run_dir: Path) -> bool:
    """In a worker: has its master begun a graceful stop?"""
    return flag(run_dir, os.getppid()).exists()
