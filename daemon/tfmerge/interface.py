"""A served signature's interface, and the changes to it that would break its clients.

Every client of a signature breaks when an input or output it uses disappears or changes its
dtype or rank, or when a new input is required; a client that ignores a new output does not
notice it. Such a change is refused (``interface_changed``) unless it was declared: the
model's entry now declares other inputs or outputs than the ones its last accepted input was
checked with (a person changed the declaration on purpose), or ``allow_interface_change`` is
set on the entry or for the whole config. The case this is for: a graph cut at a node boundary
still parses, and discovery would then quietly serve fewer outputs. Pure logic; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tfmerge.models import AcceptedModel, ModelRejected, ModelSpec


def breaking_changes(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What changes from previous to current that breaks clients, in words; [] if nothing.

    Both are ``AcceptedModel.tensors``: ``{"inputs": {key: {"name", "dtype", "shape"}},
    "outputs": {...}}``. A rank is compared only when both shapes know it.
    """
    changes = []
    for side in ("inputs", "outputs"):
        before: Mapping[str, Any] = previous.get(side) or {}
        after: Mapping[str, Any] = current.get(side) or {}
        noun = side[:-1]
        for key in sorted(before):
            if key not in after:
                changes.append(f"{noun} {key!r} removed")
                continue
            old, new = before[key], after[key]
            if old.get("dtype") != new.get("dtype"):
                changes.append(f"{noun} {key!r} dtype {old.get('dtype')} -> {new.get('dtype')}")
            old_rank, new_rank = _rank(old), _rank(new)
            if old_rank is not None and new_rank is not None and old_rank != new_rank:
                changes.append(f"{noun} {key!r} rank {old_rank} -> {new_rank}")
        if side == "inputs":
            changes.extend(
                f"input {key!r} added (requests so far do not feed it)"
                for key in sorted(set(after) - set(before))
            )
    return changes


def _rank(tensor: Mapping[str, Any]) -> int | None:
    shape = tensor.get("shape")
    return None if shape is None else len(shape)


def declared_on_purpose(spec: ModelSpec, previous: AcceptedModel) -> bool:
    """Whether the entry declares other tensors than previous was accepted with."""
    if spec.inputs is None or spec.outputs is None:
        return False
    return (dict(spec.inputs), dict(spec.outputs)) != (
        dict(previous.inputs),
        dict(previous.outputs),
    )


def check_interface(
    spec: ModelSpec,
    previous: AcceptedModel | None,
    tensors: Mapping[str, Any],
    *,
    allow_all: bool,
) -> None:
    """Raise ModelRejected (``interface_changed``) for an undeclared breaking change."""
    if previous is None or not previous.tensors:
        return
    if allow_all or spec.allow_interface_change or declared_on_purpose(spec, previous):
        return
    changes = breaking_changes(previous.tensors, tensors)
    if changes:
        raise ModelRejected(
            "interface_changed",
            f"the signature would change in a way that breaks its clients: {'; '.join(changes)}"
            f" (last accepted: {previous.relpath} sha256 {previous.sha256[:12]}). Declare the "
            "new interface in its entry, or set allow_interface_change = true",
            changes=changes,
        )
