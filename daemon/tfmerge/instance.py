"""One daemon per state folder, enforced with flock(2) on ``<state_dir>/tfmerge.lock``.

flock ties the lock to an open file description, so the kernel drops it when the holder dies,
however it dies: a lock file left behind by a killed daemon never blocks the next start, and the
file is never deleted (unlinking a lock file lets two processes each lock a different inode).
The descriptor is opened O_CLOEXEC so that no child (the TensorFlow worker, a hook) inherits it
and keeps the folder locked after the daemon is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["LOCK_FILE_NAME", "AlreadyRunning", "InstanceLock"]

LOCK_FILE_NAME: Final = "tfmerge.lock"
STATE_DIR_MODE: Final = 0o750
_LOCK_FILE_MODE: Final = 0o640
# A pid is at most 7 digits on Linux (pid_max <= 2**22); anything longer is not ours.
_PID_TEXT_MAX: Final = 32


class AlreadyRunning(Exception):
    """Another process holds the state folder's lock."""

    def __init__(self, lock_path: Path, holder_pid: int | None) -> None:
        self.lock_path = lock_path
        self.holder_pid = holder_pid
        holder = f"pid {holder_pid}" if holder_pid is not None else "a process of unknown pid"
        super().__init__(
            f"another tfmerge daemon ({holder}) already uses this state folder: "
            f"{lock_path} is locked"
        )


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote, or None while it has not written it yet or if it is garbage."""
    try:
        text = os.pread(fd, _PID_TEXT_MAX, 0)
    except OSError:
        return None
    try:
        pid = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return pid if pid > 0 else None


class InstanceLock:
    """The exclusive lock on a state folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.lock_path = state_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting; AlreadyRunning if another process holds it.

        Creates the state folder (mode 0o750, less the umask) if it is missing.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.lock_path} is already held by this InstanceLock")
        self.state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        # No O_TRUNC: the file may belong to a running holder whose pid we are about to report.
        fd = os.open(
            self.lock_path,
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            _LOCK_FILE_MODE,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder_pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.lock_path, holder_pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)  # closing the last descriptor releases the lock
            raise
        self._fd = fd

    def release(self) -> None:
        """Give the lock up; a no-op when it is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Emptied while still locked, so nobody reads our pid as a live holder afterwards. If
        # that fails the pid left behind is harmless: only a locked file names a holder.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
