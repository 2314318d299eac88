"""Load a SavedModel and run its signatures through TensorFlow's C API, by ctypes.

``TF_LoadSessionFromSavedModel`` is the C++ SavedModel loader TensorFlow Serving runs
(restore the variables, run the main op that fills lookup tables; Grappler on under default
session options). This module needs only ``libtensorflow_cc.so.2`` from the TensorFlow wheel
and numpy: it never imports TensorFlow's Python package, so it must run in a process that has
not imported it either (``run_in_child`` starts one).

    with SavedModel("/srv/models/m/1") as model:
        outputs = model.run("serving_default", {"x": np.zeros((2, 4), np.float32)})

Signatures are read from the MetaGraphDef the loader returns, with a small protobuf wire
reader. Strings are numpy object arrays of bytes (numpy's ``S`` dtype drops trailing NULs).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

TF_STRING = 7
#: TF_DataType -> numpy dtype; TF_STRING is apart (object arrays of bytes).
DTYPES: dict[int, np.dtype[Any]] = {
    k: np.dtype(v)
    for k, v in {
        1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
        9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32,
        23: np.uint64, 8: np.complex64, 18: np.complex128,
    }.items()
}  # fmt: skip
_TF_OF_NUMPY = {v: k for k, v in DTYPES.items()}
_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip
#: sizeof(TF_TString): a 24-byte union (small, large, offset or view string).
_TSTRING_SIZE = 24
_CHILD_TIMEOUT_SECONDS = 600.0


class TFError(RuntimeError):
    """A TF_Status that is not OK: ``code`` is the TF_Code number, ``code_name`` its name."""

    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message
        self.code_name = _CODES[code] if 0 <= code < len(_CODES) else str(code)
        super().__init__(f"{self.code_name}: {message}")


class _Output(ctypes.Structure):
    _fields_ = (("oper", ctypes.c_void_p), ("index", ctypes.c_int))


class _Buffer(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("length", ctypes.c_size_t),
        ("deallocator", ctypes.c_void_p),
    )


# Every pointer is declared c_void_p: a c_char_p or default int restype truncates or copies.
_P, _I, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_OUTPUTS, _POINTERS = ctypes.POINTER(_Output), ctypes.POINTER(_P)
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "TF_NewStatus": (_P, []),
    "TF_DeleteStatus": (None, [_P]),
    "TF_GetCode": (_I, [_P]),
    "TF_Message": (ctypes.c_char_p, [_P]),
    "TF_NewGraph": (_P, []),
    "TF_DeleteGraph": (None, [_P]),
    "TF_NewSessionOptions": (_P, []),
    "TF_DeleteSessionOptions": (None, [_P]),
    "TF_SetConfig": (None, [_P, ctypes.c_char_p, _SIZE, _P]),
    "TF_NewBuffer": (ctypes.POINTER(_Buffer), []),
    "TF_DeleteBuffer": (None, [ctypes.POINTER(_Buffer)]),
    "TF_LoadSessionFromSavedModel": (
        _P,
        [
            _P,
            _P,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_char_p),
            _I,
            _P,
            ctypes.POINTER(_Buffer),
            _P,
        ],
    ),
    "TF_CloseSession": (None, [_P, _P]),
    "TF_DeleteSession": (None, [_P, _P]),
    "TF_GraphOperationByName": (_P, [_P, ctypes.c_char_p]),
    "TF_OperationNumOutputs": (_I, [_P]),
    "TF_SessionRun": (
        None,
        [_P, _P, _OUTPUTS, _POINTERS, _I, _OUTPUTS, _POINTERS, _I, _P, _I, _P, _P],
    ),
    "TF_AllocateTensor": (_P, [_I, ctypes.POINTER(ctypes.c_int64), _I, _SIZE]),
    "TF_DeleteTensor": (None, [_P]),
    "TF_TensorData": (_P, [_P]),
    "TF_TensorByteSize": (_SIZE, [_P]),
    "TF_TensorType": (_I, [_P]),
    "TF_NumDims": (_I, [_P]),
    "TF_Dim": (ctypes.c_int64, [_P, _I]),
    "TF_TensorElementCount": (ctypes.c_int64, [_P]),
    "TF_StringInit": (None, [_P]),
    "TF_StringCopy": (None, [_P, ctypes.c_char_p, _SIZE]),
    "TF_StringGetDataPointer": (_P, [_P]),
    "TF_StringGetSize": (_SIZE, [_P]),
}
_library: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The wheel's ``libtensorflow_cc.so.2``, loaded once, found without importing TensorFlow."""
    global _library  # noqa: PLW0603 - one handle per process, as the dynamic loader keeps it
    if _library is None:
        spec = importlib.util.find_spec("tensorflow")  # locates the package, runs no __init__
        if spec is None or not spec.submodule_search_locations:
            raise OSError("the tensorflow wheel is not installed")
        folder = next(iter(spec.submodule_search_locations))
        # Its RUNPATH ($ORIGIN) finds libtensorflow_framework.so.2 next to it.
        lib = ctypes.CDLL(str(Path(folder) / "libtensorflow_cc.so.2"))
        for name, (restype, argtypes) in _PROTOTYPES.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        _library = lib
    return _library


class _Status:
    def __init__(self) -> None:
        self.lib = library()
        self.ptr = self.lib.TF_NewStatus()

    def check(self) -> None:
        if code := self.lib.TF_GetCode(self.ptr):
            message = (self.lib.TF_Message(self.ptr) or b"").decode("utf-8", "replace")
            raise TFError(code, message)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lib.TF_DeleteStatus(self.ptr)


# --- protobuf: enough of the wire format for signature_def and ConfigProto -------------


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one message; length-delimited values as views (no copy)."""
    i, end = 0, len(buf)
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = int.from_bytes(buf[i : i + width], "little"), i + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "op:index"
    dtype: int  # TF_DataType
    shape: tuple[int, ...] | None  # -1: unknown dimension; None: unknown rank


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    method_name: str


def _entry(buf: memoryview) -> tuple[str, memoryview]:
    key, value = "", memoryview(b"")
    for number, field in _fields(buf):
        if number == 1:
            key = bytes(field).decode()
        elif number == 2:
            value = field
    return key, value


def _tensor_info(buf: memoryview) -> TensorSpec:
    name, dtype, shape = "", 0, None
    for number, value in _fields(buf):
        if number == 1:
            name = bytes(value).decode()
        elif number == 2:
            dtype = value
        elif number == 3:  # TensorShapeProto: dim = 2 { size = 1 }, unknown_rank = 3
            dims: list[int] = []
            unknown = False
            for inner, field in _fields(value):
                if inner == 2:
                    size = next((v for n, v in _fields(field) if n == 1), 0)
                    dims.append(size - (1 << 64) if size >= 1 << 63 else size)
                elif inner == 3:
                    unknown = bool(field)
            shape = None if unknown else tuple(dims)
    return TensorSpec(name, dtype, shape)


def parse_signatures(meta_graph_def: bytes) -> dict[str, Signature]:
    """MetaGraphDef.signature_def (field 5) as Signatures."""
    signatures: dict[str, Signature] = {}
    for number, entry in _fields(memoryview(meta_graph_def)):
        if number != 5:
            continue
        key, body = _entry(entry)
        maps: dict[int, dict[str, TensorSpec]] = {1: {}, 2: {}}
        method = ""
        for inner, value in _fields(body):  # inputs = 1, outputs = 2, method_name = 3
            if inner in maps:
                name, info = _entry(value)
                maps[inner][name] = _tensor_info(info)
            elif inner == 3:
                method = bytes(value).decode()
        signatures[key] = Signature(key, maps[1], maps[2], method)
    return signatures


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative enum is a 10-byte two's complement varint
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _encode_varint(number << 3 | 2) + _encode_varint(len(value)) + value
    return _encode_varint(number << 3) + _encode_varint(value)


def config_proto(*, grappler: bool = True, graph_opts: bool = True) -> bytes:
    """A serialized ConfigProto: ``grappler=False`` sets rewrite_options'
    disable_meta_optimizer, ``graph_opts=False`` optimizer_options' opt_level L0. With the
    defaults it is empty, the same as passing no options (TensorFlow Serving's)."""
    graph = b""
    if not graph_opts:
        graph += _field(3, _field(3, -1))  # optimizer_options { opt_level: L0 }
    if not grappler:
        graph += _field(10, _field(19, 1))  # rewrite_options { disable_meta_optimizer }
    return _field(10, graph) if graph else b""


# --- tensors --------------------------------------------------------------------------


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"string tensors take bytes or str elements, not {type(value).__name__}")


def _new_tensor(lib: ctypes.CDLL, value: Any, dtype: int) -> int:
    """A new TF_Tensor (the caller deletes it) from an array, or a list taken as ``dtype``."""
    array = (
        value
        if isinstance(value, np.ndarray)
        else np.asarray(value, dtype=object if dtype == TF_STRING else DTYPES.get(dtype))
    )
    dims = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
    if array.dtype.kind in "SUO":
        flat = [_as_bytes(x) for x in array.reshape(-1)]
        tensor = int(lib.TF_AllocateTensor(TF_STRING, dims, array.ndim, _TSTRING_SIZE * len(flat)))
        base = lib.TF_TensorData(tensor)
        for index, data in enumerate(flat):
            element = base + index * _TSTRING_SIZE
            lib.TF_StringInit(element)  # the buffer is uninitialised memory
            lib.TF_StringCopy(element, data, len(data))
        return tensor
    # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray makes it 1-d).
    array = np.asarray(array, dtype=array.dtype.newbyteorder("="), order="C")
    if array.dtype not in _TF_OF_NUMPY:
        raise TypeError(f"unsupported numpy dtype {array.dtype}")
    tensor = int(lib.TF_AllocateTensor(_TF_OF_NUMPY[array.dtype], dims, array.ndim, array.nbytes))
    if array.nbytes:
        ctypes.memmove(lib.TF_TensorData(tensor), array.ctypes.data, array.nbytes)
    return tensor


def _to_numpy(lib: ctypes.CDLL, tensor: int) -> np.ndarray:
    shape = tuple(lib.TF_Dim(tensor, i) for i in range(lib.TF_NumDims(tensor)))
    dtype = lib.TF_TensorType(tensor)
    if dtype == TF_STRING:
        base, count = lib.TF_TensorData(tensor), lib.TF_TensorElementCount(tensor)
        out = np.empty(count, dtype=object)
        for index in range(count):
            element = base + index * _TSTRING_SIZE
            size = lib.TF_StringGetSize(element)
            out[index] = ctypes.string_at(lib.TF_StringGetDataPointer(element), size)
        return out.reshape(shape)
    if dtype not in DTYPES:
        raise TypeError(f"cannot convert TF_DataType {dtype} to numpy")
    array = np.empty(shape, DTYPES[dtype])
    if array.nbytes:
        if lib.TF_TensorByteSize(tensor) != array.nbytes:
            raise ValueError(f"tensor holds {lib.TF_TensorByteSize(tensor)} bytes")
        ctypes.memmove(array.ctypes.data, lib.TF_TensorData(tensor), array.nbytes)
    return array


class SavedModel:
    """A SavedModel loaded by ``TF_LoadSessionFromSavedModel`` (tag ``serve``).

    ``config``: serialized ConfigProto bytes, None for TensorFlow's defaults. After loading:
    ``signatures`` (without ``__saved_model_init_op``, which TF2 SavedModels list) and
    ``load_seconds`` and ``load_cpu_seconds``, the wall and CPU time (every thread's) of the
    load call.
    """

    def __init__(self, export_dir: Path | str, config: bytes | None = None) -> None:
        self._lib = lib = library()
        self._session: int | None = None
        self._graph: int | None = lib.TF_NewGraph()
        self._outputs: dict[str, _Output] = {}
        options, meta = lib.TF_NewSessionOptions(), lib.TF_NewBuffer()
        try:
            with _Status() as status:
                if config:
                    lib.TF_SetConfig(options, config, len(config), status.ptr)
                    status.check()
                tags = (ctypes.c_char_p * 1)(b"serve")
                started, cpu = time.perf_counter(), time.process_time()
                session = lib.TF_LoadSessionFromSavedModel(
                    options, None, os.fsencode(export_dir), tags, 1, self._graph, meta, status.ptr
                )
                self.load_seconds = time.perf_counter() - started
                self.load_cpu_seconds = time.process_time() - cpu
                status.check()
                self._session = session
            meta_graph_def = ctypes.string_at(meta.contents.data, meta.contents.length)
            self.signatures = {
                name: signature
                for name, signature in parse_signatures(meta_graph_def).items()
                if not name.startswith("__")
            }
        except BaseException:
            self.close()
            raise
        finally:
            lib.TF_DeleteBuffer(meta)
            lib.TF_DeleteSessionOptions(options)

    def _output(self, tensor: str) -> _Output:
        if tensor not in self._outputs:
            op, _, index = tensor.partition(":")
            operation = self._lib.TF_GraphOperationByName(self._graph, op.encode())
            if not operation or int(index or 0) >= self._lib.TF_OperationNumOutputs(operation):
                raise KeyError(f"no tensor {tensor!r} in the graph")
            self._outputs[tensor] = _Output(operation, int(index or 0))
        return self._outputs[tensor]

    def run(self, signature: str, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one signature on its feeds (input key -> array): every output, by key."""
        return self.run_together({signature: feeds})[signature]

    def run_together(
        self, feeds: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, np.ndarray]]:
        """Several signatures in ONE TF_SessionRun, as a MultiInference request runs them."""
        if self._session is None:
            raise RuntimeError("the session is closed")
        inputs: list[tuple[TensorSpec, Any]] = []
        outputs: list[tuple[str, str, TensorSpec]] = []
        for name, values in feeds.items():
            signature = self.signatures[name]
            if set(values) != set(signature.inputs):
                raise KeyError(f"{name!r} takes {sorted(signature.inputs)}, got {sorted(values)}")
            inputs += [(signature.inputs[key], value) for key, value in values.items()]
            outputs += [(name, key, spec) for key, spec in signature.outputs.items()]
        # Two signatures of one graph share tensors: each is fed and fetched once.
        fed = {spec.name: (spec, value) for spec, value in inputs}
        fetched = list(dict.fromkeys(spec.name for _, _, spec in outputs))
        lib = self._lib
        input_ops = (_Output * len(fed))(*(self._output(name) for name in fed))
        output_ops = (_Output * len(fetched))(*(self._output(name) for name in fetched))
        input_values = (ctypes.c_void_p * len(fed))()
        output_values = (ctypes.c_void_p * len(fetched))()
        try:
            for index, (spec, value) in enumerate(fed.values()):
                input_values[index] = _new_tensor(lib, value, spec.dtype)
            with _Status() as status:
                lib.TF_SessionRun(
                    self._session, None, input_ops, input_values, len(fed), output_ops,
                    output_values, len(fetched), None, 0, None, status.ptr,
                )  # fmt: skip
                status.check()
            arrays = {name: _to_numpy(lib, output_values[i] or 0) for i, name in enumerate(fetched)}
        finally:
            # TF_DeleteTensor also frees the strings of a string tensor.
            for tensor in [*output_values, *input_values]:
                if tensor:
                    lib.TF_DeleteTensor(tensor)
        results: dict[str, dict[str, np.ndarray]] = {name: {} for name in feeds}
        for name, key, spec in outputs:
            results[name][key] = arrays[spec.name]
        return results

    def close(self) -> None:
        lib = self._lib
        if self._session is not None:
            with _Status() as status:
                lib.TF_CloseSession(self._session, status.ptr)
                lib.TF_DeleteSession(self._session, status.ptr)
            self._session = None
        if self._graph:
            lib.TF_DeleteGraph(self._graph)
            self._graph = None
        self._outputs.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- in a child process -----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a child does: load export_dir under each config, run the signatures once each
    (``feeds``: signature -> input key -> array; None: every signature on zeros) and, with
    ``together``, all of ``feeds`` again in one run."""

    export_dir: str
    configs: Sequence[bytes | None] = (None,)
    feeds: Mapping[str, Mapping[str, Any]] | None = None
    together: bool = False


def zeros_for(signature: Signature) -> dict[str, np.ndarray]:
    feeds = {}
    for key, spec in signature.inputs.items():
        shape = (1,) if spec.shape is None else tuple(1 if d < 0 else d for d in spec.shape)
        if spec.dtype == TF_STRING:
            feeds[key] = np.full(shape, b"", dtype=object)
        else:
            feeds[key] = np.zeros(shape, DTYPES[spec.dtype])
    return feeds


def serve(request: Request) -> list[dict[str, Any]]:
    """Per config: load seconds, outputs by signature, and the joint run's outputs."""
    answers = []
    for config in request.configs:
        with SavedModel(request.export_dir, config) as model:
            feeds = request.feeds
            if feeds is None:
                feeds = {name: zeros_for(sig) for name, sig in model.signatures.items()}
            answer: dict[str, Any] = {
                "load_seconds": model.load_seconds,
                "load_cpu_seconds": model.load_cpu_seconds,
                "signatures": sorted(model.signatures),
                "outputs": {name: model.run(name, values) for name, values in feeds.items()},
            }
            if request.together:
                answer["together"] = model.run_together(feeds)
            answers.append(answer)
    answers.append({"tensorflow_modules": sorted(m for m in sys.modules if "tensorflow" in m)})
    return answers


def run_in_child(request: Request) -> list[dict[str, Any]]:
    """``serve`` in a fresh process that never imports TensorFlow's Python package; the last
    answer lists the modules it had loaded with "tensorflow" in their names. A load or run
    that fails raises its TFError here."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=pickle.dumps(request),
        capture_output=True,
        env=env,
        timeout=_CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the C API loader failed ({done.returncode}):\n{done.stderr.decode()[-4000:]}"
        )
    answers: Any = pickle.loads(done.stdout)  # noqa: S301 - from our own child
    if isinstance(answers, tuple):
        raise TFError(*answers)
    result: list[dict[str, Any]] = answers
    return result


def _child_main() -> None:
    request = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 - written by run_in_child
    try:
        answers: Any = serve(request)
    except TFError as exc:
        answers = (exc.code, exc.message)
    sys.stdout.buffer.write(pickle.dumps(answers))


if __name__ == "__main__":
    _child_main()
