"""Is a file in ``frozen_dir`` open for writing? Asked of the kernel, for the debouncer.

Linux grants a read lease (``fcntl(F_SETLEASE, F_RDLCK)``) only while no process has the file
open for writing. The probe opens the file read-only, takes a lease and gives it back at once
(about 22 µs), and answers ``True`` (someone has it open for writing: ``EAGAIN``), ``False``
(no one has) or ``None`` (the kernel cannot tell: ``EACCES`` on a file of another user
without ``CAP_LEASE``, ``EINVAL`` on NFS, CIFS or FUSE). So the supervisor decides "still being
written" as the worker does (:mod:`tfmerge.snapshot`), not from pairs of events: an attribute
change after the last close no longer looks like a write in progress, and a writer that has
not written yet no longer looks like a finished file.

The file is opened read-only, non-blocking (a FIFO does not wait for a writer), not through a
link in its last component, and only a regular file is leased; anything else is ``None`` (the
build refuses it anyway). No byte is read, so the probe does not walk the path one component
at a time as the build's reads do (:class:`~tfmerge.inputs.FrozenDir`): that costs a dozen
system calls more, and a folder swapped for a link could at worst make the probe lease a file
elsewhere for a few microseconds. Opening and closing read-only raises no watched event.

A writer that opens the file while the lease is held waits until it is given back, a few
microseconds. The kernel signals the break with SIGIO, whose default action ends the process:
the probe answers ``None`` rather than take a lease while SIGIO is not ignored
(:func:`tfmerge.snapshot.ignore_lease_breaks`, called by the daemon at start).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from pathlib import Path
from typing import Final

from tfmerge.logs import get_logger

_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class LeaseProbe:
    """The kernel's answer for one file; says once per probe why it cannot answer."""

    def __init__(self) -> None:
        self._told = False

    def __call__(self, frozen_dir: Path, relpath: str) -> bool | None:
        if signal.getsignal(signal.SIGIO) in (signal.SIG_DFL, None):
            self._unavailable(relpath, "SIGIO", "a lease break would end the daemon")
            return None
        try:
            fd = os.open(frozen_dir / relpath, _FLAGS)
        except OSError:
            return None  # gone, a link, unreadable: stat and the build see to it
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return self._leased(fd, relpath)
        finally:
            os.close(fd)

    def _leased(self, fd: int, relpath: str) -> bool | None:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return True
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self._unavailable(relpath, code, exc.strerror or code)
            return None
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError as exc:
            # EAGAIN: a writer broke the lease already; it is gone either way.
            if exc.errno != errno.EAGAIN:
                raise
        return False

    def _unavailable(self, relpath: str, code: str, reason: str) -> None:
        if self._told:
            return
        self._told = True
        get_logger().warning(
            "lease_probe_unavailable",
            file=relpath,
            errno=code,
            reason=f"{reason}; upload events tell when the file is written",
        )
