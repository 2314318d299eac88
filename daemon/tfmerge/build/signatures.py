"""Import a checked graph into TensorFlow and read its interface. Worker side.

The tensors' types and shapes for the SignatureDef, the inputs and outputs of a discovered
model (its placeholders, and the tensors nothing consumes), and its table initializers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tfmerge.build import tfcore
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


#: Ops a signature input normally is; feeding any other tensor overrides what computes it.
INPUT_OPS = frozenset({"Placeholder", "PlaceholderWithDefault"})


def initializer_nodes(graph_def: Any) -> list[str]:
    return [node.name for node in graph_def.node if node.op in INITIALIZER_OPS]


def import_graph(graph_def: Any) -> Any:
    """Import into a fresh tfcore.Graph; refuses unknown ops and dangling references."""
    graph = tfcore.Graph()
    try:
        with graph.as_default():
            tfcore.import_graph_def(graph_def, name="")
    except (ValueError, TypeError, tfcore.OpError) as exc:
        raise ModelRejected("invalid_graph", f"TensorFlow cannot import the graph: {exc}") from exc
    return graph


def tensor_sig(graph: Any, name: str) -> TensorSig:
    try:
        tensor = graph.get_tensor_by_name(name)
    except (KeyError, ValueError) as exc:
        raise ModelRejected("missing_tensor", f"the graph has no tensor {name!r}") from exc
    shape = tensor.shape
    dims = (
        None if shape.rank is None else tuple(-1 if d is None else int(d) for d in shape.as_list())
    )
    return TensorSig(name=name, dtype=tensor.dtype.as_datatype_enum, shape=dims)


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
    graph: Any, constants: Sequence[str] = ()
) -> tuple[dict[str, str], dict[str, str]]:
    """Inputs from the placeholders, outputs from the ops nothing consumes.

    ``constants`` names the placeholders that stand for large constants (never inputs).
    """
    stand_ins = set(constants)
    placeholders = [
        op for op in graph.get_operations() if op.type == "Placeholder" and op.name not in stand_ins
    ]
    consumed: set[str] = set()
    for op in graph.get_operations():
        consumed.update(t.op.name for t in op.inputs)
        consumed.update(c.name for c in op.control_inputs)
    sinks = [
        op
        for op in graph.get_operations()
        if op.name not in consumed
        and op.outputs
        and op.type not in _NOT_OUTPUTS
        and op.type not in INITIALIZER_OPS
        and all(t.dtype not in (_resource_dtype(), _variant_dtype()) for t in op.outputs)
    ]
    if not placeholders:
        raise ModelRejected("no_inputs", "the graph has no Placeholder: declare its inputs")
    if not sinks:
        raise ModelRejected(
            "no_outputs", "no op produces an unconsumed tensor: declare its outputs"
        )
    inputs = _short_keys([op.outputs[0].name for op in placeholders])
    outputs = _short_keys([t.name for op in sinks for t in op.outputs])
    return inputs, outputs


def _resource_dtype() -> Any:
    return tfcore.dtypes.resource


def _variant_dtype() -> Any:
    return tfcore.dtypes.variant
