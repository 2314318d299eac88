"""A direct writer of TensorFlow's checkpoint format V2 (a "tensor bundle"). Worker side.

A bundle is one or more data shards, ``PREFIX.data-0000I-of-0000N``, holding the tensors'
raw bytes, and ``PREFIX.index``, an SSTable (LevelDB's table format, as TensorFlow's
``table_builder.cc`` writes it) mapping each tensor name to a ``BundleEntryProto`` (dtype,
shape, shard, offset, size, masked crc32c of the bytes), plus a ``BundleHeaderProto`` (the
number of shards) under the empty key. A reader reads only the bytes an entry points at, so
a shard may hold other bytes too: an input graph file serves as the shard of its own
constants, their entries pointing into it.

TensorFlow's SaveV2 copies every tensor into a tensor, then into its own write buffer; here
the bytes go from the caller's buffer to the file with ``os.write`` and are checksummed in
place, so a large constant is read once and written once.

Only numeric dtypes are written: strings and variants have their own framing in the data
file, and nothing the merge moves out of a graph needs them.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import google_crc32c

from tfmerge.build.wire import encode_varint

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Buffer

#: Bytes per element of each DataType enum value whose tensors are stored as their raw bytes.
#: TensorFlow's DT_STRING (7), DT_RESOURCE (20) and DT_VARIANT (21) are framed differently.
ITEM_SIZES: dict[int, int] = {
    1: 4,  # float32
    2: 8,  # float64
    3: 4,  # int32
    4: 1,  # uint8
    5: 2,  # int16
    6: 1,  # int8
    8: 8,  # complex64
    9: 8,  # int64
    10: 1,  # bool
    11: 1,  # qint8
    12: 1,  # quint8
    13: 4,  # qint32
    14: 2,  # bfloat16
    15: 2,  # qint16
    16: 2,  # quint16
    17: 2,  # uint16
    18: 16,  # complex128
    19: 2,  # float16
    22: 4,  # uint32
    23: 8,  # uint64
    24: 1,  # float8_e5m2
    25: 1,  # float8_e4m3fn
    26: 1,  # float8_e4m3fnuz
    27: 1,  # float8_e4m3b11fnuz
    28: 1,  # float8_e5m2fnuz
    29: 1,  # int4, one element per byte in a tensor's memory
    30: 1,  # uint4
    31: 1,  # int2
    32: 1,  # uint2
    33: 1,  # float4_e2m1fn
}

_INDEX_SUFFIX = ".index"

# The SSTable constants of TensorFlow's lib/io: table_options.h, format.h.
_BLOCK_SIZE = 256 << 10
_NO_COMPRESSION = b"\x00"
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_HANDLES_SIZE = 40  # two BlockHandles of at most 10 + 10 varint bytes each
_CRC_MASK_DELTA = 0xA282EAD8

# Linux writes at most 0x7ffff000 bytes per call.
_WRITE_CHUNK = 1 << 30

_BUNDLE_VERSION = 1


def data_path(prefix: Path, shard: int = 0, shards: int = 1) -> Path:
    """Where data shard ``shard`` of ``shards`` of the bundle at ``prefix`` lives."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards} does not exist")
    return Path(f"{prefix}.data-{shard:05d}-of-{shards:05d}")


def index_path(prefix: Path) -> Path:
    """Where the index (the SSTable) of the bundle at ``prefix`` lives."""
    return Path(f"{prefix}{_INDEX_SUFFIX}")


def masked_crc32c(crc: int) -> int:
    """The crc32c as TensorFlow stores it in entries and block trailers (``crc32c::Mask``)."""
    crc &= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class Entry:
    """One tensor of the bundle: where its bytes are in the data file, and what they are."""

    key: str  # the tensor's name in the bundle
    dtype: int  # a tensorflow DataType enum value, one of ITEM_SIZES
    shape: tuple[int, ...]
    offset: int  # in the data file
    size: int  # bytes
    crc32c: int  # unmasked crc32c of the bytes
    shard: int = 0  # which data file


def _byte_view(data: Buffer | np.ndarray) -> memoryview:
    """A flat view of ``data``'s bytes, no copy, whose ``obj`` is a numpy uint8 array.

    google_crc32c takes only buffers that need no release (not a memoryview or bytearray);
    a numpy array qualifies, and numpy can view any C-contiguous buffer, whatever its format.
    """
    import numpy as np

    try:
        return memoryview(np.frombuffer(data, dtype=np.uint8))
    except (ValueError, BufferError) as exc:
        raise ValueError(f"tensor bytes must be one C-contiguous buffer: {exc}") from exc


def checksum(data: Buffer | np.ndarray) -> int:
    """The unmasked crc32c of ``data``'s bytes (one C-contiguous buffer), read in place."""
    return int(google_crc32c.value(_byte_view(data).obj))


class DataWriter:
    """Appends tensors' raw bytes to PREFIX.data-00000-of-00001 (created on first use).

    ``start_sync`` seals the file: the fdatasync runs in a thread while the caller writes the
    index and the rest of the model, and ``close`` waits for it. Without ``start_sync``,
    ``close`` does not sync.
    """

    def __init__(self, prefix: Path) -> None:
        self._path = data_path(prefix)
        self._fd: int | None = None
        self._closed = False
        self._failed: OSError | None = None
        self._written = 0
        self._sync_thread: threading.Thread | None = None
        self._sync_error: OSError | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def bytes_written(self) -> int:
        return self._written

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> int:
        if self._fd is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
            )
        return self._fd

    def append(self, data: Buffer | np.ndarray) -> tuple[int, int, int]:
        """Writes ``data``'s bytes at the end of the file: returns (offset, size, crc32c).

        The checksum is taken from ``data`` itself, not from a copy: ``data`` must not change
        until this returns.
        """
        if self._closed:
            raise RuntimeError(f"{self._path} is already closed")
        if self._sync_thread is not None:
            raise RuntimeError(f"{self._path} is being synced: appending is over")
        if self._failed is not None:
            # A write that failed half-way left bytes no entry accounts for.
            raise RuntimeError(f"an earlier write to {self._path} failed") from self._failed
        view = _byte_view(data)
        fd = self._open()
        size = view.nbytes
        crc = int(google_crc32c.value(view.obj))
        offset = self._written
        done = 0
        try:
            while done < size:
                done += os.write(fd, view[done : done + _WRITE_CHUNK])
        except OSError as exc:
            self._failed = exc
            raise
        self._written += size
        return offset, size, crc

    def start_sync(self) -> None:
        """Starts the fdatasync of everything appended; later appends are refused."""
        if self._closed:
            raise RuntimeError(f"{self._path} is already closed")
        if self._sync_thread is not None:
            return
        fd = self._open()
        thread = threading.Thread(
            target=self._sync, args=(fd,), name="tfmerge-bundle-sync", daemon=True
        )
        self._sync_thread = thread
        thread.start()

    def _sync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self._sync_error = exc

    def close(self) -> None:
        """Waits for the sync (raising its error, if any) and closes the file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._sync_thread is not None:
                self._sync_thread.join()
            if self._sync_error is not None:
                raise self._sync_error
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class _BlockBuilder:
    """A table block with a restart point at every entry: no key shares a prefix.

    Prefix sharing would shrink the index by a few kilobytes; full keys keep the writer
    obviously right, and a reader's binary search then lands on every entry directly.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._restarts: list[int] = []

    def add(self, key: bytes, value: bytes) -> None:
        self._restarts.append(len(self._buf))
        self._buf += (
            encode_varint(0) + encode_varint(len(key)) + encode_varint(len(value)) + key + value
        )

    @property
    def empty(self) -> bool:
        return not self._restarts

    def size_estimate(self) -> int:
        return len(self._buf) + 4 * len(self._restarts) + 4

    def finish(self) -> bytes:
        # An empty block still has its first restart point at 0, as TensorFlow writes it.
        restarts = self._restarts or [0]
        return bytes(self._buf) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def _sstable(items: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The table file for ``items``, which are sorted by key with no key twice."""
    out = bytearray()

    def write_block(contents: bytes) -> bytes:
        handle = encode_varint(len(out)) + encode_varint(len(contents))
        crc = google_crc32c.extend(google_crc32c.value(contents), _NO_COMPRESSION)
        out.extend(contents)
        out.extend(_NO_COMPRESSION + struct.pack("<I", masked_crc32c(crc)))
        return handle

    index = _BlockBuilder()
    block = _BlockBuilder()
    for position, (key, value) in enumerate(items):
        block.add(key, value)
        if block.size_estimate() >= _BLOCK_SIZE or position == len(items) - 1:
            # The block's own last key separates it from the next block: it is >= every
            # key in this block and < every key after it, which is all a reader's seek needs.
            index.add(key, write_block(block.finish()))
            block = _BlockBuilder()
    metaindex_handle = write_block(_BlockBuilder().finish())
    index_handle = write_block(index.finish())
    footer = (metaindex_handle + index_handle).ljust(_FOOTER_HANDLES_SIZE, b"\x00")
    out.extend(footer + struct.pack("<Q", _TABLE_MAGIC))
    return bytes(out)


def _check(entry: Entry) -> None:
    item_size = ITEM_SIZES.get(entry.dtype)
    if item_size is None:
        raise ValueError(
            f"tensor {entry.key!r}: dtype {entry.dtype} is not a numeric TensorFlow dtype"
        )
    if any(dim < 0 for dim in entry.shape):
        raise ValueError(f"tensor {entry.key!r}: shape {entry.shape} has a negative dimension")
    expected = prod(entry.shape) * item_size
    if entry.size != expected:
        raise ValueError(
            f"tensor {entry.key!r}: {entry.size} bytes, but shape {entry.shape} of dtype "
            f"{entry.dtype} takes {expected}"
        )
    if entry.offset < 0 or not 0 <= entry.crc32c <= 0xFFFFFFFF:
        raise ValueError(f"tensor {entry.key!r}: bad offset or crc32c in {entry}")


def write_index(prefix: Path, entries: Sequence[Entry], shards: int = 1) -> Path:
    """Writes PREFIX.index for ``entries`` (any order) in ``shards`` data files; returns its path.

    Not synced: the version is synced as a whole when it is published, and a sync here would
    wait for the journal to take the data file with it.

    Raises ValueError on a duplicate or empty key (the empty key holds the header), a
    non-numeric dtype, a size that does not match the shape, or a shard out of range.
    """
    from tensorflow.core.framework import tensor_shape_pb2
    from tensorflow.core.protobuf import tensor_bundle_pb2

    by_key: dict[bytes, Entry] = {}
    for entry in entries:
        if not entry.key:
            raise ValueError("a tensor cannot be named by the empty key: the header is there")
        key = entry.key.encode()
        if key in by_key:
            raise ValueError(f"tensor {entry.key!r} is in the bundle twice")
        _check(entry)
        if not 0 <= entry.shard < shards:
            raise ValueError(f"tensor {entry.key!r}: shard {entry.shard} of {shards}")
        by_key[key] = entry

    header = tensor_bundle_pb2.BundleHeaderProto(
        num_shards=shards,
        endianness=(
            tensor_bundle_pb2.BundleHeaderProto.LITTLE
            if sys.byteorder == "little"
            else tensor_bundle_pb2.BundleHeaderProto.BIG
        ),
    )
    header.version.producer = _BUNDLE_VERSION
    items = [(b"", header.SerializeToString())]
    for key in sorted(by_key):
        entry = by_key[key]
        proto = tensor_bundle_pb2.BundleEntryProto(
            dtype=entry.dtype,
            shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=dim) for dim in entry.shape]
            ),
            shard_id=entry.shard,
            offset=entry.offset,
            size=entry.size,
            crc32c=masked_crc32c(entry.crc32c),
        )
        items.append((key, proto.SerializeToString()))
    table = _sstable(items)

    path = index_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(table)
    return path
