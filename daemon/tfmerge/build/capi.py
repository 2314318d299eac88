"""TensorFlow's C API through ctypes: graphs and sessions. Worker side.

Why not the Python ``tf.Graph`` and ``Session``: importing a graph there creates a Python
object for every node, and the Python SavedModel loader parses ``saved_model.pb`` twice and
imports its graph node by node in Python. For a few hundred small models those costs are most
of a build. The C API does the same work in C++: ``TF_GraphImportGraphDef`` is the importer
``import_graph_def`` calls, ``TF_SessionRun`` the run ``Session.run`` calls, and
``TF_LoadSessionFromSavedModel`` (build/loader.py) the C++ loader TensorFlow Serving runs.
The library is the one TensorFlow's Python package loads (``libtensorflow_cc.so.2``), so the
kernels and their results are the same as through ``tf.compat.v1.Session``.

Feeds and fetched values are numpy arrays, converted by build/tensors.py.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfmerge.build import tensors, tfcore

_P = ctypes.c_void_p
_INT = ctypes.c_int
_SIZE = ctypes.c_size_t
_INT64 = ctypes.c_int64
#: TF_Code values, in order.
_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip


class TFError(Exception):
    """A failed C API call: its TF_Code and message. Raised as the subclass of its code,
    named as TensorFlow's Python errors are (``InvalidArgumentError``)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)

    @classmethod
    def of(cls, code: int, message: str) -> TFError:
        return _ERRORS.get(code, cls)(code, message)


_ERRORS: dict[int, type[TFError]] = {
    code: type("".join(p.title() for p in name.split("_")) + "Error", (TFError,), {})
    for code, name in enumerate(_CODES)
}
#: The errors a check tells apart: a run past its deadline, an allocation refused.
DeadlineExceededError = _ERRORS[_CODES.index("DEADLINE_EXCEEDED")]
ResourceExhaustedError = _ERRORS[_CODES.index("RESOURCE_EXHAUSTED")]


class _Output(ctypes.Structure):
    _fields_ = [("oper", _P), ("index", _INT)]


class _Buffer(ctypes.Structure):
    _fields_ = [("data", _P), ("length", _SIZE), ("data_deallocator", _P)]


_BUF = ctypes.POINTER(_Buffer)
_OUT = ctypes.POINTER(_Output)
_PP = ctypes.POINTER(_P)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "TF_NewStatus": (_P, []),
    "TF_DeleteStatus": (None, [_P]),
    "TF_GetCode": (_INT, [_P]),
    "TF_Message": (ctypes.c_char_p, [_P]),
    "TF_NewGraph": (_P, []),
    "TF_DeleteGraph": (None, [_P]),
    "TF_NewImportGraphDefOptions": (_P, []),
    "TF_DeleteImportGraphDefOptions": (None, [_P]),
    "TF_ImportGraphDefOptionsSetPrefix": (None, [_P, ctypes.c_char_p]),
    "TF_GraphImportGraphDef": (None, [_P, _BUF, _P, _P]),
    "TF_GraphOperationByName": (_P, [_P, ctypes.c_char_p]),
    "TF_GraphNextOperation": (_P, [_P, ctypes.POINTER(_SIZE)]),
    "TF_GraphGetTensorNumDims": (_INT, [_P, _Output, _P]),
    "TF_GraphGetTensorShape": (None, [_P, _Output, ctypes.POINTER(_INT64), _INT, _P]),
    "TF_OperationName": (ctypes.c_char_p, [_P]),
    "TF_OperationOpType": (ctypes.c_char_p, [_P]),
    "TF_OperationNumOutputs": (_INT, [_P]),
    "TF_OperationOutputType": (_INT, [_Output]),
    "TF_OperationNumInputs": (_INT, [_P]),
    "TF_OperationAllInputs": (None, [_P, _OUT, _INT]),
    "TF_OperationNumControlInputs": (_INT, [_P]),
    "TF_OperationGetControlInputs": (_INT, [_P, ctypes.POINTER(_P), _INT]),
    "TF_NewSessionOptions": (_P, []),
    "TF_DeleteSessionOptions": (None, [_P]),
    "TF_SetConfig": (None, [_P, ctypes.c_char_p, _SIZE, _P]),
    "TF_NewSession": (_P, [_P, _P, _P]),
    "TF_CloseSession": (None, [_P, _P]),
    "TF_DeleteSession": (None, [_P, _P]),
    "TF_SessionRun": (
        None,
        # session, run options, feeds (outputs, values, count), fetches (the same), targets
        # (operations, count), run metadata, status
        [_P, _P, _OUT, _PP, _INT, _OUT, _PP, _INT, _PP, _INT, _P, _P],
    ),
    "TF_LoadSessionFromSavedModel": (
        _P,
        [_P, _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), _INT, _P, _BUF, _P],
    ),
    "TF_AllocateTensor": (_P, [_INT, ctypes.POINTER(_INT64), _INT, _SIZE]),
    "TF_NewTensor": (
        _P,
        [_INT, ctypes.POINTER(_INT64), _INT, _P, _SIZE, tensors.DEALLOCATOR, _P],
    ),
    "TF_DeleteTensor": (None, [_P]),
    "TF_TensorData": (_P, [_P]),
    "TF_TensorByteSize": (_SIZE, [_P]),
    "TF_TensorType": (_INT, [_P]),
    "TF_NumDims": (_INT, [_P]),
    "TF_Dim": (_INT64, [_P, _INT]),
    "TF_TensorElementCount": (_INT64, [_P]),
    "TF_StringInit": (None, [_P]),
    "TF_StringCopy": (None, [_P, ctypes.c_char_p, _SIZE]),
    "TF_StringGetDataPointer": (_P, [_P]),
    "TF_StringGetSize": (_SIZE, [_P]),
    "TF_StringDealloc": (None, [_P]),
}


@functools.cache
def library() -> ctypes.CDLL:
    """TensorFlow's C++ runtime (tfcore.library), with the signatures of the calls used here."""
    lib = tfcore.library()
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


class Status:
    def __init__(self) -> None:
        self.lib = library()
        self.pointer = self.lib.TF_NewStatus()

    def check(self) -> None:
        code = self.lib.TF_GetCode(self.pointer)
        if code:
            message = (self.lib.TF_Message(self.pointer) or b"").decode("utf-8", "replace")
            raise TFError.of(code, message)

    def __enter__(self) -> Status:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lib.TF_DeleteStatus(self.pointer)


def _bytes_buffer(data: bytes) -> _Buffer:
    """A TF_Buffer over data, valid while data lives (the C API only reads it)."""
    return _Buffer(ctypes.cast(ctypes.c_char_p(data), _P), len(data), None)


def split_tensor_name(name: str) -> tuple[str, int]:
    """``op:index`` (a bare op name: its first output) as the op's name and the index."""
    op, colon, index = name.rpartition(":")
    if not colon:
        return name, 0
    if not index.isdigit():
        raise KeyError(name)
    return op, int(index)


@dataclass(frozen=True)
class Operation:
    """One node of a Graph, as TF_GraphNextOperation lists them (the import's order)."""

    name: str
    type: str
    #: Names of the nodes whose outputs or control edges it consumes.
    inputs: tuple[str, ...]
    #: The types of its outputs, as DataType enum values.
    output_types: tuple[int, ...]


class Graph:
    """A TF_Graph: import a GraphDef, read its tensors' types and shapes, list its nodes."""

    def __init__(self) -> None:
        self._lib = library()
        self.pointer: int | None = self._lib.TF_NewGraph()

    def import_graph_def(self, serialized: bytes, prefix: str = "") -> None:
        """Import a serialized GraphDef, each node's name under ``prefix/`` if one is given;
        raises TFError."""
        lib = self._lib
        options = lib.TF_NewImportGraphDefOptions()
        if prefix:
            lib.TF_ImportGraphDefOptionsSetPrefix(options, prefix.encode())
        buffer = _bytes_buffer(serialized)
        try:
            with Status() as status:
                buffer_pointer = ctypes.byref(buffer)
                lib.TF_GraphImportGraphDef(self.pointer, buffer_pointer, options, status.pointer)
                status.check()
        finally:
            lib.TF_DeleteImportGraphDefOptions(options)

    def operation(self, name: str) -> int:
        """The TF_Operation of a node; KeyError when the graph has no such node."""
        op: int | None = self._lib.TF_GraphOperationByName(self.pointer, name.encode())
        if not op:
            raise KeyError(name)
        return op

    def output(self, tensor: str) -> _Output:
        """The TF_Output of ``op:index``; KeyError when the graph has no such tensor."""
        op_name, index = split_tensor_name(tensor)
        op = self.operation(op_name)
        if not 0 <= index < self._lib.TF_OperationNumOutputs(op):
            raise KeyError(tensor)
        return _Output(op, index)

    def operation_type(self, tensor: str) -> str:
        op: bytes = self._lib.TF_OperationOpType(self.output(tensor).oper)
        return op.decode()

    def dtype(self, tensor: str) -> int:
        value: int = self._lib.TF_OperationOutputType(self.output(tensor))
        return value

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        """The statically known shape (-1 per unknown dimension); None for an unknown rank."""
        with Status() as status:
            return self._shape(self.output(tensor), status)

    def _shape(self, output: _Output, status: Status) -> tuple[int, ...] | None:
        rank = self._lib.TF_GraphGetTensorNumDims(self.pointer, output, status.pointer)
        status.check()
        if rank < 0:
            return None
        dims = (_INT64 * max(rank, 1))()
        self._lib.TF_GraphGetTensorShape(self.pointer, output, dims, rank, status.pointer)
        status.check()
        return tuple(int(d) for d in dims[:rank])

    def outputs(self) -> Iterator[tuple[str, str, int, tuple[int, ...] | None]]:
        """Every output of every node: its node's name and type, its DataType enum and its
        static shape (as ``shape``). One pass, without the inputs ``operations`` reads."""
        lib = self._lib
        position = _SIZE(0)
        with Status() as status:
            while op := lib.TF_GraphNextOperation(self.pointer, ctypes.byref(position)):
                count = lib.TF_OperationNumOutputs(op)
                if not count:
                    continue
                name = lib.TF_OperationName(op).decode()
                kind = lib.TF_OperationOpType(op).decode()
                for index in range(count):
                    output = _Output(op, index)
                    shape = self._shape(output, status)
                    yield name, kind, lib.TF_OperationOutputType(output), shape

    def operations(self) -> Iterator[Operation]:
        lib = self._lib
        position = _SIZE(0)
        while op := lib.TF_GraphNextOperation(self.pointer, ctypes.byref(position)):
            count = lib.TF_OperationNumInputs(op)
            inputs = (_Output * max(count, 1))()
            lib.TF_OperationAllInputs(op, inputs, count)
            controls = lib.TF_OperationNumControlInputs(op)
            control_ops = (_P * max(controls, 1))()
            lib.TF_OperationGetControlInputs(op, control_ops, controls)
            producers = [inputs[i].oper for i in range(count)]
            producers += [control_ops[i] for i in range(controls)]
            yield Operation(
                name=lib.TF_OperationName(op).decode(),
                type=lib.TF_OperationOpType(op).decode(),
                inputs=tuple(lib.TF_OperationName(p).decode() for p in producers),
                output_types=tuple(
                    lib.TF_OperationOutputType(_Output(op, i))
                    for i in range(lib.TF_OperationNumOutputs(op))
                ),
            )

    def close(self) -> None:
        if self.pointer is not None:
            self._lib.TF_DeleteGraph(self.pointer)
            self.pointer = None

    def __del__(self) -> None:
        self.close()


class Session:
    """A TF_Session over a Graph, created with a serialized ConfigProto."""

    def __init__(self, graph: Graph, config: bytes, *, pointer: int | None = None) -> None:
        self._lib = lib = library()
        self.graph = graph
        if pointer is not None:
            self.pointer: int | None = pointer
            return
        options = lib.TF_NewSessionOptions()
        try:
            with Status() as status:
                lib.TF_SetConfig(options, config, len(config), status.pointer)
                status.check()
                self.pointer = lib.TF_NewSession(graph.pointer, options, status.pointer)
                status.check()
        finally:
            lib.TF_DeleteSessionOptions(options)

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        fetches: Sequence[str],
        targets: Sequence[str] = (),
        *,
        aliased: Collection[str] = (),
        options: bytes | None = None,
    ) -> list[np.ndarray]:
        """One TF_SessionRun: tensors by name in, the fetched values out, in order.

        ``options`` is a serialized RunOptions (a deadline, for one).

        The feeds named in ``aliased`` are handed over without a copy when they are aligned:
        the caller keeps their memory alive and unchanged until this session is closed (a
        graph may keep a fed value, in a variable for instance).
        """
        lib, graph = self._lib, self.graph
        names = list(feeds)
        inputs = (_Output * max(len(names), 1))(*(graph.output(n) for n in names))
        outputs = (_Output * max(len(fetches), 1))(*(graph.output(n) for n in fetches))
        ops = (_P * max(len(targets), 1))(*(graph.operation(t) for t in targets))
        values = (_P * max(len(names), 1))()
        results = (_P * max(len(fetches), 1))()
        arrays: list[np.ndarray] = []  # what fed tensors alias, alive at least until the run ends
        try:
            for index, name in enumerate(names):
                alias = arrays if name in aliased else None
                values[index] = tensors.new_tensor(lib, feeds[name], graph.dtype(name), alias)
            run_options = None if options is None else ctypes.byref(_bytes_buffer(options))
            with Status() as status:
                lib.TF_SessionRun(
                    self.pointer, run_options, inputs, values, len(names), outputs, results,
                    len(fetches), ops, len(targets), None, status.pointer,
                )  # fmt: skip
                status.check()
            try:
                return [tensors.to_numpy(lib, results[i] or 0) for i in range(len(fetches))]
            except ValueError as exc:
                raise TFError.of(_CODES.index("INTERNAL"), str(exc)) from None
        finally:
            for index in range(len(fetches)):
                if results[index]:
                    lib.TF_DeleteTensor(results[index])
            for index in range(len(names)):
                fed = values[index]
                if fed:
                    tensors.delete_fed(lib, fed)
            del arrays

    def close(self) -> None:
        if self.pointer is not None:
            with Status() as status:
                self._lib.TF_CloseSession(self.pointer, status.pointer)
                self._lib.TF_DeleteSession(self.pointer, status.pointer)
            self.pointer = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
