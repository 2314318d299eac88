"""Read and check one frozen GraphDef. Worker side: imports TensorFlow.

Every refusal is a ModelRejected with a short code (named in docs/events.md) and a reason a
person can act on.
"""

from __future__ import annotations

import hashlib
import mmap
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge import oppolicy, wire

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


class ModelRejected(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class TensorSig:
    """A tensor as a SignatureDef describes it."""

    name: str
    dtype: int  # a DataType enum value
    shape: tuple[int, ...] | None  # None: unknown rank; -1: unknown dimension

    def as_dict(self) -> dict[str, Any]:
        from tfmerge import tfcore

        return {
            "name": self.name,
            "dtype": tfcore.dtypes.as_dtype(self.dtype).name,
            "shape": self.shape,
        }


def parse_graph_def(
    data: bytes | memoryview, relpath: str, stripped: bytes | memoryview | None = None
) -> Any:
    """Parse binary (``.pb``) or text (``.pbtxt``) GraphDef bytes, refusing what is not one.

    ``stripped`` is the same binary GraphDef without its large constants' bytes
    (wire.split_payloads): parsed instead of data when it parses cleanly.
    """
    from google.protobuf import text_format

    from tfmerge.tfcore import graph_pb2

    if not data:
        raise ModelRejected("empty_file", "the file is empty")
    if relpath.endswith(".pbtxt"):
        graph_def = graph_pb2.GraphDef()
        try:
            text_format.Parse(bytes(data).decode("utf-8"), graph_def)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise ModelRejected("unparseable", f"not a text GraphDef: {exc}") from exc
    else:
        graph_def = _parse_clean(stripped) if stripped is not None else None
        if graph_def is None:
            graph_def = _parse_clean(data)
        if graph_def is None:
            raise _not_a_graph_def(data)
    if not graph_def.node:
        raise ModelRejected("not_a_graphdef", "the GraphDef has no nodes")
    for node in graph_def.node:
        if not node.name or not node.op:
            raise ModelRejected("not_a_graphdef", "a node has no name or no op: not a GraphDef")
    return graph_def


def _is_saved_model(data: bytes | memoryview) -> bool:
    from google.protobuf import message

    from tfmerge.tfcore import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(data)
    except message.DecodeError:
        return False
    return bool(saved.meta_graphs) and bool(saved.meta_graphs[0].graph_def.node)


def read_graph_def(path: Path, relpath: str, max_bytes: int) -> tuple[str, bytes, Any]:
    """Read a graph file once: its sha256, its bytes and the parsed GraphDef."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            if size > max_bytes:
                raise ModelRejected(
                    "too_large", f"{size} bytes is over max_model_bytes = {max_bytes}"
                )
            handle.seek(0)
            data = handle.read()
    except OSError as exc:
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    return digest, data, parse_graph_def(data, relpath)


#: Where a large constant's bytes start in the read buffer: TensorFlow feeds an array this
#: aligned without copying it (Eigen's widest alignment).
_FEED_ALIGNMENT = 64


@dataclass
class GraphRead:
    """A graph file read once: its digest, its bytes and its GraphDef.

    For a binary GraphDef the large constants' bytes are not in graph_def: ``payloads`` maps
    their node names to views of ``data`` (see split_large_constants), and ``offsets`` to
    where those bytes start in the file.
    """

    sha256: str
    data: memoryview
    graph_def: Any
    payloads: dict[str, memoryview] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        """How many of the file's bytes are large constants' contents."""
        return sum(len(payload) for payload in self.payloads.values())


def new_buffer(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory to read a graph file into, its pages already mapped.

    Mapping every page in one call (MAP_POPULATE) costs about half of what a page fault per
    page costs when the file is read into it: the buffer is filled right after.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(size, 1), flags=flags)


def scratch_size(file_size: int) -> int:
    """What open_graph needs for aligned copies of a file's constants, padding included."""
    return file_size + file_size // 1024 + 2 * _FEED_ALIGNMENT


def buffer_size(file_size: int) -> int:
    """What read_graph needs for a file: the file and a scratch area for open_graph."""
    return file_size + scratch_size(file_size)


def read_graph(
    path: Path,
    relpath: str,
    max_bytes: int,
) -> GraphRead:
    """Read a graph file into one new buffer, then open_graph it, the buffer's rest as scratch."""
    try:
        with path.open("rb", buffering=0) as handle:
            size = handle.seek(0, 2)
            if size > max_bytes:
                raise ModelRejected(
                    "too_large", f"{size} bytes is over max_model_bytes = {max_bytes}"
                )
            handle.seek(0)
            buffer = new_buffer(buffer_size(size))
            view = memoryview(buffer)
            done = 0
            while done < size:
                count = handle.readinto(view[done:size])
                if not count:
                    break  # the file shrank while it was read: its sha256 says what was read
                done += count
    except OSError as exc:
        raise ModelRejected("unreadable", f"cannot read: {exc.strerror or exc}") from exc
    return open_graph(view[:done], relpath, view[done:])


def open_graph(data: memoryview, relpath: str, scratch: memoryview) -> GraphRead:
    """Hash a graph file's bytes and parse them without copying its constants.

    Every large constant's bytes end up aligned for TensorFlow to feed them without a copy, by
    one copy each into scratch, of at least scratch_size(len(data)) bytes (cheaper than
    TensorFlow's own copy into fresh memory, and data stays as it is for the hash).
    """
    # Hashed on another core while the graph is parsed: nothing below writes to data.
    digest = _Digest(data)
    try:
        stripped: bytes | memoryview = data
        found: list[wire.Payload] = []
        if not relpath.endswith(".pbtxt"):
            try:
                stripped, found = wire.split_payloads(data, LARGE_CONSTANT_BYTES)
            except wire.Unusual:
                stripped, found = data, []
        graph_def = parse_graph_def(data, relpath, stripped if found else None)
        payloads = _aligned(scratch, [(p.node, data[p.start : p.stop]) for p in found])
    finally:
        sha256 = digest.join()
    offsets = {p.node: p.start for p in found}
    return GraphRead(sha256, data, graph_def, payloads, offsets)


def _aligned(
    scratch: memoryview, payloads: Sequence[tuple[str, memoryview]]
) -> dict[str, memoryview]:
    """Each payload, copied into scratch at an aligned address where it is not aligned."""
    result = {}
    spare = 0
    base = np.frombuffer(scratch, np.uint8).ctypes.data if len(scratch) else 0
    for name, payload in payloads:
        address = np.frombuffer(payload, np.uint8).ctypes.data if len(payload) else 0
        if address % _FEED_ALIGNMENT == 0:
            result[name] = payload
            continue
        spare += -(base + spare) % _FEED_ALIGNMENT
        slot = scratch[spare : spare + len(payload)]
        slot[:] = payload
        result[name] = slot
        spare += len(payload)
    return result


def _not_a_graph_def(data: bytes | memoryview) -> ModelRejected:
    """Why binary bytes that do not parse cleanly as a GraphDef are refused."""
    from google.protobuf import message

    from tfmerge.tfcore import graph_pb2

    if _is_saved_model(data):
        return ModelRejected(
            "not_a_graphdef", "the file is a SavedModel's saved_model.pb, not a frozen graph"
        )
    try:
        graph_pb2.GraphDef().ParseFromString(data)
    except message.DecodeError as error:
        return ModelRejected(
            "unparseable",
            f"cannot parse as a binary GraphDef ({error}): a truncated upload, or not a GraphDef",
        )
    return ModelRejected("not_a_graphdef", "the file is not a GraphDef")


def _parse_clean(data: bytes | memoryview) -> Any:
    """The binary GraphDef in data, or None if it does not parse without unknown fields."""
    from google.protobuf import message, unknown_fields

    from tfmerge.tfcore import graph_pb2

    graph_def = graph_pb2.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except message.DecodeError:
        return None
    return None if len(unknown_fields.UnknownFieldSet(graph_def)) else graph_def


class _Digest:
    """sha256 of a buffer, computed on another core while the graph is parsed."""

    def __init__(self, data: memoryview) -> None:
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._hash.update, args=(data,), name="sha256")
        self._thread.start()

    def join(self) -> str:
        self._thread.join()
        return self._hash.hexdigest()


def op_triples(graph_def: Any) -> Iterator[tuple[str, str, str | None]]:
    """(node, op, function) for every node of the graph and of every function in its library."""
    for node in graph_def.node:
        yield node.name, node.op, None
    for function in graph_def.library.function:
        for node in function.node_def:
            yield node.name, node.op, function.signature.name


def check_ops(graph_def: Any, allow: Sequence[str]) -> None:
    violations = oppolicy.find_violations(op_triples(graph_def), allow)
    if violations:
        raise ModelRejected("forbidden_op", oppolicy.describe(violations))


def initializer_nodes(graph_def: Any) -> list[str]:
    return [node.name for node in graph_def.node if node.op in INITIALIZER_OPS]


#: A numeric Const at least this large is kept out of every tfcore.Graph the check builds (it is fed
#: instead) and moved into the merged model's ``variables/``: TensorFlow copies in-graph
#: constants several times on import and on session creation.
LARGE_CONSTANT_BYTES = 1 << 20


_TYPED_VALUE_FIELDS = (
    "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
    "bool_val", "dcomplex_val", "half_val", "resource_handle_val", "variant_val",
    "uint32_val", "uint64_val",
)  # fmt: skip


def is_large_constant(node: Any) -> bool:
    """A numeric Const whose bytes, all in tensor_content, reach LARGE_CONSTANT_BYTES.

    Decided from the shape and dtype: reading tensor_content would copy all of its bytes.
    """
    if node.op != "Const" or "value" not in node.attr:
        return False
    value = node.attr["value"].tensor
    from tfmerge import tfcore

    dtype = tfcore.dtypes.as_dtype(value.dtype)
    if dtype == tfcore.dtypes.string or dtype.is_quantized or value.tensor_shape.unknown_rank:
        return False
    elements = 1
    for dim in value.tensor_shape.dim:
        elements *= max(dim.size, 0)
    if elements * dtype.size < LARGE_CONSTANT_BYTES:
        return False
    # A constant written as typed values (a splat of one value, say) has no tensor_content.
    return not any(len(getattr(value, field)) for field in _TYPED_VALUE_FIELDS)


def constant_array(node: Any, payload: memoryview | None = None) -> np.ndarray:
    """The value of a large Const as an array: a view of ``payload``, the tensor_content that
    read_graph left out of the node, or else one copy of the node's own tensor_content."""
    from tfmerge import tfcore

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


@dataclass(frozen=True)
class LargeConstant:
    """A large Const set aside from its graph: what the check feeds and the merge stores."""

    name: str
    dtype: int  # a DataType enum value
    shape: tuple[int, ...]
    value: np.ndarray
    #: Where the value's bytes are in the graph file, when they are there as they are.
    offset: int | None = None


def split_large_constants(
    graph_def: Any,
    payloads: Mapping[str, memoryview] | None = None,
    offsets: Mapping[str, int] | None = None,
) -> tuple[Any, list[LargeConstant]]:
    """The graph with every large Const replaced by a Placeholder of the same name and type.

    Running it with each such placeholder fed the constant's value computes exactly what the
    frozen graph computes, without TensorFlow copying those bytes into the graph. The
    placeholders keep the constants' private attributes (colocation): the merge turns them into
    variable reads. ``payloads`` holds the contents read_graph left out of graph_def, and
    ``offsets`` where they are in the file.
    """
    payloads = payloads or {}
    offsets = offsets or {}
    light = type(graph_def)()
    light.versions.CopyFrom(graph_def.versions)
    light.library.CopyFrom(graph_def.library)
    large = []
    for node in graph_def.node:
        payload = payloads.get(node.name)
        if payload is not None and not is_large_constant(node):
            # Not a constant the merge moves (quantized, say): its bytes go back in the graph.
            node.attr["value"].tensor.tensor_content = bytes(payload)
            payload = None
        if is_large_constant(node):
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


def import_graph(graph_def: Any) -> Any:
    """Import into a fresh tfcore.Graph; refuses unknown ops and dangling references."""
    from tfmerge import tfcore

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
    from tfmerge import tfcore

    return tfcore.dtypes.resource


def _variant_dtype() -> Any:
    from tfmerge import tfcore

    return tfcore.dtypes.variant


def probe_inputs(
    signature: str, inputs: Mapping[str, TensorSig], sample: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """The value fed to each input when checking a model: its sample, or one made from its type."""
    from tfmerge import tfcore

    seed = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    values = {}
    for key, sig in sorted(inputs.items()):
        dtype = tfcore.dtypes.as_dtype(sig.dtype)
        if sample is not None and key in sample:
            try:
                np_dtype = object if dtype == tfcore.dtypes.string else dtype.as_numpy_dtype
                value = np.asarray(sample[key], dtype=np_dtype)
                if dtype == tfcore.dtypes.string:
                    value = np.vectorize(
                        lambda s: s.encode() if isinstance(s, str) else s, otypes=[object]
                    )(value)
            except (TypeError, ValueError) as exc:
                raise ModelRejected(
                    "bad_sample", f"sample.{key} is not a {dtype.name} array: {exc}"
                ) from exc
            values[key] = value
            continue
        shape = (2,) if sig.shape is None else tuple(2 if d < 0 else d for d in sig.shape)
        if dtype.is_floating:
            values[key] = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_integer or dtype == tfcore.dtypes.bool:
            # Zeros are valid indices for any embedding or table a graph may look them up in.
            values[key] = np.zeros(shape, dtype=dtype.as_numpy_dtype)
        elif dtype == tfcore.dtypes.string:
            values[key] = np.full(shape, b"tfmerge probe", dtype=object)
        else:
            raise ModelRejected(
                "bad_sample",
                f"cannot make a probe value for input {key!r} of type {dtype.name}: add a sample",
            )
    return values


def check_session_config() -> Any:
    """Session options for every run a check makes, on the source and on the merged model alike.

    Graph optimisations off (Grappler and the classic optimiser): they copy a graph's constants
    several times, which for a large frozen graph costs more than the whole merge, and both
    sides must run the very same kernels for their outputs to be comparable bit for bit.
    """
    from tfmerge import tfcore

    config = tfcore.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.optimizer_options.opt_level = tfcore.OptimizerOptions.L0
    config.graph_options.optimizer_options.do_constant_folding = False
    config.graph_options.optimizer_options.do_common_subexpression_elimination = False
    config.graph_options.optimizer_options.do_function_inlining = False
    return config


def run_graph(
    graph: Any,
    init_nodes: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    fetches: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """Run a source graph the way the merged model runs it: initializers first, then one call."""
    from tfmerge import tfcore

    with tfcore.Session(graph=graph, config=check_session_config()) as session:
        if init_nodes:
            session.run([graph.get_operation_by_name(n) for n in init_nodes])
        result: dict[str, np.ndarray] = session.run(dict(fetches), feed_dict=dict(feeds))
    return result
