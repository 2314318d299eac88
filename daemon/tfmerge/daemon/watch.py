"""Turn inotify events on the watched folder (through watchdog) into :class:`Change` values.

Translation and filtering only; when a batch is ready is :mod:`tfmerge.daemon.debounce`'s call.

* File events map one to one: created, modified (watchdog also reports attribute
  changes as modified), closed (close-after-write), deleted. A rename inside the tree
  is a ``moved_out`` of the old name and a ``moved_in`` of the new one; a file moved in
  from outside the tree is a ``moved_in``, one moved out a ``moved_out``.
* Opens and closes without a write are not even asked of the kernel: the worker reads
  every input for each build, and those reads must not start another build.
* Folders produce no change themselves. For a folder moved or created in the tree,
  watchdog 6 walks it and emits one event per file inside (a ``created`` for a folder
  from outside the tree, a move for a folder renamed within it), and those are
  translated like any other: walking it here as well would report each file twice.
* Only paths :func:`~tfmerge.inputs.is_input_path` accepts are reported, relative to
  the root, with POSIX separators.
* ``also_watch`` names single files (the configuration) outside the input rules. Their
  parent folders are watched non-recursively and only the exact names are reported,
  as ``Change(path=<the absolute path, as a str>, kind=...)``. Editors save by rename,
  so a ``moved_in`` or ``created`` of the name is a new version of the file.

Where inotify and watchdog 6 go deaf, :meth:`FolderWatcher.problem` says so, and the daemon
(:mod:`tfmerge.daemon.health`) makes a new watcher and rescans the tree:

* the root removed (``rm -rf``): watchdog reports it and ends its reading thread;
* the root renamed away and another folder made in its place: inotify follows the inode, so
  the old folder stays watched; told by the root's (device, inode);
* a folder moved in from outside the tree gets its files reported but no watch of its own
  (later writes inside it would go unseen), and a folder moved out keeps its watch;
* the kernel's event queue overflowing drops events (counted by
  :mod:`tfmerge.daemon.overflow`, since watchdog drops the overflow record too).

``on_change`` runs on watchdog's observer thread and must not raise: an exception
ends that thread, and with it every later event.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
)
from watchdog.observers.inotify import InotifyObserver

from tfmerge.daemon import overflow
from tfmerge.daemon.debounce import Change, ChangeKind
from tfmerge.inputs import is_input_path

OnChange = Callable[[Change], None]


class Watcher(Protocol):
    """The one seam between the daemon and the operating system's file notification."""

    def start(self) -> None:
        """Start reporting changes to the ``on_change`` the watcher was made with."""
        ...

    def stop(self) -> None:
        """Stop reporting; no ``on_change`` call runs once this returns."""
        ...

    def problem(self) -> str | None:
        """Why changes may have gone unreported since the start (the watcher is then to be
        replaced, and the tree rescanned), or None. Cheap: a stat and a few flags."""
        ...


class WatcherFactory(Protocol):
    """Makes a watcher of ``root`` (recursively) and of the single files ``also_watch``;
    :class:`FolderWatcher` is one."""

    def __call__(
        self, root: Path, on_change: OnChange, *, also_watch: Sequence[Path] = ...
    ) -> Watcher: ...


_KIND_OF_EVENT: Final[Mapping[type[Any], ChangeKind]] = {
    FileCreatedEvent: "created",
    FileModifiedEvent: "modified",
    FileClosedEvent: "closed",
    FileDeletedEvent: "deleted",
}
# watchdog turns this list into the inotify mask: without FileOpenedEvent and
# FileClosedNoWriteEvent the kernel does not queue the worker's reads at all. The two folder
# events add nothing to the mask (IN_DELETE, IN_MOVE are there for the file events).
_EVENT_FILTER: Final = [*_KIND_OF_EVENT, FileMovedEvent, DirDeletedEvent, DirMovedEvent]


class _Translator:
    """A watchdog event handler: ``name_for`` maps a path watchdog reports to the path
    of the Change, or to None when the path is not to be reported."""

    def __init__(
        self,
        name_for: Callable[[str], str | None],
        on_change: OnChange,
        *,
        root: str | None = None,
        on_problem: Callable[[str], None] = lambda problem: None,
    ) -> None:
        self._name_for = name_for
        self._on_change = on_change
        self._root = root
        self._on_problem = on_problem

    def dispatch(self, event: Any) -> None:
        if isinstance(event, DirDeletedEvent):
            if os.fsdecode(event.src_path) == self._root:
                self._on_problem("frozen_dir was removed")
            return
        if isinstance(event, DirMovedEvent):
            # Full events: an end outside the tree is "". Renames inside it are followed.
            if self._root is not None and not (event.src_path and event.dest_path):
                self._on_problem("a folder was moved into or out of frozen_dir")
            return
        if isinstance(event, FileMovedEvent):
            # With full events an end outside the watched folder is "".
            self._report(event.src_path, "moved_out")
            self._report(event.dest_path, "moved_in")
            return
        kind = _KIND_OF_EVENT.get(type(event))
        if kind is not None:
            self._report(event.src_path, kind)

    def _report(self, raw_path: str | bytes, kind: ChangeKind) -> None:
        if not raw_path:
            return
        name = self._name_for(os.fsdecode(raw_path))
        if name is not None:
            self._on_change(Change(name, kind))


def _input_under(root: str) -> Callable[[str], str | None]:
    prefix = root.rstrip("/") + "/"

    def name_for(path: str) -> str | None:
        if not path.startswith(prefix):
            return None
        relative = path[len(prefix) :]
        return relative if is_input_path(relative) else None

    return name_for


class FolderWatcher:
    """Reports changes to the inputs under ``root`` (recursively) and to ``also_watch``."""

    def __init__(self, root: Path, on_change: OnChange, *, also_watch: Sequence[Path] = ()) -> None:
        overflow.install()
        self.root = root.resolve()
        self._problems: list[str] = []
        self._identity: tuple[int, int] | None = None
        self._overflows = overflow.count()
        # Full events: a file moved in from outside the tree is reported as a move
        # (moved_in), not dressed up as a creation.
        self._observer: Any = InotifyObserver(generate_full_events=True)
        self._observer.schedule(
            _Translator(
                _input_under(str(self.root)),
                on_change,
                root=str(self.root),
                on_problem=self._problems.append,
            ),
            str(self.root),
            recursive=True,
            event_filter=_EVENT_FILTER,
        )
        # watchdog reports <resolved parent>/<name>; the caller gets its own spelling back.
        by_folder: dict[str, dict[str, str]] = {}
        for file in also_watch:
            absolute = file.absolute()
            folder = absolute.parent.resolve()
            if not folder.is_dir():
                continue  # a file whose folder is gone has nothing to report
            by_folder.setdefault(str(folder), {})[str(folder / absolute.name)] = str(absolute)
        self._folders = [str(self.root), *by_folder]
        for folder_path, names in by_folder.items():
            self._observer.schedule(
                _Translator(names.get, on_change),
                folder_path,
                recursive=False,
                event_filter=_EVENT_FILTER,
            )

    def start(self) -> None:
        """Add the inotify watches and start reporting.

        Raises OSError when a folder is missing or the inotify watch limit is reached.
        """
        try:
            self._overflows = overflow.count()
            st = os.stat(self.root)
            self._identity = (st.st_dev, st.st_ino)
            self._observer.start()
        except BaseException as err:
            # Emitters already started for other folders must not outlive the failure.
            self._observer.unschedule_all()
            if isinstance(err, OSError):
                # watchdog's message names no folder.
                folders = ", ".join(self._folders)
                raise OSError(err.errno, f"cannot watch {folders}: {err.strerror}") from err
            raise

    def stop(self) -> None:
        """Stop reporting and wait for watchdog's threads to end. Safe to call twice."""
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join()

    def problem(self) -> str | None:
        """Why changes may have gone unreported since :meth:`start`, or None."""
        if self._problems:
            return self._problems[0]
        if not self._observer.is_alive() or not all(
            emitter.is_alive() for emitter in self._observer.emitters
        ):
            return "the watcher's thread ended"
        try:
            st = os.stat(self.root)
        except OSError:
            return "frozen_dir is missing"
        if (st.st_dev, st.st_ino) != self._identity:
            return "frozen_dir was replaced by another folder"
        if overflow.count() != self._overflows:
            return "the kernel's inotify event queue overflowed"
        return None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
