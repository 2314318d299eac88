"""Taking an input's bytes only while nobody writes it: a read lease, then its identity.

Every byte tfmerge takes from ``frozen_dir`` (a graph copied into the state folder, a graph
read by ``tfmerge check``, a sidecar, a digest file) is taken here, from a descriptor that
:mod:`tfmerge.inputs` opened. No TensorFlow.

Two checks, the first decided by the kernel:

* A read lease (``F_SETLEASE``, ``F_RDLCK``) is granted only while no process has the file
  open for writing, and the kernel breaks it as soon as one opens it for writing or truncates
  it. It is held from before the first byte to after the last, and looked at before every
  chunk and at the end. So an upload in progress (``scp`` writes in place and cuts the file to
  length only at the end) is refused as ``still_being_written``, whether it is writing, stalled
  or stopped, and a writer that arrives during the copy discards it. A writer's open waits
  until the lease is released: at most one chunk's copy.
* The file's identity (inode, size, mtime, ctime) on its descriptor before and after, and what
  its path names after: a file renamed over it, touched, or changed where no lease could be
  taken is refused as ``changed_while_read``.

Where no lease can be taken (``EACCES``: a file of another user without ``CAP_LEASE``;
``EINVAL``: NFS, CIFS, FUSE; ``ENOLCK``) only the identity check holds, and the caller is told
why. A lease break signals SIGIO to the holder, and SIGIO's default action ends the process:
:func:`ignore_lease_breaks` must run in the main thread at start, and the lease's owner is
cleared right after it is taken, so that no signal is sent at all.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tfmerge.inputs import Identity, Opened
from tfmerge.logs import get_logger
from tfmerge.models import ModelRejected

#: A writer waits for the lease's release at most about one chunk's copy.
CHUNK: Final = 16 << 20


def ignore_lease_breaks() -> None:
    """Keep a lease break from ending the process: call it in the main thread at start.

    Elsewhere it does nothing (only the main thread may set a signal's action), and a lease
    taken later in another thread raises instead of risking the process.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def _breaks_are_harmless() -> None:
    if signal.getsignal(signal.SIGIO) not in (signal.SIG_DFL, None):
        return
    ignore_lease_breaks()
    if signal.getsignal(signal.SIGIO) in (signal.SIG_DFL, None):
        raise RuntimeError(
            "SIGIO would end this process on a lease break: call "
            "tfmerge.snapshot.ignore_lease_breaks() in the main thread at start"
        )


@dataclass(frozen=True)
class Taken:
    """What a read took: how many bytes, and why no lease guarded it (None: one did)."""

    size: int
    lease_problem: str | None = None


class _Lease:
    """A read lease on an opened input, held for one read; a no-op where none can be taken."""

    def __init__(self, opened: Opened) -> None:
        self._fd = opened.fd
        self.problem: str | None = None
        _breaks_are_harmless()
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                raise ModelRejected(
                    "still_being_written",
                    "another process has the file open for writing (an upload in progress?)",
                ) from exc
            self.problem = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return
        # No signal for this file at all: the break is seen by looking at the lease.
        fcntl.fcntl(self._fd, fcntl.F_SETOWN, 0)

    @property
    def held(self) -> bool:
        return self.problem is None

    def check(self) -> None:
        if self.held and fcntl.fcntl(self._fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            raise ModelRejected(
                "still_being_written", "a process opened the file for writing while it was read"
            )

    def release(self) -> None:
        if not self.held:
            return
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError as exc:
            # EAGAIN: the lease is gone already (broken, and the break time ran out).
            if exc.errno != errno.EAGAIN:
                raise


def _take(opened: Opened, transfer: Callable[[int], int], limit: int) -> Taken:
    """Call transfer(count) until it returns 0 or limit bytes are moved, under a lease."""
    lease = _Lease(opened)
    try:
        total = 0
        while total < limit:
            lease.check()
            moved = transfer(min(CHUNK, limit - total))
            if not moved:
                break
            total += moved
        lease.check()
        _check_identity(opened, total)
    finally:
        lease.release()
    return Taken(total, lease.problem)


def copy(opened: Opened, target: int) -> Taken:
    """The whole input into target (by the kernel), or ModelRejected if it was not at rest."""
    source = opened.fd
    state = {"kernel_copy": True}

    def transfer(count: int) -> int:
        if state["kernel_copy"]:
            try:
                return os.copy_file_range(source, target, count)
            except OSError as exc:
                # Two file systems copy_file_range cannot bridge: sendfile can, from there.
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                state["kernel_copy"] = False
        return os.sendfile(target, source, None, count)

    # One byte more than its size: a file that grew (where no lease is held) shows as changed.
    return _take(opened, transfer, opened.identity.size + 1)


def read_into(opened: Opened, buffer: memoryview) -> Taken:
    """The input's bytes into buffer (at least its size long), or ModelRejected."""
    done = 0

    def transfer(count: int) -> int:
        nonlocal done
        moved = os.readv(opened.fd, [buffer[done : done + count]])
        done += moved
        return moved

    return _take(opened, transfer, opened.identity.size)


def read_bounded(opened: Opened, limit: int, code: str, setting: str) -> bytes:
    """A small input (a sidecar, a digest file) whole, never more than limit bytes of it.

    A larger file is refused with ``code`` from its size alone, before a byte is read.
    """
    size = opened.identity.size
    if size > limit:
        raise ModelRejected(code, f"{size} bytes is over {setting} = {limit}", size=size)
    chunks: list[bytes] = []

    def transfer(count: int) -> int:
        chunk = os.read(opened.fd, count)
        chunks.append(chunk)
        return len(chunk)

    _take(opened, transfer, size)
    return b"".join(chunks)


def _check_identity(opened: Opened, taken: int) -> None:
    before = opened.identity
    after = Identity.of(os.fstat(opened.fd))
    now = opened.current()
    if now is None:
        problem: str | None = "its path names no regular file now (removed, or a link)"
    elif (now.dev, now.ino) != (before.dev, before.ino):
        problem = "another file replaced it at its path (a rename over it)"
    else:
        problem = _change(before, after, taken) or _change(before, now, None)
    if problem is not None:
        raise ModelRejected("changed_while_read", f"the file changed while it was read: {problem}")


def _change(before: Identity, after: Identity, taken: int | None) -> str | None:
    if after.size != before.size or (taken is not None and taken != before.size):
        read = "" if taken is None else f", {taken} read"
        return f"size {before.size} -> {after.size}{read}"
    if after.mtime_ns != before.mtime_ns:
        return "it was modified (mtime)"
    if after.ctime_ns != before.ctime_ns:
        return "its status changed (ctime: a touch, chmod or link)"
    return None


#: Why no read lease could be taken, said once per process (a setting, not an input).
_LEASE_WARNED: set[str] = set()


def warn_without_lease(relpath: str, taken: Taken) -> None:
    """Say once per process that inputs are read without a lease, and why."""
    problem = taken.lease_problem
    if problem is None or problem in _LEASE_WARNED:
        return
    _LEASE_WARNED.add(problem)
    get_logger().warning(
        "input_lease_unavailable",
        file=relpath,
        errno=problem,
        reason="no read lease on inputs: a file still open for writing is told only by its "
        "size and times (EACCES: give the service CAP_LEASE; EINVAL: the file system has no "
        "leases)",
    )
