"""What counts as an input in ``frozen_dir``, and the one way an input is opened.

Pure rules and one open; no TensorFlow. The watcher, the resolution of models and every
reader of a graph file (the build, ``tfmerge check``) go through here; ``tfmerge.snapshot``
then takes the bytes of what was opened.

An input is opened once per read, relative to a descriptor of ``frozen_dir``, one path
component at a time and never through a symbolic link, and what was opened is checked on its
descriptor: a regular file on ``frozen_dir``'s file system. So a path swapped for a link or a
FIFO between the resolution (in the supervisor) and the read (in the worker) is refused, never
followed, and never blocks. A symbolic link is never an input, wherever it points: one that
leaves ``frozen_dir`` is ``path_escapes``, any other is ``not_a_file``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from tfmerge.models import ModelRejected

#: Suffixes of frozen graphs (binary GraphDef and its text form).
MODEL_SUFFIXES: Final = frozenset({".pb", ".pbtxt"})
#: ``NAME.toml`` next to ``NAME.pb`` declares that model.
SIDECAR_SUFFIX: Final = ".toml"
#: ``NAME.pb.sha256`` next to ``NAME.pb`` declares its digest (sha256sum's output).
DIGEST_SUFFIX: Final = ".sha256"
INPUT_SUFFIXES: Final = MODEL_SUFFIXES | {SIDECAR_SUFFIX, DIGEST_SUFFIX}

_DIRECTORY_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO that was swapped in must not wait for a writer.
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def is_input_path(path: str) -> bool:
    """Whether ``path`` (relative to the watched root) can be an input of a build.

    Inputs end in ``.pb``, ``.pbtxt`` or ``.toml`` (case matters, as in a shell glob), or are
    the digest file of a graph (``NAME.pb.sha256``). Any path component starting with ``.``
    disqualifies the path: that covers dotfiles, hidden folders and rsync's
    ``.<name>.<random>`` temporaries. Upload leftovers (``*.part``, ``*.filepart``, ``*.tmp``,
    ``*.swp``, ``name~``) end in something else, so the suffix rule already turns them away.
    Absolute paths are not relative to the root and are refused too.
    """
    if not path or path.startswith("/"):
        return False
    parts = path.split("/")
    if any(not part or part.startswith(".") for part in parts):
        return False
    name = PurePosixPath(parts[-1])
    if name.suffix == DIGEST_SUFFIX:
        return PurePosixPath(name.stem).suffix in MODEL_SUFFIXES
    return name.suffix in INPUT_SUFFIXES


def size_problem(size: int, limit: int) -> tuple[str, str] | None:
    """The rejection code and reason for an input of this size, or None when it may be read."""
    if size == 0:
        return "empty_file", "the file is empty (an upload that has not started?)"
    if size > limit:
        return "too_large", f"{size} bytes is over max_model_bytes = {limit}"
    return None


@dataclass(frozen=True)
class Identity:
    """What says a file is still the one that was opened: same inode, same size and times."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Opened:
    """An input opened for one read: its descriptor and its identity when it was opened.

    ``current`` gives the identity of what the path names now, without following links (None:
    the path no longer names a regular file), to tell a file replaced while it was read.
    """

    fd: int
    name: str
    identity: Identity
    frozen: FrozenDir | None = None

    def current(self) -> Identity | None:
        if self.frozen is None:
            try:
                return Identity.of(os.stat(self.name))
            except OSError:
                return None
        try:
            st = self.frozen.lstat(self.name)
        except ModelRejected:
            return None
        return Identity.of(st) if stat.S_ISREG(st.st_mode) else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FrozenDir:
    """A descriptor of ``frozen_dir``: every input is opened relative to it, once per read.

    Thread-safe (openat on a shared descriptor). Closed with ``close`` or as a context manager.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = -1
        self._error: OSError | None = None
        self.dev = -1
        self.mount: int | None = None
        try:
            self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.dev = os.fstat(self._fd).st_dev
        except OSError as exc:
            self._error = exc
        else:
            self.mount = _mount_id(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FrozenDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def lstat(self, relpath: str) -> os.stat_result:
        """The status of relpath's last component, no link followed on the way. ModelRejected."""
        parent, name = self._parent(relpath)
        try:
            return os.stat(name, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            raise self._refusal(relpath, exc) from exc
        finally:
            self._close_parent(parent)

    def check(self, relpath: str, max_bytes: int | None) -> os.stat_result:
        """Refuse what open would refuse, without opening it (the supervisor's early check)."""
        st = self.lstat(relpath)
        self._check_status(relpath, st, max_bytes)
        return st

    def open(self, relpath: str, max_bytes: int | None) -> Opened:
        """relpath opened read-only, checked on its descriptor. Raises ModelRejected.

        With max_bytes, an empty file or one larger is refused (a graph); without, the caller
        checks the size (a sidecar or a digest file, with limits of their own).

        Checked with lstat before the open, so that a special file is not even opened when it
        was there all along; checked again with fstat after it, which is what counts.
        """
        parent, name = self._parent(relpath)
        try:
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                self._check_status(relpath, st, max_bytes)
                fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
            except OSError as exc:
                raise self._refusal(relpath, exc) from exc
        finally:
            self._close_parent(parent)
        try:
            st = os.fstat(fd)
            self._check_status(relpath, st, max_bytes)
            self._check_mount(fd, st)
        except OSError as exc:
            os.close(fd)
            raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        return Opened(fd, relpath, Identity.of(st), self)

    def _check_status(self, relpath: str, st: os.stat_result, max_bytes: int | None) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise self._symlink_refusal(relpath)
        _require_regular(st, max_bytes)

    def _check_mount(self, fd: int, st: os.stat_result) -> None:
        """Refuse a file of another mount than frozen_dir's (one mounted inside it).

        Compared by mount id where /proc tells it: a file's st_dev is not its mount's on an
        overlayfs whose layers are on several file systems, nor in a btrfs subvolume.
        """
        mount = _mount_id(fd) if self.mount is not None else None
        same = mount == self.mount if mount is not None else st.st_dev == self.dev
        if not same:
            raise ModelRejected(
                "path_escapes", "is on another file system than frozen_dir (a mount inside it)"
            )

    def _parent(self, relpath: str) -> tuple[int, str]:
        """A descriptor of relpath's folder (the caller closes it unless it is the root's)."""
        if self._fd < 0:
            error = self._error
            reason = error.strerror if error is not None and error.strerror else "closed"
            code = "missing_file" if isinstance(error, FileNotFoundError) else "unreadable"
            raise ModelRejected(code, f"cannot open frozen_dir: {reason}")
        parts = relpath.split("/")
        if relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ModelRejected("path_escapes", f"{relpath!r} leads outside frozen_dir (via ..)")
        current = self._fd
        for index, part in enumerate(parts[:-1]):
            try:
                following = os.open(part, _DIRECTORY_FLAGS, dir_fd=current)
            except OSError as exc:
                raise self._refusal("/".join(parts[: index + 1]), exc) from exc
            finally:
                self._close_parent(current)
            current = following
        return current, parts[-1]

    def _close_parent(self, fd: int) -> None:
        if fd != self._fd:
            os.close(fd)

    def _refusal(self, relpath: str, exc: OSError) -> ModelRejected:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # O_NOFOLLOW met a link (ELOOP for the file, ENOTDIR for a folder), or a component
            # is a file: say which, and never follow it.
            try:
                st = self.lstat(relpath)
            except ModelRejected:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                return self._symlink_refusal(relpath)
            return ModelRejected("not_a_file", f"{relpath} is not a folder")
        if exc.errno == errno.ENOENT:
            return ModelRejected("missing_file", "no such file in frozen_dir")
        return ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}")

    def _symlink_refusal(self, relpath: str) -> ModelRejected:
        """A link is never followed; the reason says where it points, for the person."""
        link = self.root / relpath
        try:
            target = Path(os.path.realpath(link))
        except (OSError, ValueError):
            target = link
        if not target.is_relative_to(self.root):
            return ModelRejected(
                "path_escapes",
                f"is a symbolic link to {target}, outside frozen_dir {self.root}; "
                "links are never followed",
            )
        return ModelRejected(
            "not_a_file",
            "is a symbolic link; links are never followed, even inside frozen_dir: "
            "upload the file itself",
        )


def open_path(path: Path, max_bytes: int) -> Opened:
    """A file a person named (``tfmerge inspect``), opened once: a link is followed here, a
    FIFO does not block, and the descriptor must be a regular file. Raises ModelRejected."""
    try:
        fd = os.open(path, _FILE_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        _require_regular(st, max_bytes)
    except OSError as exc:
        os.close(fd)
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    except BaseException:
        os.close(fd)
        raise
    return Opened(fd, str(path), Identity.of(st))


def open_kept(path: Path, max_bytes: int) -> int:
    """A read-only descriptor of a kept copy in the state folder (tfmerge's own file).

    Raises ModelRejected. The size is checked on the opened file, so what is read is what
    was checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        os.close(fd)
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    problem = size_problem(size, max_bytes)
    if problem is not None:
        os.close(fd)
        raise ModelRejected(*problem)
    return fd


def _mount_id(fd: int) -> int | None:
    """The id of the mount an open file is on (``mnt_id`` in /proc/self/fdinfo), or None."""
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    return None


def _require_regular(st: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ModelRejected("not_a_file", f"is not a regular file ({_kind(st.st_mode)})")
    problem = None if max_bytes is None else size_problem(st.st_size, max_bytes)
    if problem is not None:
        raise ModelRejected(*problem)


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
        stat.S_ISLNK: "a symbolic link",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")
