"""Records kept in pack files: many small records in one file per write. No TensorFlow here.

The verdicts of a build's checks (build/verdicts.py) are a few kilobytes per model and a build
of many models writes hundreds of them: one file each would cost a file creation and a rename
per model, which on a busy file system cost more than the checks they save. A build writes
its new records as one pack file instead, named so that packs sort in the order they were
written; a later record of the same key wins.

A pack is lines of ``HEADER<TAB>BODY``: the header is JSON with the record's key, the sha256 of
the input it is about (the blob it is removed with) and the sha256 of the body; the body is
any bytes without a newline. Packs are written through a rename but not synced: a line that a
power loss cut or damaged fails its checksum and is skipped, which only costs a miss.
``prune`` keeps the records of the inputs still in use, in one pack.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tfmerge.folders.fs import write_replace

_SUFFIX = ".pack"
#: Beyond this many packs, prune merges them into one even if every record is still in use.
_MAX_PACKS = 8


@dataclass(frozen=True)
class Record:
    key: str
    #: The sha256 of the input the record is about.
    input_sha256: str
    body: bytes


class Packs:
    """The pack files of one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def records(self) -> dict[str, Record]:
        """Every intact record, by key (the newest pack's record of a key wins)."""
        found: dict[str, Record] = {}
        for path in self._packs():
            for record in _read(path):
                found[record.key] = record
        return found

    def write(self, records: Iterable[Record]) -> None:
        """One new pack holding records (none written when there are none)."""
        lines = [_line(record) for record in records]
        if lines:
            write_replace(self.folder / _new_name(), b"".join(lines))

    def prune(self, keep_inputs: Collection[str]) -> None:
        """Drop the records of inputs not in keep_inputs; leave at most one pack when any
        was dropped or when there are too many."""
        self._rewrite(lambda record: record.input_sha256 in keep_inputs, _MAX_PACKS)

    def forget(self, keys: Collection[str]) -> None:
        """Drop the records of keys, leaving the others in one pack."""
        self._rewrite(lambda record: record.key not in keys, None)

    def _rewrite(self, keep: Callable[[Record], bool], max_packs: int | None) -> None:
        """The records keep accepts, in one pack, when it refused any (or when there are
        more than max_packs packs)."""
        packs = self._packs()
        records = {}
        dropped = False
        for path in packs:
            for record in _read(path):
                if keep(record):
                    records[record.key] = record
                else:
                    dropped = True
        if not dropped and (max_packs is None or len(packs) <= max_packs):
            return
        self.write(records.values())
        for path in packs:
            path.unlink(missing_ok=True)

    def _packs(self) -> list[Path]:
        try:
            return sorted(p for p in self.folder.iterdir() if p.name.endswith(_SUFFIX))
        except OSError:
            return []


def _new_name() -> str:
    # Sorts in the order packs are written; the token keeps two writers apart.
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}{_SUFFIX}"


def _line(record: Record) -> bytes:
    if b"\n" in record.body:
        raise ValueError("a record's body is one line")
    header = {
        "key": record.key,
        "input": record.input_sha256,
        "sha256": hashlib.sha256(record.body).hexdigest(),
    }
    return json.dumps(header).encode() + b"\t" + record.body + b"\n"


def _read(path: Path) -> Iterator[Record]:
    try:
        data = path.read_bytes()
    except OSError:
        return
    for line in data.split(b"\n"):
        header_text, tab, body = line.partition(b"\t")
        if not tab:
            continue
        try:
            header = json.loads(header_text)
            key, input_sha256, digest = header["key"], header["input"], header["sha256"]
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(key, str) or not isinstance(input_sha256, str):
            continue
        if digest != hashlib.sha256(body).hexdigest():
            continue
        yield Record(key, input_sha256, body)
