"""What counts as an input in ``frozen_dir``, and the one way an input is opened.

Pure rules and one open; no TensorFlow. The watcher, the resolution of models and every
reader of a graph file (the build, its kept copies, ``tfmerge inspect``) go through here.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Final

from tfmerge.models import ModelRejected

#: Suffixes of frozen graphs (binary GraphDef and its text form).
MODEL_SUFFIXES: Final = frozenset({".pb", ".pbtxt"})
#: ``NAME.toml`` next to ``NAME.pb`` declares that model.
SIDECAR_SUFFIX: Final = ".toml"
INPUT_SUFFIXES: Final = MODEL_SUFFIXES | {SIDECAR_SUFFIX}


def is_input_path(path: str) -> bool:
    """Whether ``path`` (relative to the watched root) can be an input of a build.

    Inputs end in ``.pb``, ``.pbtxt`` or ``.toml`` (case matters, as in a shell glob).
    Any path component starting with ``.`` disqualifies the path: that covers dotfiles,
    hidden folders and rsync's ``.<name>.<random>`` temporaries. Upload leftovers
    (``*.part``, ``*.filepart``, ``*.tmp``, ``*.swp``, ``name~``) end in something else,
    so the suffix rule already turns them away. Absolute paths are not relative to the
    root and are refused too.
    """
    if not path or path.startswith("/"):
        return False
    parts = path.split("/")
    if any(not part or part.startswith(".") for part in parts):
        return False
    return PurePosixPath(parts[-1]).suffix in INPUT_SUFFIXES


def size_problem(size: int, limit: int) -> tuple[str, str] | None:
    """The rejection code and reason for an input of this size, or None when it may be read."""
    if size == 0:
        return "empty_file", "the file is empty (an upload that has not started?)"
    if size > limit:
        return "too_large", f"{size} bytes is over max_model_bytes = {limit}"
    return None


def open_input(path: Path, max_bytes: int) -> int:
    """A read-only descriptor of a non-empty input no larger than max_bytes.

    Raises ModelRejected. The size is checked on the opened file, so what is read is what
    was checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        os.close(fd)
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    problem = size_problem(size, max_bytes)
    if problem is not None:
        os.close(fd)
        raise ModelRejected(*problem)
    return fd
