"""Import a checked graph into TensorFlow and read its interface. Worker side.

The tensors' types and shapes for the SignatureDef, the inputs and outputs of a discovered
model (its placeholders, and the tensors nothing consumes), and its table initializers. The
graph is a C API graph (capi.Graph): TensorFlow's own importer and shape inference, without a
Python object per node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tfmerge.build import capi
from tfmerge.models import ModelRejected, TensorSig

#: Ops that fill a lookup table. A frozen graph keeps them, but nothing runs them unless the
#: merged SavedModel names them in its init op (the naive merge's "Table not initialized").
INITIALIZER_OPS = frozenset(
    {
        "InitializeTable",
        "InitializeTableV2",
        "InitializeTableFromTextFile",
        "InitializeTableFromTextFileV2",
        "InitializeTableFromDataset",
        "LookupTableImport",
        "LookupTableImportV2",
    }
)
#: Ops never offered as discovered outputs: they produce nothing a client could want.
_NOT_OUTPUTS = frozenset({"NoOp", "Const", "Placeholder", "Assert", "Print", "PrintV2"})


#: DataType enum values of handles (resource, variant): no client can be sent one.
_HANDLE_TYPES = frozenset({20, 21})

#: Ops a signature input normally is; feeding any other tensor overrides what computes it.
INPUT_OPS = frozenset({"Placeholder", "PlaceholderWithDefault"})


def initializer_nodes(graph_def: Any) -> list[str]:
    return [node.name for node in graph_def.node if node.op in INITIALIZER_OPS]


def import_graph(graph_def: Any) -> capi.Graph:
    """Import a GraphDef (or its serialized bytes) into a fresh graph; refuses unknown ops and
    dangling references."""
    graph = capi.Graph()
    try:
        serialized = graph_def if isinstance(graph_def, bytes) else graph_def.SerializeToString()
        graph.import_graph_def(serialized)
    except capi.TFError as exc:
        graph.close()
        reason = f"TensorFlow cannot import the graph: {exc.message}"
        raise ModelRejected("invalid_graph", reason) from exc
    return graph


def tensor_sig(graph: capi.Graph, name: str) -> TensorSig:
    """A tensor's type and shape, by its full name (``op:index``; a bare op name is not one)."""
    op, _, index = name.rpartition(":")
    missing = ModelRejected("missing_tensor", f"the graph has no tensor {name!r}")
    if not op or not index.isdigit():
        raise missing
    try:
        dtype, shape = graph.dtype(name), graph.shape(name)
    except KeyError as exc:
        raise missing from exc
    return TensorSig(name=name, dtype=dtype, shape=shape)


def op_type(graph: capi.Graph, name: str) -> str:
    """The type of the op that produces a tensor (one tensor_sig found)."""
    return graph.operation_type(name)


def _short_keys(names: Sequence[str]) -> dict[str, str]:
    """Signature keys for inferred tensors: the last name component, the full name on a clash."""
    short = [n.rsplit(":", 1)[0].rsplit("/", 1)[-1] for n in names]
    keys = {}
    for name, key in zip(names, short, strict=True):
        op, index = name.rsplit(":", 1)
        unique = short.count(key) == 1
        base = key if unique else op.replace("/", "_")
        keys[base if index == "0" else f"{base}_{index}"] = name
    return keys


def infer_signature(
    graph: capi.Graph, constants: Sequence[str] = ()
) -> tuple[dict[str, str], dict[str, str]]:
    """Inputs from the placeholders, outputs from the ops nothing consumes.

    ``constants`` names the placeholders that stand for large constants (never inputs).
    """
    stand_ins = set(constants)
    operations = list(graph.operations())
    placeholders = [
        op for op in operations if op.type == "Placeholder" and op.name not in stand_ins
    ]
    consumed: set[str] = set()
    for op in operations:
        consumed.update(op.inputs)
    sinks = [
        op
        for op in operations
        if op.name not in consumed
        and op.output_types
        and op.type not in _NOT_OUTPUTS
        and op.type not in INITIALIZER_OPS
        and not _HANDLE_TYPES.intersection(op.output_types)
    ]
    if not placeholders:
        raise ModelRejected("no_inputs", "the graph has no Placeholder: declare its inputs")
    if not sinks:
        raise ModelRejected(
            "no_outputs", "no op produces an unconsumed tensor: declare its outputs"
        )
    inputs = _short_keys([f"{op.name}:0" for op in placeholders])
    outputs = _short_keys([f"{op.name}:{i}" for op in sinks for i in range(len(op.output_types))])
    return inputs, outputs
