"""The build's second core: the files a check hands over are written while the next one is read.

A build writes every input's bytes twice besides reading them: a copy into ``state_dir`` (for
the day its next upload is refused) and, once it passes, its large constants into the new
version's variables data file. The copy into the state folder releases the GIL and is done
by a thread while the graph is checked; the constants are written by the check itself, from
the same buffer (a second writer thread competes for the same memory bandwidth and gains
nothing on two cores). Every file of a build is read into one buffer. Worker side.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tfmerge import bundle, graphs
from tfmerge.graphs import LargeConstant
from tfmerge.merge import VARIABLES_PREFIX
from tfmerge.store import Store


@dataclass
class _Slot:
    buffer: mmap.mmap | None = None
    #: The copies still reading from this buffer.
    pending: list[Future[None]] = field(default_factory=list)


class Writer:
    """Copies inputs into the state folder and constants into export_dir's variables/."""

    def __init__(self, export_dir: Path, store: Store | None) -> None:
        self._store = store
        self._data = bundle.DataWriter(export_dir / VARIABLES_PREFIX)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfmerge-writer")
        self._jobs: list[Future[None]] = []
        self._slot = _Slot()
        self._entries: dict[str, list[bundle.Entry]] = {}
        self._finished = False

    def buffer(self, size: int) -> mmap.mmap:
        """A buffer of at least size bytes for the next file (graphs.read_graph's buffer_for).

        Memory a process touches for the first time costs more than reading a file into it
        (about 1.3 ms per MiB of page faults on a virtual machine): the buffer is reused once
        the copy of the previous file is done.
        """
        slot = self._slot
        wait(slot.pending)
        slot.pending = []
        if slot.buffer is not None and len(slot.buffer) >= size and _unshared(slot.buffer):
            return slot.buffer
        slot.buffer = graphs.new_buffer(size)
        return slot.buffer

    def keep_input(self, sha256: str, suffix: str, data: memoryview) -> None:
        """Copy an input's checked bytes into the state folder (not synced; see Store)."""
        if self._store is not None:
            self._submit(self._store.write_blob, sha256, suffix, data)

    def store_constants(self, sha256: str, constants: Sequence[LargeConstant]) -> None:
        """Append an accepted graph's large constants to the data file, once per graph."""
        if sha256 in self._entries or self._finished:
            return
        self._entries[sha256] = [
            bundle.Entry(c.name, c.dtype, c.shape, *self._data.append(c.value)) for c in constants
        ]

    def entries(self, sha256: str) -> list[bundle.Entry]:
        """Where a graph's constants are in the data file."""
        return self._entries.get(sha256, [])

    def finish(self) -> None:
        """Wait for every copy, raise the first one's error, and start the data's writeback.

        The buffer is let go: the merge and the verification need the memory more.
        """
        self._finished = True
        try:
            for job in self._jobs:
                job.result()
        finally:
            self._slot = _Slot()
        self._data.start_sync()

    def close(self) -> None:
        """Stop the thread (after the writes in flight) and wait for the data on disk."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._slot = _Slot()
        self._data.close()

    def _submit(self, function: Callable[..., None], *args: object) -> None:
        job = self._pool.submit(function, *args)
        self._jobs.append(job)
        self._slot.pending.append(job)


def _unshared(buffer: mmap.mmap) -> bool:
    """Whether no view of the buffer is left (mmap refuses to resize while one is)."""
    try:
        buffer.resize(len(buffer))
    except BufferError:
        return False
    return True
