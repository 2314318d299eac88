"""Declared digests: the ``NAME.pb.sha256`` file beside a graph, in sha256sum's own format.

``sha256sum model.pb > model.pb.sha256`` writes one line, ``HEX  model.pb`` (``HEX *model.pb``
in binary mode; a name with a backslash or a newline is escaped and the line starts with
``\\``). A graph whose bytes do not have the declared digest is refused (``digest_mismatch``),
so an upload that was cut off, or that overwrote the file in place and stopped half-way,
never replaces what is served. Pure parsing; no I/O, no TensorFlow.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Final

from tfmerge.models import ModelRejected

SHA256_HEX: Final = re.compile(r"^[0-9a-fA-F]{64}$")
#: ``HEX  NAME`` (text mode), ``HEX *NAME`` (binary mode), ``HEX NAME``, or a bare ``HEX``.
_LINE: Final = re.compile(
    r"^(?P<escaped>\\)?(?P<hex>[0-9a-fA-F]{64})(?:(?:  | \*| )(?P<name>.+))?$"
)
#: The name sha256sum writes when it read its standard input.
_STDIN: Final = "-"


def digest_file_of(graph: str) -> str:
    """The digest file that declares graph's digest: ``a/m.pb`` -> ``a/m.pb.sha256``."""
    return graph + ".sha256"


def graph_of(digest_file: str) -> str:
    """The graph a digest file declares: ``a/m.pb.sha256`` -> ``a/m.pb``."""
    return digest_file.removesuffix(".sha256")


def parse_digest_file(data: bytes, graph: str) -> str:
    """The lowercase hex digest a digest file declares for graph (a path, or its name).

    Accepts sha256sum's line for this file, whatever folder sha256sum ran in (only the file
    name is compared), its line for standard input (``-``), and a bare digest. Raises
    ModelRejected (``bad_digest_file``) for anything else, including a line for another file.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelRejected("bad_digest_file", "is not UTF-8 text") from exc
    lines = [line.rstrip("\r") for line in text.split("\n")]
    entries = [line for line in lines if line.strip()]
    expected = PurePosixPath(graph).name
    if len(entries) != 1:
        raise ModelRejected(
            "bad_digest_file",
            f"holds {len(entries)} lines; expected one, as `sha256sum {expected} > "
            f"{expected}.sha256` writes",
        )
    match = _LINE.match(entries[0])
    if match is None:
        raise ModelRejected(
            "bad_digest_file",
            f"is not sha256sum's format (64 hex digits, two spaces, {expected}): "
            f"{entries[0][:100]!r}",
        )
    name = match.group("name")
    if name is not None and match.group("escaped"):
        name = _unescape(name)
    if name is not None and name != _STDIN and PurePosixPath(name).name != expected:
        raise ModelRejected(
            "bad_digest_file", f"declares the digest of {name!r}, not of its graph {expected!r}"
        )
    return match.group("hex").lower()


def _unescape(name: str) -> str:
    """Undo sha256sum's escapes of a name (``\\\\`` and ``\\n``)."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), name)
