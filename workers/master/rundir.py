"""The master's run directory: created private, refused if planted, locked for the master's life.

One directory per server (see ``Settings.run_dir``) holds its control socket, worker state,
metrics and crash journal. The default lives in a shared ``/tmp``, so a directory or symlink
put there by someone else would get our control socket and have us delete files in it.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from workers.settings import SettingsError


def claim(path: Path, *, private: bool) -> Path:
    """Create ``path``, or refuse one another user could have planted; make the default
    ``private`` (0700), while a directory the operator named keeps the mode they gave it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            raise SettingsError(
                f"run directory {path} is a symlink or not owned by uid {os.geteuid()}"
            )
        if private:
            path.chmod(0o700)
    except OSError as exc:
        raise SettingsError(f"run directory {path}: {exc.strerror or exc}") from None
    return path


def lock(where: Path) -> int:
    """Hold ``master.lock`` (the returned fd, kept open) for the master's life: one master per
    run directory; the lock names its holder's pid for the refusal message."""
    fd = os.open(where / "master.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SettingsError(f"another master (pid {holder}) uses run directory {where}") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
