"""Many frozen graphs in, one SavedModel out. Worker side: imports TensorFlow's protobufs.

The merge works on protobufs, not on a TensorFlow graph: each graph's nodes are renamed into its own
scope in place and serialised once, then written as one more ``graph_def`` chunk of the
MetaGraphDef (protobuf merges repeated occurrences of an embedded message). Constants are
never copied into a TensorFlow graph, which is where the naive merge spends its time and memory.

Function libraries are merged by content: a function defined identically by several graphs is
kept once; a name defined with different bodies (TF2 graphs frozen in separate processes all
have ``while_body_frozen_71``-like names) is renamed in the later graph, with every reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfmerge.build import bundle, tfcore, variables
from tfmerge.build.wire import length_field_key
from tfmerge.models import TensorSig

#: Name of the NoOp that runs every graph's initializers when the SavedModel loads.
MAIN_OP_NAME = "tfmerge_main_op"
_MAIN_OP_COLLECTION = "saved_model_main_op"
_PREDICT = "tensorflow/serving/predict"


@dataclass(frozen=True)
class SignatureSpec:
    name: str
    inputs: Mapping[str, TensorSig]
    outputs: Mapping[str, TensorSig]


@dataclass
class GraphUnit:
    """One distinct graph (by content) and the signatures served from it."""

    sha256: str
    #: The checked GraphDef with its large constants as placeholders; the merge renames it in
    #: place and drops it once serialised.
    graph_def: Any
    relpath: str
    scope: str
    init_nodes: Sequence[str]
    signatures: Sequence[SignatureSpec]
    #: The large constants, already in the version's variables data file, keyed by node name.
    constants: Sequence[bundle.Entry] = ()


@dataclass(frozen=True)
class MergeStats:
    graphs: int
    signatures: int
    nodes: int
    functions: int
    renamed_functions: int
    saved_model_bytes: int
    variables: int
    variable_bytes: int


def _tensor_in_scope(scope: str, name: str) -> str:
    return f"{scope}/{name}"


def _rename_input(scope: str, ref: str) -> str:
    if ref.startswith("^"):
        return f"^{scope}/{ref[1:]}"
    return f"{scope}/{ref}"


def _rename_funcs_in_attr(value: Any, renames: Mapping[str, str]) -> None:
    kind = value.WhichOneof("value")
    if kind == "func":
        value.func.name = renames.get(value.func.name, value.func.name)
        for nested in value.func.attr.values():
            _rename_funcs_in_attr(nested, renames)
    elif kind == "list":
        for func in value.list.func:
            func.name = renames.get(func.name, func.name)
            for nested in func.attr.values():
                _rename_funcs_in_attr(nested, renames)


def _rename_funcs_in_node(node: Any, renames: Mapping[str, str]) -> None:
    if not renames:
        return
    if node.op in renames:
        node.op = renames[node.op]
    for value in node.attr.values():
        _rename_funcs_in_attr(value, renames)


#: The ops that open a TF1 (v1 control flow) while loop's frame, named by ``frame_name``.
_ENTER_OPS = frozenset({"Enter", "RefEnter"})


def _scope_node(node: Any, scope: str, renames: Mapping[str, str]) -> None:
    node.name = f"{scope}/{node.name}"
    if node.input:
        node.input[:] = [_rename_input(scope, ref) for ref in node.input]
    colocation = node.attr.get("_class")
    if colocation is not None and colocation.list.s:
        colocation.list.s[:] = [
            b"loc:@" + scope.encode() + b"/" + s[len(b"loc:@") :] if s.startswith(b"loc:@") else s
            for s in colocation.list.s
        ]
    frame = node.attr.get("frame_name")
    if frame is not None and frame.s and node.op in _ENTER_OPS:
        # The executor tells loops apart by frame name: two graphs' "rnn/while/while_context"
        # would be one loop with two LoopConds in a run that reaches both (MultiInference, an
        # init op that fills two tables each computed by a loop).
        frame.s = scope.encode() + b"/" + frame.s
    shared = node.attr.get("shared_name")
    if shared is not None and shared.s:
        # Tables and variables with the same shared_name would be one resource in a session.
        shared.s = scope.encode() + b"/" + shared.s
    _rename_funcs_in_node(node, renames)


class _Library:
    """The merged function library, keyed by name, compared by content."""

    def __init__(self) -> None:
        self.functions: dict[str, bytes] = {}
        self.order: list[Any] = []
        self.gradients: dict[str, str] = {}
        self.renamed = 0

    def add_graph_library(self, library: Any) -> dict[str, str]:
        """Add one graph's functions; returns that graph's renames (old name -> new name)."""
        own = {f.signature.name: f for f in library.function}
        renames: dict[str, str] = {}
        changed = True
        while changed:
            changed = False
            for name, function in own.items():
                if name in renames or name not in self.functions:
                    continue
                if self._serialized(function, renames) != self.functions[name]:
                    renames[name] = self._fresh_name(name, function, own)
                    changed = True
        for name, function in own.items():
            final = renames.get(name, name)
            if final in self.functions:
                continue  # the loop above proved it identical to the function already kept
            for node in function.node_def:
                _rename_funcs_in_node(node, renames)
            function.signature.name = final
            self.functions[final] = function.SerializeToString(deterministic=True)
            self.order.append(function)
        for gradient in library.gradient:
            fn = renames.get(gradient.function_name, gradient.function_name)
            self.gradients.setdefault(
                fn, renames.get(gradient.gradient_func, gradient.gradient_func)
            )
        self.renamed += len(renames)
        return renames

    def _serialized(self, function: Any, renames: Mapping[str, str]) -> bytes:
        copy = function
        if renames:
            copy = type(function)()
            copy.CopyFrom(function)
            for node in copy.node_def:
                _rename_funcs_in_node(node, renames)
        data: bytes = copy.SerializeToString(deterministic=True)
        return data

    def _fresh_name(self, name: str, function: Any, own: Mapping[str, Any]) -> str:
        digest = hashlib.sha256(function.SerializeToString(deterministic=True)).hexdigest()
        for width in range(8, len(digest) + 1):
            candidate = f"{name}_{digest[:width]}"
            if candidate not in self.functions and candidate not in own:
                return candidate
        raise RuntimeError(f"no free name for function {name}")


def _write_chunks(path: Path, chunks: Sequence[bytes]) -> int:
    """Not synced: publish syncs the whole version before it renames it into place."""
    with path.open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
    return sum(len(chunk) for chunk in chunks)


@dataclass
class _Head:
    """What the merge learns from the graphs besides their nodes."""

    init_nodes: list[str]
    producer: int | None = None
    min_consumer: int = 0


def _meta_graph(
    units: Sequence[GraphUnit], library: _Library, writer: variables.Variables, head: _Head
) -> Any:
    """The MetaGraphDef without the graphs' nodes: versions, init op, library, signatures."""

    meta = tfcore.meta_graph_pb2.MetaGraphDef()
    meta.meta_info_def.tags.append("serve")
    meta.meta_info_def.tensorflow_version = tfcore.VERSION
    meta.meta_info_def.tensorflow_git_version = tfcore.GIT_VERSION
    graph = meta.graph_def
    graph.versions.producer = head.producer or 0
    graph.versions.min_consumer = head.min_consumer
    main_op = graph.node.add(name=MAIN_OP_NAME, op="NoOp")
    main_op.input.extend(f"^{name}" for name in head.init_nodes)
    graph.library.function.extend(library.order)
    for function_name, gradient in sorted(library.gradients.items()):
        graph.library.gradient.add(function_name=function_name, gradient_func=gradient)
    if writer.entries:
        variables.add_restore(graph, writer, meta.saver_def)
    meta.collection_def[_MAIN_OP_COLLECTION].node_list.value.append(MAIN_OP_NAME)
    for unit in units:
        for spec in unit.signatures:
            signature = meta.signature_def[spec.name]
            signature.method_name = _PREDICT
            for key, sig in spec.inputs.items():
                _tensor_info(signature.inputs[key], unit.scope, sig)
            for key, sig in spec.outputs.items():
                _tensor_info(signature.outputs[key], unit.scope, sig)
    return meta


def _merge_unit(
    unit: GraphUnit, library: _Library, stored: variables.Variables, head: _Head
) -> tuple[bytes, int]:
    """One graph's nodes, renamed into its scope and serialised; and how many there are."""
    graph_def = unit.graph_def
    unit.graph_def = None
    renames = library.add_graph_library(graph_def.library)
    for node in graph_def.node:
        _scope_node(node, unit.scope, renames)
    variables.externalise(graph_def, unit.scope, unit.constants, stored)
    head.init_nodes.extend(_tensor_in_scope(unit.scope, n) for n in unit.init_nodes)
    version = graph_def.versions
    # The oldest producer keeps every graph's deprecated ops loadable.
    head.producer = (
        version.producer if head.producer is None else min(head.producer, version.producer)
    )
    head.min_consumer = max(head.min_consumer, version.min_consumer)
    for field_name in ("library", "versions", "debug_info"):
        graph_def.ClearField(field_name)
    return graph_def.SerializeToString(deterministic=True), len(graph_def.node)


def merge(
    units: Sequence[GraphUnit], export_dir: Path, *, aliases: Mapping[str, str] | None = None
) -> MergeStats:
    """Write one SavedModel (tag ``serve``) holding every unit under its scope into export_dir.

    ``aliases`` adds signatures that are copies of others (``serving_default`` -> a model).
    The units' large constants must already be in the data files of ``VARIABLES_PREFIX``
    (numbered 0 to the highest shard of any entry); the merge writes the bundle's index.
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / "variables").mkdir(exist_ok=True)
    library = _Library()
    writer = variables.Variables()
    head = _Head(init_nodes=[])
    node_chunks: list[bytes] = []
    node_count = 0
    for unit in units:
        chunk, count = _merge_unit(unit, library, writer, head)
        node_chunks.append(chunk)
        node_count += count
    if writer.entries:
        shards = 1 + max(entry.shard for entry in writer.entries)
        bundle.write_index(export_dir / variables.VARIABLES_PREFIX, writer.entries, shards)
    meta = _meta_graph(units, library, writer, head)
    for alias, target in (aliases or {}).items():
        meta.signature_def[alias].CopyFrom(meta.signature_def[target])
    meta_bytes = meta.SerializeToString(deterministic=True)
    nodes_payload = sum(len(c) for c in node_chunks)
    meta_length = len(meta_bytes) + len(length_field_key(2, nodes_payload)) + nodes_payload
    chunks = [
        b"\x08\x01",  # SavedModel.saved_model_schema_version = 1
        length_field_key(2, meta_length),  # SavedModel.meta_graphs[0]
        meta_bytes,
        length_field_key(2, nodes_payload),  # MetaGraphDef.graph_def, merged into the one above
        *node_chunks,
    ]
    written = _write_chunks(export_dir / "saved_model.pb", chunks)
    return MergeStats(
        graphs=len(units),
        signatures=sum(len(unit.signatures) for unit in units) + len(aliases or {}),
        nodes=node_count + 1,
        functions=len(library.order),
        renamed_functions=library.renamed,
        saved_model_bytes=written,
        variables=len(writer.names),
        variable_bytes=writer.bytes,
    )


def _tensor_info(info: Any, scope: str, sig: TensorSig) -> None:
    info.name = _tensor_in_scope(scope, sig.name)
    info.dtype = sig.dtype
    if sig.shape is None:
        info.tensor_shape.unknown_rank = True
    else:
        for dim in sig.shape:
            info.tensor_shape.dim.add(size=dim)
