"""When the daemon reloads its configuration, and whether the new one may take over.

A SIGHUP asks for a reload at once. An edit of the file asks for one too, once the file has
been quiet for ``[watch] quiet_seconds``: editors and scp write in several steps, and one save
must make one reload. No TensorFlow here.
"""

from __future__ import annotations

from pathlib import Path

from tfmerge.config import Config, ConfigError
from tfmerge.config import load as load_config
from tfmerge.daemon.debounce import Change
from tfmerge.logs import get_logger

#: A file's identity and content stamp: (inode, size, mtime in ns).
FileKey = tuple[int, int, int]


def file_key(path: Path) -> FileKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ReloadRequests:
    """The reloads asked for, by signal or by edits of the file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: A reload is to happen now (a SIGHUP, or the end of an edit's quiet period).
        self.requested = False
        #: When the file's latest edit is quiet long enough to reload; None: no edit pending.
        self.due: float | None = None
        self._loaded = file_key(path)

    def request(self) -> None:
        self.requested = True

    def file_changed(self, change: Change, now: float, quiet_seconds: float) -> bool:
        """Record ``change`` when it is about the configuration file; False when it is not."""
        if Path(change.path) != self.path:
            return False
        if file_key(self.path) == self._loaded:
            return True  # an event about the file as last loaded (say, after a SIGHUP)
        if self.due is None:
            get_logger().info("config_changed", path=change.path, kind=change.kind)
        self.due = now + quiet_seconds
        return True

    def poll(self, now: float) -> bool:
        """Whether a reload is to happen now."""
        if self.due is not None and now >= self.due:
            self.due = None
            self.requested = True
        return self.requested

    def begin(self) -> None:
        """A reload starts: it reads the file as it is now, which answers every request."""
        self.requested = False
        self.due = None
        self._loaded = file_key(self.path)


def load_new(current: Config) -> Config | None:
    """The configuration file as it is now, or None (logged) when it cannot replace ``current``."""
    log = get_logger()
    try:
        config = load_config(current.path)
    except ConfigError as exc:
        log.error(
            "config_reload_failed",
            path=str(exc.path),
            problems=[str(p) for p in exc.problems],
            reason="the previous configuration stays in force",
        )
        return None
    if config.state_dir != current.state_dir:
        log.error(
            "config_reload_failed",
            path=str(config.path),
            problems=["state_dir: cannot change while the daemon runs (it holds the lock)"],
            reason="the previous configuration stays in force; restart to move state_dir",
        )
        return None
    return config
