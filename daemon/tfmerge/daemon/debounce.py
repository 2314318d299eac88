"""Decide when a burst of upload events has become a batch worth one build.

Pure logic: no I/O, no threads. The caller passes the clock (``now``, any monotonic
float), a ``stat`` function and, where the kernel can tell, a ``writing`` probe (is the file
open for writing now?), so every decision can be replayed in a test.

How uploads land, and what the events look like (paths relative to the watched root):

* ``scp`` writes in place: ``created``, many ``modified``, then ``closed``. The legacy protocol
  with ``-p`` (``scp -O -p``) sets the times after the close, and ``rsync --inplace -t`` does
  too: one more ``modified`` (watchdog reports an attribute change as one) with no close.
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
* Whether a file is *writing* is the ``writing`` probe's answer when it has one: ``True``
  while any process has the file open for writing, ``False`` when none has, whatever the
  events said. It is asked once after each event of the file, and only when the answer
  matters (the batch would flush, or the file would be reported held), so a stream of
  write events costs no probe. Without a probe, or where it answers ``None`` (it cannot
  tell: no lease on that file system, or on another user's file without ``CAP_LEASE``),
  the events decide: a file is writing from a ``modified`` event until a ``closed``
  event, and a ``created`` with no ``modified`` after it (a hard link), a ``moved_in``, a
  ``closed``, a ``moved_out``, a ``deleted`` and a ``found`` all leave it not writing.
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
  own quiet period). So with the probe, an attribute change after the last close
  (``scp -O -p``, ``rsync --inplace -t``, ``chmod``) delays a batch by one quiet period
  at most; without it, such a file counts as writing until ``max_wait``.
* It returns reason ``"max_wait"`` when ``now >= first_change + max_wait_seconds``, whatever
  the state of the files, so a folder that never stops changing is still built (for a batch
  that held only files open for writing, the wait counts from the next change). Files
  still writing are named in :attr:`Flush.still_writing`: the build refuses a file open for
  writing and keeps its model's last accepted input. Those the probe says are open for
  writing also stay pending, as the start of the next batch (:attr:`Flush.kept`): they are
  built once they are closed and quiet. A batch whose every file the probe says is open for
  writing is never flushed at ``max_wait`` (a build would change nothing): it waits for
  their close, which is an event, and its wait for ``max_wait`` starts again with the next
  change of another file.
* A writer that stalls with no ``closed`` for longer than ``quiet_seconds`` is NOT flushed
  as settled: an open writer is the strongest sign the file is incomplete. If the
  writer dies, its file is closed and the wait ends there; if it hangs, ``max_wait``
  bounds the wait for the rest of the batch. Without a probe, a ``created`` whose writer
  stalls before its first write looks like a finished empty file, and the build refuses it.
* A file that holds its batch (it is writing) a quiet period after its first change in the
  batch is reported once per batch by :meth:`Debouncer.take_held`, with its size so far.
* After a flush the debouncer is empty, but for the files kept. Changes added later (say,
  during a build) form the next batch, so changes during a build cause exactly one
  follow-up build when the caller polls again once idle. A file the build found not at rest
  is given back with :meth:`Debouncer.requeue`: its batch settles again.
* :meth:`Debouncer.next_deadline` is exact: a poll before it never flushes (a path that
  changes with no event can only delay a flush; the one exception is a file being
  written that vanishes with no event). It is ``None`` exactly when nothing is
  pending, and ``math.inf`` when only files the probe says are open for writing are (their
  close is an event), so an idle caller sleeps until the next event.
  Right after an event it may be in the past (poll now): the debouncer wants a
  baseline StatKey of a file that is not writing as soon as possible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from tfmerge.inputs import is_input_path

#: ``found``: a change no event reported (a rescan found it, or a build found the file not
#: at rest); it says nothing about a writer.
ChangeKind = Literal["created", "modified", "closed", "moved_in", "moved_out", "deleted", "found"]
FlushReason = Literal["settled", "max_wait"]
#: Is the file (relative to the root) open for writing? None: the kernel cannot tell.
WritingProbe = Callable[[str], bool | None]


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
    #: Of those, the ones the probe says are open for writing: they stay pending.
    kept: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Held:
    """A file that holds its batch back, reported once per batch."""

    path: str
    #: Its size so far (None: not seen yet).
    size: int | None
    #: Clock time of its first change in the batch.
    since: float
    #: True: the probe says it is open for writing; None: told from the events alone.
    open_for_writing: bool | None

    def fields(self, now: float) -> dict[str, object]:
        """The ``batch_held`` event's fields, at clock time ``now``."""
        return {
            "file": self.path,
            "size": self.size,
            "waited_seconds": round(now - self.since, 3),
            "open_for_writing": self.open_for_writing,
        }


@dataclass
class _PathState:
    changed_at: float
    #: Writing, as the events tell it.
    writing: bool
    #: Clock time of the path's first change in this batch.
    first_at: float
    #: Whether ``seen`` was sampled after the path's latest event.
    sampled: bool = False
    seen: StatKey | None = None
    #: Whether the probe was asked after the path's latest event, and its answer.
    asked: bool = False
    open: bool | None = None
    reported: bool = False

    @property
    def gone(self) -> bool:
        return self.sampled and self.seen is None

    def holds(self, probing: bool) -> bool | None:
        """Whether the file holds its batch; None when the probe is still to be asked."""
        if self.gone:
            return False
        if self.asked and self.open is not None:
            return self.open
        if probing and not self.asked:
            return None
        return self.writing


class Debouncer:
    """Groups changes into batches; see the module docstring for the contract."""

    def __init__(
        self, quiet_seconds: float, max_wait_seconds: float, *, writing: WritingProbe | None = None
    ) -> None:
        if not 0 <= quiet_seconds <= max_wait_seconds < float("inf"):
            raise ValueError(
                "need 0 <= quiet_seconds <= max_wait_seconds < inf, got "
                f"quiet_seconds={quiet_seconds!r}, max_wait_seconds={max_wait_seconds!r}"
            )
        self._quiet = quiet_seconds
        self._max_wait = max_wait_seconds
        self._writing = writing
        self._paths: dict[str, _PathState] = {}
        self._first_change = 0.0
        self._last_change = 0.0
        #: When the wait for max_wait started: the first change, or the first one after the
        #: batch held only files open for writing.
        self._wait_from = 0.0
        self._held: list[Held] = []

    @property
    def pending(self) -> bool:
        """Whether a batch has started and not been flushed yet."""
        return bool(self._paths)

    def add(self, change: Change, now: float) -> None:
        """Record ``change`` at clock time ``now``; non-input paths are ignored."""
        if not is_input_path(change.path):
            return
        if not self._paths:
            self._first_change = self._last_change = self._wait_from = now
        else:
            if self._writers_only():
                self._wait_from = now  # a batch of files open for writing waited for them
            self._last_change = max(self._last_change, now)
        writing = change.kind == "modified"
        state = self._paths.get(change.path)
        if state is None:
            self._paths[change.path] = _PathState(changed_at=now, writing=writing, first_at=now)
            return
        state.changed_at = max(state.changed_at, now)
        state.writing = writing
        state.sampled = False
        state.asked = False

    def requeue(self, paths: Iterable[str], now: float) -> None:
        """Files a build found not at rest (still being written, changed while read): their
        batch settles again, as for a change at ``now``."""
        for path in paths:
            self.add(Change(path, "found"), now)

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
        self._report_held(now)
        # Compare against the same sums next_deadline() returns, so that a poll at
        # exactly the deadline is due despite floating-point rounding.
        max_wait_due = now >= self._wait_from + self._max_wait
        if max_wait_due or now >= self._last_change + self._quiet:
            self._ask_all()
        if max_wait_due:
            return self._flush_at_max_wait(now)
        probing = self._writing is not None
        if now >= self._last_change + self._quiet and not any(
            state.holds(probing) for state in self._paths.values()
        ):
            return self._flush("settled")
        return None

    def next_deadline(self) -> float | None:
        """Clock time of the next useful poll; ``None`` when nothing is pending."""
        if not self._paths:
            return None
        probing = self._writing is not None
        deadline = math.inf if self._writers_only() else self._wait_from + self._max_wait
        states = self._paths.values()
        holding = [state.holds(probing) for state in states]
        if not any(holds is True for holds in holding):
            # Nothing is known to hold the batch: due once quiet (asking the probe first).
            deadline = min(deadline, self._last_change + self._quiet)
        baselines = [
            state.changed_at for state in states if not state.sampled and not state.writing
        ]
        reports = [
            state.first_at + self._quiet
            for state, holds in zip(states, holding, strict=True)
            if not state.reported and holds is not False
        ]
        return min([deadline, *baselines, *reports])

    def take_held(self) -> list[Held]:
        """The files found holding their batch since the last call, each once per batch."""
        held, self._held = self._held, []
        return held

    def _writers_only(self) -> bool:
        """Whether every pending file is open for writing, as the probe said after its last
        event: nothing to build until one is closed."""
        return bool(self._paths) and all(s.asked and s.open for s in self._paths.values())

    def _ask(self, path: str, state: _PathState) -> None:
        if self._writing is not None and not state.asked and not state.gone:
            state.open = self._writing(path)
            state.asked = True

    def _ask_all(self) -> None:
        for path, state in self._paths.items():
            self._ask(path, state)

    def _report_held(self, now: float) -> None:
        probing = self._writing is not None
        for path, state in self._paths.items():
            if state.reported or now < state.first_at + self._quiet:
                continue
            self._ask(path, state)
            if state.holds(probing):
                state.reported = True
                self._held.append(
                    Held(
                        path=path,
                        size=None if state.seen is None else state.seen.size,
                        since=state.first_at,
                        open_for_writing=state.open if state.asked else None,
                    )
                )

    def _flush_at_max_wait(self, now: float) -> Flush | None:
        kept = {path: s for path, s in self._paths.items() if s.asked and s.open is True}
        if len(kept) == len(self._paths):
            return None  # only files open for writing: a build would refuse them all
        flush = self._flush("max_wait", kept=frozenset(kept))
        if kept:
            self._paths = kept
            self._first_change = min(state.first_at for state in kept.values())
            self._last_change = max(state.changed_at for state in kept.values())
            self._wait_from = now
        return flush

    def _flush(self, reason: FlushReason, kept: frozenset[str] = frozenset()) -> Flush:
        probing = self._writing is not None
        flush = Flush(
            paths=frozenset(self._paths),
            reason=reason,
            first_change=self._first_change,
            last_change=self._last_change,
            still_writing=frozenset(p for p, s in self._paths.items() if s.holds(probing)),
            kept=kept,
        )
        self._paths = {}
        return flush
