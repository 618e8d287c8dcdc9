"""A platform without some of Linux's features, simulated for tests/test_degrade.py.

On ``PYTHONPATH`` for a server, this runs at interpreter start, before Gunicorn or the kit import
anything. ``HEAVYAPP_TEST_SHIM`` (comma-separated) says what to take away:

- ``no-constants``: delete ``socket.TCP_DEFER_ACCEPT``, ``socket.TCP_INFO``, ``select.POLLRDHUP``
  (as on macOS);
- ``refuse-timestamps``: listening sockets refuse ``setsockopt(SO_TIMESTAMPNS)`` (as a sandbox
  that filters socket options might), though a fresh socket accepts it.
"""

import errno
import os
import select
import socket

_SHIM = set(filter(None, os.environ.get("HEAVYAPP_TEST_SHIM", "").split(",")))

if "no-constants" in _SHIM:
    for module, name in ((socket, "TCP_DEFER_ACCEPT"), (socket, "TCP_INFO"), (select, "POLLRDHUP")):
        if hasattr(module, name):
            delattr(module, name)

if "refuse-timestamps" in _SHIM:
    _setsockopt = socket.socket.setsockopt

    def setsockopt(self, level, option, *args):
        listening = self.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if level == socket.SOL_SOCKET and option == 35 and listening:
            raise OSError(errno.EPERM, "SO_TIMESTAMPNS refused by the test shim")
        return _setsockopt(self, level, option, *args)

    socket.socket.setsockopt = setsockopt
