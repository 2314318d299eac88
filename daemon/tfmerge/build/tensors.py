"""Tensors between numpy and TensorFlow's C API: fed values in, fetched values out. Worker side.

Feeds are numpy arrays: aligned ones are handed to TensorFlow without a copy (a large
constant's bytes, fed to its source graph), others are copied once. Fetched values are copied
into new numpy arrays; strings are object arrays of bytes, as ``Session.run`` returns them.
String tensors hold TF_TString structs, set and freed here one by one.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from tfmerge.build import tfcore

_P = ctypes.c_void_p
_SIZE = ctypes.c_size_t
_INT64 = ctypes.c_int64
TF_STRING = 7
#: sizeof(TF_TString): a 24-byte union (inline, heap, offset or view).
_TSTRING_BYTES = 24
#: TensorFlow aliases a fed buffer aligned to this (EIGEN_MAX_ALIGN_BYTES) instead of copying it.
_ALIGNMENT = 64
#: The deallocator TF_NewTensor takes.
DEALLOCATOR = ctypes.CFUNCTYPE(None, _P, _SIZE, _P)


def _leave_to_numpy(data: Any, length: Any, arg: Any) -> None:
    """Fed arrays stay owned by numpy: the caller keeps them alive past the run."""


KEEP = DEALLOCATOR(_leave_to_numpy)


def numpy_dtype(dtype: int) -> np.dtype[Any]:
    numpy_dtype: np.dtype[Any] = np.dtype(tfcore.dtypes.as_dtype(dtype).as_numpy_dtype)
    return numpy_dtype


def new_tensor(lib: ctypes.CDLL, value: Any, dtype: int, keep: list[np.ndarray] | None) -> int:
    """A TF_Tensor for value, as the graph's tensor of that type takes it.

    With ``keep``, an aligned array is aliased (and appended to keep), not copied.
    """
    if dtype == TF_STRING:
        array = np.asarray(value, dtype=object)
        items = [as_bytes(item) for item in array.reshape(-1)]
        dims = (_INT64 * max(array.ndim, 1))(*array.shape)
        tensor = lib.TF_AllocateTensor(TF_STRING, dims, array.ndim, _TSTRING_BYTES * len(items))
        base = lib.TF_TensorData(tensor)
        for index, item in enumerate(items):
            slot = base + index * _TSTRING_BYTES
            lib.TF_StringInit(slot)
            lib.TF_StringCopy(slot, item, len(item))
        return int(tensor)
    array = np.asarray(value, dtype=numpy_dtype(dtype), order="C")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    dims = (_INT64 * max(array.ndim, 1))(*array.shape)
    address = array.ctypes.data
    if keep is not None and array.nbytes and address % _ALIGNMENT == 0:
        keep.append(array)
        return int(lib.TF_NewTensor(dtype, dims, array.ndim, address, array.nbytes, KEEP, None))
    tensor = lib.TF_AllocateTensor(dtype, dims, array.ndim, array.nbytes)
    if array.nbytes:
        ctypes.memmove(lib.TF_TensorData(tensor), address, array.nbytes)
    return int(tensor)


def delete_fed(lib: ctypes.CDLL, tensor: int) -> None:
    """Free a fed tensor; the strings of a string tensor first (its buffer is raw memory)."""
    if lib.TF_TensorType(tensor) == TF_STRING:
        base = lib.TF_TensorData(tensor)
        for index in range(lib.TF_TensorElementCount(tensor)):
            lib.TF_StringDealloc(base + index * _TSTRING_BYTES)
    lib.TF_DeleteTensor(tensor)


def as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    raise TypeError(f"a string tensor takes bytes or str, not {type(item).__name__}")


def to_numpy(lib: ctypes.CDLL, tensor: int) -> np.ndarray:
    if not tensor:
        raise ValueError("TensorFlow returned no value for a fetched tensor")
    shape = tuple(lib.TF_Dim(tensor, i) for i in range(lib.TF_NumDims(tensor)))
    dtype = lib.TF_TensorType(tensor)
    base = lib.TF_TensorData(tensor)
    if dtype == TF_STRING:
        count = lib.TF_TensorElementCount(tensor)
        strings: np.ndarray = np.empty(count, dtype=object)
        for index in range(count):
            slot = base + index * _TSTRING_BYTES
            strings[index] = ctypes.string_at(
                lib.TF_StringGetDataPointer(slot), lib.TF_StringGetSize(slot)
            )
        return strings.reshape(shape)
    array: np.ndarray = np.empty(shape, numpy_dtype(dtype))
    if array.nbytes:
        if lib.TF_TensorByteSize(tensor) != array.nbytes:
            raise ValueError(f"a fetched tensor of {array.nbytes} bytes holds another size")
        ctypes.memmove(array.ctypes.data, base, array.nbytes)
    return array
