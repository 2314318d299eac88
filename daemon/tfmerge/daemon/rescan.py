"""What changed in ``frozen_dir`` while no event could say so: compare two stat snapshots.

The watcher can miss changes: the kernel's event queue overflows, a folder moved into the tree
has no watch yet, ``frozen_dir`` itself is removed and created again. After each of these the
daemon watches again and rescans: it stats every input (no byte is read) and compares with the
snapshot it took when the last batch settled. A file that is new or whose inode, size, mtime or
ctime differs is a ``found`` change; a file that is gone is a ``deleted`` one. They go to the
debouncer like any event, so the batch settles as usual. No TensorFlow here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from tfmerge.daemon.debounce import Change
from tfmerge.inputs import is_input_path

#: inode, size, mtime_ns, ctime_ns of one input.
FileKey = tuple[int, int, int, int]
Snapshot = dict[str, FileKey]


def snapshot(root: Path) -> Snapshot:
    """Every input under root (relative path -> FileKey); links are not followed, hidden
    folders not entered. Empty when root is missing."""
    found: Snapshot = {}
    for relpath, st in _walk(str(root), ""):
        found[relpath] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return found


def changes(before: Snapshot, after: Snapshot) -> list[Change]:
    """The changes that turn before into after, sorted by path."""
    found = [Change(path, "found") for path, key in after.items() if before.get(path) != key]
    gone = [Change(path, "deleted") for path in before if path not in after]
    return sorted([*found, *gone], key=lambda change: change.path)


def _walk(folder: str, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # missing or unreadable: nothing to see there
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relpath = prefix + entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(entry.path, relpath + "/")
        elif is_input_path(relpath):
            yield relpath, st
