"""Keep ``frozen_dir`` watched: a watcher that went deaf is replaced, and the tree rescanned.

The loop calls :meth:`WatchKeeper.check` at every wake-up; at most every
:data:`CHECK_SECONDS` it asks the watcher for a :meth:`~tfmerge.daemon.watch.Watcher.problem`
(``frozen_dir`` removed, replaced, the kernel's queue overflowed, a folder moved into the
tree, watchdog's thread ended). On one, it stops that watcher and starts a new one, which
walks the tree again, and compares a stat snapshot of the inputs with the one taken when the
last batch settled (:mod:`tfmerge.daemon.rescan`): what differs goes to the debouncer as
changes. While ``frozen_dir`` is missing, nothing can be watched: it is looked for again at
every check, and watched and rescanned as soon as it exists. No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

from tfmerge.daemon import rescan
from tfmerge.daemon.debounce import Change
from tfmerge.daemon.watch import OnChange, Watcher, WatcherFactory
from tfmerge.logs import get_logger

#: How often the watch is checked; a folder made in place of frozen_dir raises no event, so
#: uploads into it wait this long at most before a rescan finds them.
CHECK_SECONDS: Final = 2.0


class WatchKeeper:
    """The watcher of ``frozen_dir`` (and of the config file), kept working."""

    def __init__(self, new_watcher: WatcherFactory, on_change: OnChange) -> None:
        self._new_watcher = new_watcher
        self._on_change = on_change
        self._watcher: Watcher | None = None
        self._root = Path()
        self._also_watch: list[Path] = []
        self._snapshot: rescan.Snapshot = {}
        self._next_check = 0.0
        self._missing = False

    def start(self, root: Path, also_watch: Sequence[Path], now: float) -> None:
        """Watch root; raises OSError when it cannot be watched (as the watcher's start)."""
        self.stop()
        self._root, self._also_watch = root, list(also_watch)
        self._snapshot = rescan.snapshot(root)
        watcher = self._new_watcher(root, self._on_change, also_watch=self._also_watch)
        watcher.start()
        self._watcher, self._missing = watcher, False
        self._next_check = now + CHECK_SECONDS

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def remember(self) -> None:
        """A batch settled: what is on disk now is what the next rescan compares with."""
        self._snapshot = rescan.snapshot(self._root)

    @property
    def next_check(self) -> float:
        return self._next_check

    def check(self, now: float) -> list[Change]:
        """The changes a rescan found, after a watcher was found deaf and replaced; [] else."""
        if now < self._next_check:
            return []
        self._next_check = now + CHECK_SECONDS
        log = get_logger()
        if self._watcher is not None:
            reason = self._watcher.problem()
            if reason is None:
                return []
            self.stop()
        else:
            reason = "frozen_dir is missing"
        watcher = self._new_watcher(self._root, self._on_change, also_watch=self._also_watch)
        try:
            watcher.start()
        except OSError as exc:
            # Missing, or out of inotify watches: nothing is heard; try again at each check.
            watcher.stop()
            if not self._missing:
                self._missing = True
                why = "" if isinstance(exc, FileNotFoundError) else f" ({exc.strerror or exc})"
                log.error(
                    "watch_lost",
                    folder=str(self._root),
                    reason=f"{reason}{why}; nothing is watched until it can be again",
                )
            return []
        self._watcher = watcher
        if self._missing:
            reason, self._missing = "frozen_dir can be watched again", False
        log.warning("watch_restarted", folder=str(self._root), reason=reason)
        found = rescan.snapshot(self._root)
        changes = rescan.changes(self._snapshot, found)
        self._snapshot = found
        log.info(
            "frozen_dir_rescanned",
            files=len(found),
            changed=[c.path for c in changes if c.kind == "found"],
            deleted=[c.path for c in changes if c.kind == "deleted"],
        )
        return changes
