"""Large constants: found in a graph, set aside as placeholders, fed back as arrays. Worker side.

A frozen graph's weights are its Const nodes. The large ones are kept out of every graph
TensorFlow builds during a check (fed instead, from the file's own bytes) and moved into
the merged model's ``variables/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tfmerge.build import tfcore
from tfmerge.models import LargeConstant, ModelRejected

#: A numeric Const at least this large is kept out of every TensorFlow graph a check builds
#: (it is fed instead) and moved into the merged model's ``variables/``: TensorFlow copies in-graph
#: constants several times on import and on session creation.
LARGE_CONSTANT_BYTES = 1 << 20
#: In an input that is the data file of its own large constants (writer.SHARD_SHARE), every
#: numeric Const of at least this many bytes becomes a restored variable as well: its bytes are
#: in that file already, and inside saved_model.pb they would be stored a second time. Smaller
#: ones stay in the graph: each variable costs the loader about as much time as it saves, and
#: below this size more (docs/benchmarks-field.md: from 1 KiB, a load took 12% more CPU).
SHARD_CONSTANT_BYTES = 4 << 10


_TYPED_VALUE_FIELDS = (
    "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
    "bool_val", "dcomplex_val", "half_val", "resource_handle_val", "variant_val",
    "uint32_val", "uint64_val",
)  # fmt: skip


def is_large_constant(node: Any, threshold: int = LARGE_CONSTANT_BYTES) -> bool:
    """A numeric Const whose bytes, all in tensor_content, reach threshold.

    Decided from the shape and dtype: reading tensor_content would copy all of its bytes.
    """
    if node.op != "Const" or "value" not in node.attr:
        return False
    value = node.attr["value"].tensor
    dtype = tfcore.dtypes.as_dtype(value.dtype)
    if dtype == tfcore.dtypes.string or dtype.is_quantized or value.tensor_shape.unknown_rank:
        return False
    elements = 1
    for dim in value.tensor_shape.dim:
        elements *= max(dim.size, 0)
    if elements * dtype.size < threshold:
        return False
    # A constant written as typed values (a splat of one value, say) has no tensor_content.
    return not any(len(getattr(value, field)) for field in _TYPED_VALUE_FIELDS)


def constant_array(node: Any, payload: memoryview | None = None) -> np.ndarray:
    """The value of a large Const as an array: a view of ``payload``, the tensor_content that
    read_graph left out of the node, or else one copy of the node's own tensor_content."""
    value = node.attr["value"].tensor
    content = value.tensor_content if payload is None else payload
    dtype = tfcore.dtypes.as_dtype(value.dtype)
    shape = [d.size for d in value.tensor_shape.dim]
    try:
        array: np.ndarray = np.frombuffer(content, dtype=dtype.as_numpy_dtype)
        return array.reshape(shape)
    except ValueError as exc:
        raise ModelRejected(
            "invalid_graph",
            f"constant {node.name!r} holds {len(content)} bytes, not a {dtype.name} {shape}",
        ) from exc


def split_large_constants(
    graph_def: Any,
    payloads: Mapping[str, memoryview] | None = None,
    offsets: Mapping[str, int] | None = None,
    threshold: int = LARGE_CONSTANT_BYTES,
) -> tuple[Any, list[LargeConstant]]:
    """The graph with every large Const replaced by a Placeholder of the same name and type.

    Running it with each such placeholder fed the constant's value computes exactly what the
    frozen graph computes, without TensorFlow copying those bytes into the graph. The
    placeholders keep the constants' private attributes (colocation): the merge turns them into
    variable reads. ``payloads`` holds the contents read_graph left out of graph_def, and
    ``offsets`` where they are in the file. A constant is large from ``threshold`` bytes.
    """
    payloads = payloads or {}
    offsets = offsets or {}
    light = type(graph_def)()
    light.versions.CopyFrom(graph_def.versions)
    light.library.CopyFrom(graph_def.library)
    large = []
    for node in graph_def.node:
        payload = payloads.get(node.name)
        if payload is not None and not is_large_constant(node, threshold):
            # Not a constant the merge moves (quantized, say): its bytes go back in the graph.
            node.attr["value"].tensor.tensor_content = bytes(payload)
            payload = None
        if is_large_constant(node, threshold):
            value = node.attr["value"].tensor
            placeholder = light.node.add(name=node.name, op="Placeholder", device=node.device)
            placeholder.input.extend(node.input)
            placeholder.attr["dtype"].type = value.dtype
            placeholder.attr["shape"].shape.CopyFrom(value.tensor_shape)
            for key, attr in node.attr.items():
                if key.startswith("_"):
                    placeholder.attr[key].CopyFrom(attr)
            array = constant_array(node, payload)
            offset = offsets.get(node.name) if payload is not None else None
            large.append(LargeConstant(node.name, value.dtype, array.shape, array, offset))
        else:
            light.node.add().CopyFrom(node)
    return light, large
