"""Why a worker left (or, for ``EXCEPTION``, why the crash journal has a line while it lives).

One enum for the master's log, the roster, the journal, metrics labels and heavyctl: each cause
knows whether it was planned (a reload, a scale-down, a recycle, a stop: logged as "exited", no
journal entry, no backoff) and what an operator should check when it was not.
"""

from __future__ import annotations

from enum import StrEnum


class ExitCause(StrEnum):
    RELOAD = "reload"
    SCALE_DOWN = "scale-down"
    RECYCLE = "recycle"
    STOPPED = "stopped"
    TIMEOUT = "timeout"
    FATAL_SIGNAL = "fatal-signal"
    KILLED = "killed"
    EXIT = "exit"
    EXCEPTION = "exception"  # a bug in a view, answered 500: journalled, the worker lives

    @property
    def planned(self) -> bool:
        return self in _PLANNED

    @property
    def hint(self) -> str:
        """What to look at after this crash (empty for planned exits)."""
        return _HINTS.get(self, "")


_PLANNED = frozenset({ExitCause.RELOAD, ExitCause.SCALE_DOWN, ExitCause.RECYCLE, ExitCause.STOPPED})
_HINTS = {
    ExitCause.KILLED: "SIGKILL comes from the kernel's OOM killer (check dmesg and memory limits) "
    "or from an operator",
    ExitCause.TIMEOUT: "the request ran past Gunicorn's timeout; its stack is logged above",
    ExitCause.FATAL_SIGNAL: "a crash in C code or the interpreter; the traceback follows",
    ExitCause.EXIT: "the process called exit with a non-zero code",
}
