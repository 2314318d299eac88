"""A build's inputs, copied once into the state folder; the version's data, linked to them.

Every input a build checks is first copied into ``state_dir`` (for the day its next upload is
refused), by a thread that runs ahead of the checks, with the kernel's copy, opened through
``frozen_dir``'s descriptor and taken under a read lease (tfmerge.inputs, tfmerge.snapshot): a
file still being written, or one that changes meanwhile, is refused and its copy dropped. The
check then
reads the copy, mapped into memory, not the upload: what is hashed and checked is exactly
what is kept, and no buffer has to wait for a write to finish before the next file is read.
An input under 1 MiB is read into memory instead (under the same lease and identity check),
and written to ``state_dir`` from there only if no blob holds its bytes yet: for a small file,
creating a copy costs more than the read, and in a build of many models most inputs are
unchanged.

When most of an input's bytes are its large constants, that same file is also the data shard
of those constants in the version being built: it is hard-linked into ``variables/`` (copied
where the state folder is on another mount), and the bundle's entries point at the constants'
bytes in it. A model's constants are never written a second time, and an input kept already
(an unchanged model) is linked as it is, so versions share its file. Constants that are not
in their file as they are (a text graph) go into a data file of their own. Kept copies are
synced by a second thread before they get their name, so a version's data is on disk by the
time the build ends; a refused input's copy is dropped. Worker side.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tfmerge import snapshot
from tfmerge.build import bundle, reading
from tfmerge.build.variables import VARIABLES_PREFIX
from tfmerge.folders.fs import PendingFile, naming, write_all
from tfmerge.folders.state import Store
from tfmerge.inputs import FrozenDir, open_kept
from tfmerge.models import LargeConstant, ModelRejected

#: An input is its constants' shard when they are at least this share of its bytes, so that a
#: shard copied rather than linked holds at most as many other bytes as constant ones.
SHARD_SHARE = 0.5
#: What link(2) fails with where a hard link cannot be made at all.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
#: How many inputs are copied ahead of the one being checked.
_AHEAD = 2
#: Inputs below this size are read into memory rather than copied file to file.
_READ_BELOW = 1 << 20


@dataclass(eq=False)
class Shard:
    """A data file of the version: an input graph file, or the writer's own file."""

    path: Path
    #: How an input got into variables/: "linked" to its kept copy, or "copied".
    how: str = ""


@dataclass(eq=False)
class _Input:
    """An input being checked: its copy in the state folder (None: read from its blob)."""

    suffix: str
    pending: PendingFile | None
    source: Path
    #: Read into memory (a small input): written to the state folder only if it is new.
    in_memory: bool = False


class Writer:
    """Keeps inputs in the state folder and gives export_dir's variables/ their data."""

    def __init__(self, export_dir: Path, store: Store, frozen_dir: Path) -> None:
        self._store = store
        self._frozen = FrozenDir(frozen_dir)
        self._prefix = export_dir / VARIABLES_PREFIX
        self._data = bundle.DataWriter(self._prefix)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfmerge-writer")
        self._sync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfmerge-sync")
        self._copies: dict[str, Future[tuple[PendingFile | bytearray, snapshot.Taken]]] = {}
        self._queued: list[str] = []
        self._max_bytes = 0
        self._jobs: list[Future[None]] = []
        self._syncs: list[Future[None]] = []
        self._open: dict[int, _Input] = {}
        self._scratch: mmap.mmap | None = None
        #: The inputs handed over as shards, under a temporary name until finish.
        self._inputs: list[Shard] = []
        #: Each graph's entries; their shard is their file's index in _shards.
        self._entries: dict[str, list[bundle.Entry]] = {}
        self._shards: list[Shard] = []
        self._own: int | None = None
        self._link = True
        self._finished = False

    def prefetch(self, relpaths: Sequence[str], max_bytes: int) -> None:
        """Copy these inputs (relative to frozen_dir) into the state folder, in this order, a
        few ahead of read.

        At most _AHEAD copies wait for their check, each with its file open: a build of a
        thousand models must not run out of file descriptors or fill the page cache early.
        """
        self._queued.extend(relpaths)
        self._max_bytes = max_bytes
        self._copy_ahead()

    def _copy_ahead(self) -> None:
        while self._queued and len(self._copies) < _AHEAD:
            relpath = self._queued.pop(0)
            if relpath not in self._copies:
                self._copies[relpath] = self._pool.submit(self._copy_in, relpath, self._max_bytes)

    def _copy_in(
        self, relpath: str, max_bytes: int
    ) -> tuple[PendingFile | bytearray, snapshot.Taken]:
        with self._frozen.open(relpath, max_bytes) as opened:
            size = opened.identity.size
            if size < _READ_BELOW:
                # Creating a file costs more than reading a small one, and an unchanged input
                # (most of them, in a build of many models) needs no new copy at all.
                buffer = bytearray(size)
                return buffer, snapshot.read_into(opened, memoryview(buffer))
            pending = self._store.start_blob()
            try:
                taken = snapshot.copy(opened, pending.fd)
            except OSError as exc:
                pending.discard()
                raise naming(exc, pending.path) from None
            except BaseException:
                pending.discard()
                raise
            return pending, taken

    def read(self, path: Path, relpath: str, max_bytes: int, *, kept: bool) -> reading.GraphRead:
        """Check-ready bytes of an input: its fresh copy in the state folder (relpath, inside
        frozen_dir), or (kept) its blob at path.

        Every read must end in accept or reject.
        """
        if kept:
            pending = None
            fd = open_kept(path, max_bytes)
        else:
            if relpath not in self._copies:
                # Not copied ahead (read out of the prefetch order): copied now.
                if relpath in self._queued:
                    self._queued.remove(relpath)
                self._copies[relpath] = self._pool.submit(self._copy_in, relpath, max_bytes)
            copy = self._copies.pop(relpath)
            self._copy_ahead()
            copied, taken = copy.result()
            snapshot.warn_without_lease(relpath, taken)
            if isinstance(copied, bytearray):
                return self._open_read(memoryview(copied), path, relpath, None, in_memory=True)
            pending = copied
            fd = pending.fd
        try:
            data = _mapped(fd)
        except OSError as exc:
            if pending is not None:
                pending.discard()
            raise ModelRejected("unreadable", f"cannot map: {exc.strerror or exc}") from exc
        finally:
            if pending is None:
                os.close(fd)
        return self._open_read(data, path, relpath, pending)

    def _open_read(
        self,
        data: memoryview,
        path: Path,
        relpath: str,
        pending: PendingFile | None,
        *,
        in_memory: bool = False,
    ) -> reading.GraphRead:
        try:
            read = reading.open_graph(data, relpath, self._scratch_for(len(data)))
        except BaseException:
            if pending is not None:
                pending.discard()
            raise
        suffix = ".pbtxt" if relpath.endswith(".pbtxt") else ".pb"
        source = path if pending is None else pending.path
        self._open[id(read)] = _Input(suffix, pending, source, in_memory)
        return read

    def _scratch_for(self, file_size: int) -> memoryview:
        """Memory for the aligned copies of the constants, reused from file to file.

        Memory a process touches for the first time costs more than copying into it (page
        faults; on a virtual machine, the host backs the page too).
        """
        size = reading.scratch_size(file_size)
        scratch = self._scratch
        if scratch is None or len(scratch) < size or not _unshared(scratch):
            scratch = self._scratch = reading.new_buffer(size)
        return memoryview(scratch)

    def reject(self, read: reading.GraphRead) -> None:
        """Drop a refused input's copy."""
        opened = self._open.pop(id(read), None)
        if opened is not None and opened.pending is not None:
            opened.pending.discard()

    def accept(self, read: reading.GraphRead, constants: Sequence[LargeConstant]) -> None:
        """Keep an accepted input and record where its large constants are, once per graph.

        An input that its constants fill is their shard, and they stay where they are in it;
        the others' constants are appended to the writer's own data file.
        """
        opened = self._open[id(read)]
        sha256, data = read.sha256, read.data
        if sha256 in self._entries or self._finished:
            self.reject(read)
            return
        shard = None
        filled = data.nbytes and read.payload_bytes >= SHARD_SHARE * data.nbytes
        if filled and any(constant.offset is not None for constant in constants):
            shard = Shard(self._prefix.parent / f".input-{len(self._inputs)}{opened.suffix}")
            self._inputs.append(shard)
        entries = []
        for constant in constants:
            if shard is not None and constant.offset is not None:
                index = self._shard_index(shard)
                offset, size = constant.offset, constant.value.nbytes
                crc = bundle.checksum(constant.value)
            else:
                if self._own is None:
                    self._own = len(self._shards)
                    self._shards.append(Shard(self._data.path))
                index = self._own
                offset, size, crc = self._data.append(constant.value)
            entries.append(
                bundle.Entry(
                    constant.name, constant.dtype, constant.shape, offset, size, crc, index
                )
            )
        self._entries[sha256] = entries
        del self._open[id(read)]
        fresh = opened.pending is not None or opened.in_memory
        if fresh and self._store.has_blob(sha256, opened.suffix, len(data)):
            # Kept already (an unchanged input): versions share that one file.
            if opened.pending is not None:
                opened.pending.discard()
            opened = _Input(opened.suffix, None, self._store.blob_path(sha256, opened.suffix))
        job = self._pool.submit(self._keep, opened, sha256, data, shard)
        self._jobs.append(job)

    def _keep(self, opened: _Input, sha256: str, data: memoryview, shard: Shard | None) -> None:
        if opened.in_memory:
            copy = self._store.start_blob()
            copy.write(data)
            opened = _Input(opened.suffix, copy, copy.path)
        pending = opened.pending
        try:
            if shard is not None:
                self._place(shard, opened.source, data)
        except BaseException:
            if pending is not None:
                pending.discard()
            raise
        if pending is not None:
            # Synced by the other thread, then named (the link above is to the temporary name).
            target = self._store.blob_path(sha256, opened.suffix)
            self._syncs.append(self._sync.submit(pending.seal, target))

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
        """Wait for the inputs' links, raise the first error, and name every data file.

        The scratch memory is let go: the merge and the verification need it more.
        """
        self._finished = True
        self._scratch = None
        for job in self._jobs:
            job.result()
        count = len(self._shards)
        for index, shard in enumerate(self._shards):
            target = bundle.data_path(self._prefix, index, count)
            if shard.path != target:
                os.rename(shard.path, target)
        if self._own is not None:
            self._data.start_sync()

    def close(self) -> None:
        """Stop the threads, drop copies no check took, and wait for every file on disk."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for copy in self._copies.values():
            if not copy.cancelled() and copy.exception() is None:
                copied = copy.result()[0]
                if isinstance(copied, PendingFile):
                    copied.discard()
        self._copies.clear()
        self._frozen.close()
        for opened in self._open.values():
            if opened.pending is not None:
                opened.pending.discard()
        self._open.clear()
        self._scratch = None
        try:
            self._data.close()
        finally:
            self._sync.shutdown(wait=True)
        for job in self._syncs:
            job.result()


def _mapped(fd: int) -> memoryview:
    """The file's bytes, mapped copy-on-write (TensorFlow may feed views of them)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return memoryview(b"")
    return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))


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
