"""One process per run directory: an exclusive ``flock`` on ``RUN/.lock``, held while the run trains.

The operating system drops the lock when the process ends, however it ends (a kill included), so a stale lock
never blocks a resume. The file holds the holder's pid, for the message a second process gets. Where ``fcntl`` is
missing (Windows) runs are not locked.
"""
from __future__ import annotations

import os

from ..config import ConfigError

LOCK_FILE = ".lock"


class RunLocked(ConfigError):
    """Another process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            run_dir = os.path.dirname(self.path)
            raise RunLocked(f"run directory {run_dir} is in use by another process (pid {holder}): wait for it to "
                            f"finish (or stop it), or pick another --name") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
