"""Name scopes of a build's graphs: valid, distinct from each other and from tfmerge's own names.

Every graph of a merged SavedModel lives under its own name scope, and tfmerge adds nodes of
its own at the top level (the main op, the saver's restore nodes). Scopes are chosen for the
whole build at once: a scope chosen for one signature in isolation can equal another
signature used as it is (``"a b"`` becomes ``a_b_<digest>``, which is a valid signature name
too), or tfmerge's own ``tfmerge_save``. Worker side, no TensorFlow.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

from tfmerge.build.merge import MAIN_OP_NAME
from tfmerge.build.variables import SAVER_SCOPE

#: Top-level names of the merged graph that belong to tfmerge, never to an input's scope.
RESERVED = frozenset({MAIN_OP_NAME, SAVER_SCOPE})
_INVALID_SCOPE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def _usable_as_is(signature: str) -> bool:
    return (
        signature[:1].isascii()
        and signature[:1].isalnum()
        and not _INVALID_SCOPE_CHARS.search(signature)
    )


def _with_digest(signature: str, width: int) -> str:
    """The signature's valid characters, and a digest of it so that "a b" and "a_b" differ."""
    cleaned = _INVALID_SCOPE_CHARS.sub("_", signature)
    digest = hashlib.sha256(signature.encode("utf-8", "surrogatepass")).hexdigest()[:width]
    prefix = cleaned if cleaned[:1].isalnum() and cleaned[:1].isascii() else f"m_{cleaned}"
    return f"{prefix}_{digest}"


def assign(signatures: Iterable[str]) -> Mapping[str, str]:
    """One scope per signature, unique within the build and apart from ``RESERVED``.

    A signature that is a valid scope is its own scope (node names then read as the model's
    name); any other gets its invalid characters replaced and a digest appended, lengthened
    until it is free. The result depends only on the set of signatures.
    """
    names = sorted(set(signatures))
    taken = set(RESERVED)
    scopes: dict[str, str] = {}
    for name in names:
        if _usable_as_is(name) and name not in taken:
            scopes[name] = name
            taken.add(name)
    for name in names:
        if name in scopes:
            continue
        candidate = _with_digest(name, 8)
        width = 8
        while candidate in taken:
            width += 1
            candidate = (
                _with_digest(name, width) if width <= 64 else f"{_with_digest(name, 64)}_{width}"
            )
        scopes[name] = candidate
        taken.add(candidate)
    return scopes
