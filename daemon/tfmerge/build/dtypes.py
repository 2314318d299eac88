"""TensorFlow's data types, and tensors as TensorProto, without TensorFlow's Python runtime.

Worker side. ``tensorflow.python.framework.dtypes`` and ``tensor_util`` pull in most of that
runtime (and ml_dtypes, whose import alone costs about a second of CPU) for a table a build
needs a few entries of. This module is that table, with the same names and attributes
(``as_dtype(1).as_numpy_dtype``, ``is_floating``, ``string``), and the two conversions a build
makes: numpy arrays to TensorProto (as ``tf.make_tensor_proto`` writes them) and back (as
``tf.make_ndarray`` reads them). ml_dtypes is imported only for the types only it defines
(bfloat16, the float8 and 4-bit types).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfmerge.models import DTYPE_NAMES

# (enum, numpy type or the name of an ml_dtypes type, kind); kinds: f float, i integer,
# b bool, s string, c complex, q quantized, h handle.
_TABLE: tuple[tuple[int, Any, str], ...] = (
    (1, np.float32, "f"), (2, np.float64, "f"), (3, np.int32, "i"), (4, np.uint8, "i"),
    (5, np.int16, "i"), (6, np.int8, "i"), (7, object, "s"), (8, np.complex64, "c"),
    (9, np.int64, "i"), (10, np.bool_, "b"), (11, [("qint8", np.int8)], "q"),
    (12, [("quint8", np.uint8)], "q"), (13, [("qint32", np.int32)], "q"),
    (14, "bfloat16", "f"), (15, [("qint16", np.int16)], "q"),
    (16, [("quint16", np.uint16)], "q"), (17, np.uint16, "i"), (18, np.complex128, "c"),
    (19, np.float16, "f"), (20, None, "h"), (21, None, "h"), (22, np.uint32, "i"),
    (23, np.uint64, "i"), (24, "float8_e5m2", "f"), (25, "float8_e4m3fn", "f"),
    (26, "float8_e4m3fnuz", "f"), (27, "float8_e4m3b11fnuz", "f"), (28, "float8_e5m2fnuz", "f"),
    (29, "int4", "i"), (30, "uint4", "i"), (31, "int2", "i"), (32, "uint2", "i"),
    (33, "float4_e2m1fn", "f"),
)  # fmt: skip
#: Types TensorFlow writes as tensor_content (raw bytes) when a tensor has several elements.
_CONTENT_TYPES = frozenset({1, 2, 3, 4, 5, 6, 9, 11, 12, 13, 14, 15, 16, 17, 19, 22, 23})
#: The TensorProto field each type's values go to when they are not tensor_content.
_VALUE_FIELDS = {
    1: "float_val", 2: "double_val", 3: "int_val", 4: "int_val", 5: "int_val", 6: "int_val",
    7: "string_val", 8: "scomplex_val", 9: "int64_val", 10: "bool_val", 11: "int_val",
    12: "int_val", 13: "int_val", 14: "half_val", 15: "int_val", 16: "int_val",
    17: "int_val", 18: "dcomplex_val", 19: "half_val", 22: "uint32_val", 23: "uint64_val",
}  # fmt: skip


@dataclass(frozen=True)
class DType:
    """One TensorFlow DataType, with the attributes of ``tf.DType`` a build reads."""

    as_datatype_enum: int
    _numpy: Any
    _kind: str

    @property
    def name(self) -> str:
        return DTYPE_NAMES.get(self.as_datatype_enum, f"dtype_{self.as_datatype_enum}")

    @property
    def as_numpy_dtype(self) -> Any:
        if self._numpy is None:
            raise TypeError(f"{self.name} has no numpy type")
        if isinstance(self._numpy, str):
            import ml_dtypes

            return getattr(ml_dtypes, self._numpy)
        if isinstance(self._numpy, list):
            return np.dtype(self._numpy)
        return self._numpy

    @property
    def size(self) -> int:
        """Bytes per element (TensorFlow's DType.size; 8 for strings and handles)."""
        if self._kind in "sh":
            return 8
        return int(np.dtype(self.as_numpy_dtype).itemsize)

    @property
    def is_floating(self) -> bool:
        return self._kind == "f"

    @property
    def is_integer(self) -> bool:
        return self._kind == "i"

    @property
    def is_quantized(self) -> bool:
        return self._kind == "q"

    @property
    def is_complex(self) -> bool:
        return self._kind == "c"

    @property
    def is_bool(self) -> bool:
        return self._kind == "b"


_BY_ENUM = {enum: DType(enum, numpy, kind) for enum, numpy, kind in _TABLE}
float32, int32, int64, string = (_BY_ENUM[n] for n in (1, 3, 9, 7))
resource, variant = _BY_ENUM[20], _BY_ENUM[21]


def as_dtype(value: Any) -> DType:
    """The DType of a DataType enum value, a DType, or a numpy dtype (``tf.as_dtype``)."""
    if isinstance(value, DType):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return _BY_ENUM[value]
        except KeyError:
            raise TypeError(f"no TensorFlow data type {value}") from None
    numpy_dtype = np.dtype(value)
    if numpy_dtype.kind in "OSU":
        return string
    for dtype in _BY_ENUM.values():
        if dtype._numpy is None:
            continue
        if isinstance(dtype._numpy, str) and numpy_dtype.name != dtype._numpy:
            continue  # ml_dtypes types match by name, so that ml_dtypes stays unimported
        if np.dtype(dtype.as_numpy_dtype) == numpy_dtype:
            return dtype
    raise TypeError(f"no TensorFlow data type for numpy {numpy_dtype}")


def make_tensor_proto(values: Any, dtype: DType | None = None) -> Any:
    """A TensorProto of values, written as ``tf.make_tensor_proto`` writes it."""
    from tfmerge.build import tfcore  # first: TensorFlow's protobufs then load alone

    tensor_pb2 = tfcore.tensor_pb2

    if (dtype is not None and dtype == string) or _is_text(values):
        array = np.asarray(values, dtype=object)
        dtype = string
    else:
        array = np.asarray(values, dtype=None if dtype is None else dtype.as_numpy_dtype)
        dtype = as_dtype(array.dtype)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    enum = dtype.as_datatype_enum
    if enum in _CONTENT_TYPES and array.size > 1:
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        proto.tensor_content = little.tobytes()
        return proto
    flat = array.reshape(-1)
    field = getattr(proto, _VALUE_FIELDS[enum])
    if dtype == string:
        field.extend(_as_bytes(item) for item in flat)
    elif enum in (14, 19):
        field.extend(int(bits) for bits in flat.view(np.uint16))
    elif dtype.is_complex:
        field.extend(float(part) for item in flat for part in (item.real, item.imag))
    elif dtype.is_quantized:
        field.extend(int(item[0]) for item in flat)
    else:
        field.extend(flat.tolist())
    return proto


def make_ndarray(proto: Any) -> np.ndarray:
    """The array a TensorProto holds (``tf.make_ndarray``)."""
    dtype = as_dtype(proto.dtype)
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    count = int(np.prod(shape, dtype=np.int64))
    numpy_dtype = np.dtype(dtype.as_numpy_dtype)
    if proto.tensor_content:
        content: np.ndarray = np.frombuffer(proto.tensor_content, numpy_dtype)
        return content.copy().reshape(shape)
    enum = dtype.as_datatype_enum
    field = getattr(proto, _VALUE_FIELDS[enum])
    values: np.ndarray
    if dtype == string:
        values = np.empty(len(field), dtype=object)
        values[:] = list(field)
    elif enum in (14, 19):
        values = np.array(list(field), np.uint16).view(numpy_dtype)
    elif dtype.is_complex:
        pairs = np.array(list(field), np.float64).reshape(-1, 2)
        values = (pairs[:, 0] + 1j * pairs[:, 1]).astype(numpy_dtype)
    else:
        values = np.array(list(field)).astype(numpy_dtype)
    if values.size == count:
        return values.reshape(shape)
    if values.size == 0:
        return np.full(shape, b"", object) if dtype == string else np.zeros(shape, numpy_dtype)
    # Fewer values than elements: the last one repeats, as TensorFlow reads a splat.
    padded: np.ndarray = np.concatenate([values, np.repeat(values[-1:], count - values.size)])
    return padded.reshape(shape)


def _is_text(values: Any) -> bool:
    if isinstance(values, str | bytes):
        return True
    if isinstance(values, np.ndarray):
        return values.dtype.kind in "OSU"
    if isinstance(values, Sequence):
        return any(_is_text(item) for item in values)
    return False


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, np.bytes_):
        return bytes(item)
    return str(item).encode()
