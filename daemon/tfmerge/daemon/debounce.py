"""Decide when a burst of upload events has become a batch worth one build.

Pure logic: no I/O, no threads. The caller passes the clock (``now``, any monotonic
float) and a ``stat`` function, so every decision can be replayed in a test.

How uploads land, and what the events look like (paths relative to the watched root):

* ``scp`` writes in place: ``created``, many ``modified``, then ``closed``.
* ``rsync`` writes ``.<name>.<random>`` (a dotfile, never an input) and renames it
  into place: one ``moved_in`` of the final name.
* ``sftp`` may hard-link the finished temporary file to the final name and delete the
  temporary one: a ``created`` of the final name with no ``modified`` after it.
* An upload can stop half-way: the last event is a ``modified`` with no ``closed``
  (the writer hangs), or a ``closed`` of a short file (the writer died; the kernel
  closes its file, which still counts as a close-after-write).

Contract:

* A batch starts at its first relevant change (:func:`is_input_path`); other paths are
  ignored entirely and never start, extend or appear in a batch.
* A file is *writing* from a ``modified`` event until a ``closed`` event. A ``created``
  with no ``modified`` after it (a hard link), a ``moved_in``, a ``closed``, a
  ``moved_out`` and a ``deleted`` all leave the file *not writing*.
* A file is *settled* when it is not writing and its :class:`StatKey` (size, mtime,
  inode) has not changed for ``quiet_seconds``. :meth:`Debouncer.poll` stats every path
  of the batch and remembers what it saw; a StatKey that differs from the previous one
  counts as a change at ``now`` (of the file and of the batch), which catches writes
  that raised no event. The first StatKey seen after an event is the baseline, not a
  change: the event itself was the change. A path whose ``stat`` returns ``None`` (it no
  longer exists) is settled, writing or not.
* ``poll`` returns a :class:`Flush` with reason ``"settled"`` when every path of the batch
  is settled and ``now >= last_change + quiet_seconds`` (``last_change`` is the batch's
  latest change, events and StatKey changes alike, so this also gives every file its
  own quiet period). It returns reason ``"max_wait"`` when
  ``now >= first_change + max_wait_seconds``, whatever the state of the files, so a folder
  that never stops changing is still built. Files still writing are flushed too, and
  named in :attr:`Flush.still_writing`: the build refuses a truncated file and keeps the
  last good input, and the later ``closed`` starts a new batch.
* A writer that stalls with no ``closed`` for longer than ``quiet_seconds`` is NOT flushed
  as settled: an open writer is the strongest sign the file is incomplete. If the
  writer dies, its file is closed and the wait ends there; if it hangs, ``max_wait``
  bounds the wait. (watchdog also reports attribute changes, such as a ``chmod``, as
  ``modified``; one with no close after it likewise holds its batch until ``max_wait``.)
  The opposite gap exists by construction: a ``created`` whose writer stalls before its
  first write looks like a finished empty file, and the build refuses it.
* After a flush the debouncer is empty. Changes added later (say, during a build)
  form the next batch, so changes during a build cause exactly one follow-up build
  when the caller polls again once idle.
* :meth:`Debouncer.next_deadline` is exact: a poll before it never flushes (a path that
  changes with no event can only delay a flush; the one exception is a file being
  written that vanishes with no event). It is ``None`` exactly when nothing is
  pending, so an idle caller sleeps until the next event.
  Right after an event it may be in the past (poll now): the debouncer wants a
  baseline StatKey of a file that is not writing as soon as possible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tfmerge.inputs import is_input_path

ChangeKind = Literal["created", "modified", "closed", "moved_in", "moved_out", "deleted"]
FlushReason = Literal["settled", "max_wait"]


@dataclass(frozen=True)
class Change:
    """One file event. ``path`` is relative to the watched root, with POSIX separators."""

    path: str
    kind: ChangeKind


@dataclass(frozen=True)
class StatKey:
    """What ``stat`` tells about a file that matters for "has it changed"."""

    size: int
    mtime_ns: int
    ino: int


@dataclass(frozen=True)
class Flush:
    """A batch ready to build."""

    #: Every relevant path that changed in this batch, deleted ones included.
    paths: frozenset[str]
    reason: FlushReason
    #: Clock time of the batch's first change.
    first_change: float
    #: Clock time of its last change (an event, or a StatKey seen to differ).
    last_change: float
    #: Paths still being written when ``max_wait`` forced the flush (empty when settled).
    still_writing: frozenset[str] = frozenset()


@dataclass
class _PathState:
    changed_at: float
    writing: bool
    #: Whether ``seen`` was sampled after the path's latest event.
    sampled: bool = False
    seen: StatKey | None = None

    @property
    def holds_batch(self) -> bool:
        """Writing, unless the last look found the file gone (a gone file is settled)."""
        return self.writing and not (self.sampled and self.seen is None)


class Debouncer:
    """Groups changes into batches; see the module docstring for the contract."""

    def __init__(self, quiet_seconds: float, max_wait_seconds: float) -> None:
        if not 0 <= quiet_seconds <= max_wait_seconds < float("inf"):
            raise ValueError(
                "need 0 <= quiet_seconds <= max_wait_seconds < inf, got "
                f"quiet_seconds={quiet_seconds!r}, max_wait_seconds={max_wait_seconds!r}"
            )
        self._quiet = quiet_seconds
        self._max_wait = max_wait_seconds
        self._paths: dict[str, _PathState] = {}
        self._first_change = 0.0
        self._last_change = 0.0

    @property
    def pending(self) -> bool:
        """Whether a batch has started and not been flushed yet."""
        return bool(self._paths)

    def add(self, change: Change, now: float) -> None:
        """Record ``change`` at clock time ``now``; non-input paths are ignored."""
        if not is_input_path(change.path):
            return
        if not self._paths:
            self._first_change = now
            self._last_change = now
        else:
            self._last_change = max(self._last_change, now)
        writing = change.kind == "modified"
        state = self._paths.get(change.path)
        if state is None:
            self._paths[change.path] = _PathState(changed_at=now, writing=writing)
            return
        state.changed_at = max(state.changed_at, now)
        state.writing = writing
        state.sampled = False

    def poll(self, now: float, stat: Callable[[str], StatKey | None]) -> Flush | None:
        """Look at every pending path with ``stat`` and return the batch if it is due.

        ``stat`` returns ``None`` for a path that does not exist.
        """
        if not self._paths:
            return None
        for path, state in self._paths.items():
            key = stat(path)
            if state.sampled and key != state.seen:
                state.changed_at = max(state.changed_at, now)
                self._last_change = max(self._last_change, now)
            state.seen = key
            state.sampled = True
        # Compare against the same sums next_deadline() returns, so that a poll at
        # exactly the deadline is due despite floating-point rounding.
        if now >= self._first_change + self._max_wait:
            return self._flush("max_wait")
        if now >= self._last_change + self._quiet and not any(
            state.holds_batch for state in self._paths.values()
        ):
            return self._flush("settled")
        return None

    def next_deadline(self) -> float | None:
        """Clock time of the next useful poll; ``None`` when nothing is pending."""
        if not self._paths:
            return None
        deadline = self._first_change + self._max_wait
        states = self._paths.values()
        if not any(state.holds_batch for state in states):
            deadline = min(deadline, self._last_change + self._quiet)
        baselines = [
            state.changed_at for state in states if not state.sampled and not state.writing
        ]
        return min([deadline, *baselines])

    def _flush(self, reason: FlushReason) -> Flush:
        flush = Flush(
            paths=frozenset(self._paths),
            reason=reason,
            first_change=self._first_change,
            last_change=self._last_change,
            still_writing=frozenset(p for p, s in self._paths.items() if s.holds_batch),
        )
        self._paths = {}
        return flush
