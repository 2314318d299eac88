"""A frozen graph made ready for its check and its merge, whatever way it was frozen. Worker side.

In order, on the graph as read:

1. Device pins are cleared (devices.py), top level and in function bodies, unless the model
   keeps them (``keep_devices``): the check runs the cleared graph, and the merge merges it.
2. Large constants in function bodies are lifted to the top level (lifting.py).
3. The constants that move into ``variables/`` are set aside as placeholders
   (constants.split_large_constants): those of LARGE_CONSTANT_BYTES or more, or, when the
   input will be the data file of its own constants (writer.SHARD_SHARE), every one of
   SHARD_CONSTANT_BYTES or more, whose bytes that file holds already.

When constants were lifted, the check runs the graph as frozen (its function constants in
place) as the source, so that the merged model is compared with what the file computes, not
with the rewrite. docs/graphs.md lists these quirks and the ones refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfmerge.build import constants, devices, lifting, reading
from tfmerge.build.writer import SHARD_SHARE
from tfmerge.logs import get_logger
from tfmerge.models import LargeConstant, ModelSpec


@dataclass
class Prepared:
    #: The graph the merge merges, its moved constants as placeholders.
    light: Any
    #: The moved constants, fed to those placeholders.
    large: list[LargeConstant]
    #: The graph the check runs as the source, and the constants it is fed: light and large,
    #: or the graph before its function constants were lifted.
    source: Any
    source_constants: list[LargeConstant]


def prepare(read: reading.GraphRead, spec: ModelSpec) -> Prepared:
    """Steps 1 to 3 on read.graph_def, changed in place; read.payloads keeps only the moved
    constants' bytes."""
    log = get_logger()
    graph_def = read.graph_def
    if not spec.keep_devices:
        pinned = devices.pinned_devices(graph_def)
        if pinned:
            devices.clear_devices(graph_def)
            log.info("devices_cleared", signature=spec.signature, file=spec.relpath, devices=pinned)
    as_frozen = _copy_if_lifting(graph_def, read.payloads)
    report = lifting.lift_function_constants(graph_def, read.payloads, read.offsets)
    _log_lifting(spec, report)
    threshold = _threshold(read)
    light, large = constants.split_large_constants(
        graph_def, read.payloads, read.offsets, threshold
    )
    moved = {c.name for c in large if c.offset is not None}
    for name in [name for name in read.payloads if name not in moved]:
        del read.payloads[name]
        read.offsets.pop(name, None)
    if as_frozen is None or not report.lifted:
        return Prepared(light, large, light, large)
    graph, payloads = as_frozen
    lifting.restore_function_payloads(graph, payloads, {})
    source, source_constants = constants.split_large_constants(graph, payloads, None, threshold)
    return Prepared(light, large, source, source_constants)


def _copy_if_lifting(graph_def: Any, payloads: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """The graph as frozen and the payloads set aside from it, when some may be lifted.

    Cheap: the constants' bytes are not in the graph (wire.split_payloads set them aside).
    """
    if not any(
        constants.is_large_constant(node)
        for function in graph_def.library.function
        for node in function.node_def
    ):
        return None
    copy = type(graph_def)()
    copy.CopyFrom(graph_def)
    return copy, dict(payloads)


def _threshold(read: reading.GraphRead) -> int:
    """From how many bytes a constant moves: fewer when the input is its own data shard.

    The same rule as Writer.accept's, which then sees only the moved constants' bytes.
    """
    if not read.offsets or not read.data.nbytes:
        return constants.LARGE_CONSTANT_BYTES
    nodes = {node.name: node for node in read.graph_def.node if node.name in read.offsets}
    large = sum(
        len(payload)
        for name, payload in read.payloads.items()
        if name in nodes and constants.is_large_constant(nodes[name])
    )
    if large >= SHARD_SHARE * read.data.nbytes:
        return constants.SHARD_CONSTANT_BYTES
    return constants.LARGE_CONSTANT_BYTES


def _log_lifting(spec: ModelSpec, report: lifting.Report) -> None:
    log = get_logger()
    if report.lifted:
        log.info(
            "function_constants_lifted",
            signature=spec.signature,
            file=spec.relpath,
            constants=[
                {"function": c.function, "node": c.node, "bytes": c.nbytes} for c in report.lifted
            ],
        )
    for kept in report.kept:
        log.warning(
            "function_constants_kept",
            signature=spec.signature,
            file=spec.relpath,
            function=kept.function,
            node=kept.node,
            bytes=kept.nbytes,
            reason=f"left in saved_model.pb: {kept.reason}",
        )
