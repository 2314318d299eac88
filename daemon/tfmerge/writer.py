"""The build's second core: the files a check hands over are written while the next one is read.

Every input a build reads is kept in ``state_dir`` (for the day its next upload is refused),
written once by a thread while the graph is checked, and synced by another. When most of an
input's bytes are its large constants, that same file is also the data shard of those
constants in the version being built: it is hard-linked into ``variables/`` (copied where the
state folder is on another mount), and the bundle's entries point at the constants' bytes in
it. A model's constants are then never written a second time, and a rebuild links the kept
copies of the models that did not change without writing them at all. Constants that are not
in their file as they are (a text graph) go into a data file of their own. Every file of a
build is read into one buffer. Worker side.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tfmerge import bundle, graphs
from tfmerge.graphs import LargeConstant
from tfmerge.merge import VARIABLES_PREFIX
from tfmerge.store import Store, write_all

#: An input is its constants' shard when they are at least this share of its bytes, so that a
#: shard copied rather than linked holds at most as many other bytes as constant ones.
SHARD_SHARE = 0.5
#: What link(2) fails with where a hard link cannot be made at all.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}


@dataclass
class _Slot:
    buffer: mmap.mmap | None = None
    #: The copies still reading from this buffer.
    pending: list[Future[None]] = field(default_factory=list)


@dataclass(eq=False)
class Shard:
    """A data file of the version: an input graph file, or the writer's own file."""

    path: Path
    #: How an input got into variables/: "linked" to its kept copy, or "copied".
    how: str = ""


class Writer:
    """Keeps inputs in the state folder and gives export_dir's variables/ their data."""

    def __init__(self, export_dir: Path, store: Store) -> None:
        self._store = store
        self._prefix = export_dir / VARIABLES_PREFIX
        self._data = bundle.DataWriter(self._prefix)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfmerge-writer")
        self._sync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfmerge-sync")
        self._jobs: list[Future[None]] = []
        self._syncs: list[Future[None]] = []
        self._slot = _Slot()
        #: The inputs handed over as shards, under a temporary name until finish.
        self._inputs: list[Shard] = []
        #: Each graph's entries; their shard is their file's index in _shards.
        self._entries: dict[str, list[bundle.Entry]] = {}
        self._shards: list[Shard] = []
        self._own: int | None = None
        self._link = True
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

    def keep_input(self, read: graphs.GraphRead, suffix: str, *, kept: bool) -> Shard | None:
        """Keep a read input in the state folder; it is a shard if its constants fill it.

        ``kept``: the input was read from its blob in the state folder, and its sha256 checked.
        Returns the shard the input may be, for store_constants.
        """
        if self._finished:
            return None
        shard = None
        if read.data.nbytes and read.payload_bytes >= SHARD_SHARE * read.data.nbytes:
            shard = Shard(self._prefix.parent / f".input-{len(self._inputs)}{suffix}")
            self._inputs.append(shard)
        if not kept or shard is not None:
            self._submit(self._keep, read, suffix, kept, shard)
        return shard

    def _keep(self, read: graphs.GraphRead, suffix: str, kept: bool, shard: Shard | None) -> None:
        sha256, data = read.sha256, read.data
        pending = None
        if not kept and not self._store.has_blob(sha256, suffix, data.nbytes):
            pending = self._store.start_blob(sha256, suffix, data)
        try:
            if shard is not None:
                source = self._store.blob_path(sha256, suffix) if pending is None else pending.path
                self._place(shard, source, data)
        except BaseException:
            if pending is not None:
                pending.discard()
            raise
        if pending is not None:
            # Synced from now on, by the other thread: by the end of the check it is mostly done.
            # (Renamed once synced: the link above is made to the temporary name.)
            self._syncs.append(self._sync.submit(pending.seal))

    def _place(self, shard: Shard, source: Path, data: memoryview) -> None:
        """Hard-link source to shard.path, or copy data there where a link cannot be made."""
        shard.path.parent.mkdir(parents=True, exist_ok=True)
        if self._link:
            try:
                os.link(source, shard.path)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                # Another mount (systemd's ReadWritePaths= are each one) or a file system
                # without hard links: every shard of this build is copied instead.
                self._link = False
            else:
                shard.how = "linked"
                return
        fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
        shard.how = "copied"
        self._syncs.append(self._sync.submit(_sync_and_close, fd))

    def store_constants(
        self, sha256: str, constants: Sequence[LargeConstant], shard: Shard | None
    ) -> None:
        """Record where an accepted graph's large constants are, once per graph.

        The constants of an input that is a shard (keep_input's) stay where they are in it;
        the others are appended to the writer's own data file.
        """
        if sha256 in self._entries or self._finished:
            return
        entries = []
        for constant in constants:
            if shard is not None and constant.offset is not None:
                index = self._shard_index(shard)
                offset, size, crc = constant.offset, constant.value.nbytes, None
            else:
                if self._own is None:
                    self._own = len(self._shards)
                    self._shards.append(Shard(self._data.path))
                index = self._own
                offset, size, crc = self._data.append(constant.value)
            if crc is None:
                crc = bundle.checksum(constant.value)
            entries.append(
                bundle.Entry(
                    constant.name, constant.dtype, constant.shape, offset, size, crc, index
                )
            )
        self._entries[sha256] = entries

    def _shard_index(self, shard: Shard) -> int:
        if shard not in self._shards:
            self._shards.append(shard)
        return self._shards.index(shard)

    def entries(self, sha256: str) -> list[bundle.Entry]:
        """Where a graph's constants are in the version's data files (after finish)."""
        return self._entries.get(sha256, [])

    @property
    def shards(self) -> int:
        """How many data files the version's variables have."""
        return len(self._shards)

    @property
    def shards_linked(self) -> int:
        """How many of them are inputs hard-linked to their kept copies."""
        return sum(shard.how == "linked" for shard in self._shards)

    @property
    def shards_copied(self) -> int:
        """How many of them are inputs copied (the state folder is on another mount)."""
        return sum(shard.how == "copied" for shard in self._shards)

    def finish(self) -> None:
        """Wait for the inputs' copies, raise the first error, and name every data file.

        Inputs no accepted graph needs as a shard are dropped from variables/. The buffer is
        let go: the merge and the verification need the memory more.
        """
        self._finished = True
        try:
            for job in self._jobs:
                job.result()
        finally:
            self._slot = _Slot()
        for shard in self._inputs:
            if shard not in self._shards:
                shard.path.unlink(missing_ok=True)
        count = len(self._shards)
        for index, shard in enumerate(self._shards):
            target = bundle.data_path(self._prefix, index, count)
            if shard.path != target:
                os.rename(shard.path, target)
        if self._own is not None:
            self._data.start_sync()

    def close(self) -> None:
        """Stop the threads (after the writes in flight) and wait for every file on disk."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._slot = _Slot()
        try:
            self._data.close()
        finally:
            self._sync.shutdown(wait=True)
        for job in self._syncs:
            job.result()

    def _submit(self, function: Callable[..., None], *args: object) -> None:
        job = self._pool.submit(function, *args)
        self._jobs.append(job)
        self._slot.pending.append(job)


def _sync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _unshared(buffer: mmap.mmap) -> bool:
    """Whether no view of the buffer is left (mmap refuses to resize while one is)."""
    try:
        buffer.resize(len(buffer))
    except BufferError:
        return False
    return True
