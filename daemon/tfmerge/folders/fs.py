"""The file-system primitives: every fsync, atomic write, rename into place and lock.

Everything above this module (the state folder, the serving folder, the build's writer)
commits through these few helpers and never touches a raw descriptor for it: one way to
write aside, sync, rename and sync the folder.

``fsync_dir`` accepts EINVAL: some file systems cannot sync a directory, and their data is
as durable as they make it.

Locks: one daemon per state folder, enforced with flock(2) on ``<state_dir>/tfmerge.lock``
(:class:`InstanceLock`), and ``<state_dir>/publish.lock``, which serialises publishes of the
daemon, ``tfmerge build`` and ``tfmerge rollback`` (:func:`publish_lock`). flock ties a lock
to an open file description, so the kernel drops it when the holder dies, however it dies: a
lock file left behind by a killed daemon never blocks the next start, and the file is never
deleted (unlinking a lock file lets two processes each lock a different inode). Descriptors
are opened O_CLOEXEC so that no child (the TensorFlow worker) inherits a lock and keeps the
folder locked after the daemon is gone. No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

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


# --- durable writes ------------------------------------------------------------------


def naming(error: OSError, path: Path) -> OSError:
    """The error, naming path if it names none: a call on a descriptor (write, fsync) names
    no file, and a full or failing disk must be reported with the path it failed on."""
    if error.filename is None:
        error.filename = str(path)
    return error


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (some network and FUSE ones) cannot sync a directory at all.
        if exc.errno != errno.EINVAL:
            raise naming(exc, path) from None
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Replace path with data so a reader sees the old bytes or the new ones, never a mix,
    and only once they are on disk, so they survive a power loss."""
    pending = PendingFile.start(path.parent, f".{path.name}.")
    pending.write(data)
    pending.seal(path)


def write_replace(path: Path, data: bytes | memoryview) -> None:
    """Replace path with data so a reader sees the old bytes or the new ones, never a mix.

    Not synced: for caches whose entries carry their own checksum, where an entry a power loss
    left empty or partly written is only a miss. The folder is created if missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise naming(exc, path) from None
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root, children before parents."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath, name))
        fsync_dir(Path(dirpath))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (Linux writes at most about 2 GiB per call)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + (1 << 30)])


@dataclass
class PendingFile:
    """A file being written under a temporary name (a hard link to it is the same file)."""

    path: Path
    fd: int

    @classmethod
    def start(cls, folder: Path, prefix: str) -> PendingFile:
        """An empty, world-readable file in folder (created if missing), named prefix…tmp."""
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        os.fchmod(fd, 0o644)
        return cls(Path(tmp), fd)

    def write(self, data: bytes | memoryview) -> None:
        """All of data, at the file's current offset; the file is discarded on failure."""
        try:
            write_all(self.fd, data)
        except OSError as exc:
            self.discard()
            raise naming(exc, self.path) from None
        except BaseException:
            self.discard()
            raise

    def seal(self, target: Path) -> None:
        """Wait for the bytes on disk, then name the file target; discard it on failure.

        A file of that name already there is replaced.
        """
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.discard()
            raise naming(exc, self.path) from None
        except BaseException:
            self.discard()
            raise
        os.close(self.fd)
        self.fd = -1
        try:
            os.replace(self.path, target)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


def lock_folder(path: Path) -> int:
    """Lock a folder (flock on a descriptor of it) for as long as the descriptor is open.

    Raises BlockingIOError when another open descriptor holds it. The lock follows the folder
    through a rename, and the kernel drops it when its holder dies, however it dies.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def publish_lock(state_dir: Path) -> Iterator[None]:
    """Serialise publishes of the daemon and of ``tfmerge rollback`` / ``tfmerge build``."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(state_dir / "publish.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
