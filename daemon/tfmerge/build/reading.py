"""Read one graph file once: into reused memory, hashed while it is parsed. Worker side.

The bytes are hashed on another core while the GraphDef is parsed without its large
constants (wire.split_payloads), and each large constant's bytes are left in place, or
copied once to an address TensorFlow can feed without copying them again.
"""

from __future__ import annotations

import hashlib
import mmap
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge import snapshot
from tfmerge.build import constants, wire
from tfmerge.build.parse import parse_graph_def
from tfmerge.inputs import Opened, open_path
from tfmerge.models import ModelRejected

#: Where a large constant's bytes start in the read buffer: TensorFlow feeds an array this
#: aligned without copying it (Eigen's widest alignment).
_FEED_ALIGNMENT = 64
#: Files from this size are hashed by a thread of their own, while they are parsed.
_HASH_ASIDE_BYTES = 4 << 20


@dataclass
class GraphRead:
    """A graph file read once: its digest, its bytes and its GraphDef.

    For a binary GraphDef the bytes of every constant that may move into ``variables/``
    (constants.SHARD_CONSTANT_BYTES or more) are not in graph_def: ``payloads`` maps their
    node names (wire.function_key for those in function bodies) to views of ``data``, and
    ``offsets`` to where those bytes start in the file. quirks.prepare puts back the ones
    that stay in the graph.
    """

    sha256: str
    data: memoryview
    graph_def: Any
    payloads: dict[str, memoryview] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        """How many of the file's bytes are large constants' contents."""
        return sum(len(payload) for payload in self.payloads.values())


def new_buffer(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory to read a graph file into, its pages already mapped.

    Mapping every page in one call (MAP_POPULATE) costs about half of what a page fault per
    page costs when the file is read into it: the buffer is filled right after.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(size, 1), flags=flags)


def scratch_size(file_size: int) -> int:
    """What open_graph needs for aligned copies of a file's constants, padding included."""
    most_payloads = file_size // constants.SHARD_CONSTANT_BYTES + 1
    return file_size + _FEED_ALIGNMENT * (most_payloads + 1)


def buffer_size(file_size: int) -> int:
    """What read_graph needs for a file: the file and a scratch area for open_graph."""
    return file_size + scratch_size(file_size)


def read_graph(path: Path, relpath: str, max_bytes: int) -> GraphRead:
    """Read a graph file a person named (``tfmerge inspect``); see read_opened."""
    return read_opened(open_path(path, max_bytes), relpath)


def read_opened(opened: Opened, relpath: str) -> GraphRead:
    """Read an opened graph file into one new buffer, then open_graph it, the buffer's rest
    as scratch. Closes opened. The bytes are taken under a read lease (tfmerge.snapshot): a
    file open for writing, or one that changes meanwhile, is refused."""
    with opened:
        size = opened.identity.size
        buffer = new_buffer(buffer_size(size))
        view = memoryview(buffer)
        try:
            snapshot.read_into(opened, view)
        except OSError as exc:
            raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    return open_graph(view[:size], relpath, view[size:])


def open_graph(data: memoryview, relpath: str, scratch: memoryview) -> GraphRead:
    """Hash a graph file's bytes and parse them without copying its constants.

    Every large constant's bytes end up aligned for TensorFlow to feed them without a copy, by
    one copy each into scratch, of at least scratch_size(len(data)) bytes (cheaper than
    TensorFlow's own copy into fresh memory, and data stays as it is for the hash).
    """
    # Hashed on another core while the graph is parsed: nothing below writes to data.
    digest = _Digest(data)
    try:
        stripped: bytes | memoryview = data
        found: list[wire.Payload] = []
        if not relpath.endswith(".pbtxt"):
            try:
                stripped, found = wire.split_payloads(data, constants.SHARD_CONSTANT_BYTES)
            except wire.Unusual:
                stripped, found = data, []
        graph_def = parse_graph_def(data, relpath, stripped if found else None)
        payloads = _aligned(scratch, [(p.node, data[p.start : p.stop]) for p in found])
    except ModelRejected as exc:
        # The bytes were read whole: a declared digest can still say they are the wrong ones.
        exc.sha256 = digest.join()
        raise
    finally:
        sha256 = digest.join()
    offsets = {p.node: p.start for p in found}
    return GraphRead(sha256, data, graph_def, payloads, offsets)


def _aligned(
    scratch: memoryview, payloads: Sequence[tuple[str, memoryview]]
) -> dict[str, memoryview]:
    """Each payload, copied into scratch at an aligned address where it is not aligned."""
    result = {}
    spare = 0
    base = np.frombuffer(scratch, np.uint8).ctypes.data if len(scratch) else 0
    for name, payload in payloads:
        address = np.frombuffer(payload, np.uint8).ctypes.data if len(payload) else 0
        if address % _FEED_ALIGNMENT == 0:
            result[name] = payload
            continue
        spare += -(base + spare) % _FEED_ALIGNMENT
        slot = scratch[spare : spare + len(payload)]
        slot[:] = payload
        result[name] = slot
        spare += len(payload)
    return result


class _Digest:
    """sha256 of a buffer, computed on another core while the graph is parsed.

    A small buffer is hashed at once: starting a thread costs more than hashing it.
    """

    def __init__(self, data: memoryview) -> None:
        self._hash = hashlib.sha256()
        self._thread = None
        if len(data) < _HASH_ASIDE_BYTES:
            self._hash.update(data)
            return
        self._thread = threading.Thread(target=self._hash.update, args=(data,), name="sha256")
        self._thread.start()

    def join(self) -> str:
        if self._thread is not None:
            self._thread.join()
        return self._hash.hexdigest()
