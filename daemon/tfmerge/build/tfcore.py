"""The part of TensorFlow a build uses: its C++ runtime and its protobufs, no Python runtime.

``import tensorflow`` loads the whole public API: Keras, tf.data, distribution strategies and
the generated ``tf.*`` modules, about 4 s of a 6 s start on a 2-core host; even its graph-mode
core (sessions, graph import, the SavedModel loader) costs about 1.5 s of CPU, ml_dtypes and
TensorFlow's Python bindings for the most part. A build needs neither: it imports and runs
graphs and loads SavedModels through the C API (build/capi.py), on ``libtensorflow_cc.so.2``,
the library TensorFlow's Python package itself loads, and writes protobufs.

Importing this module loads that library and registers ``tensorflow`` as a package whose
``__init__`` has not run yet, so that its protobuf modules load alone; the first lookup of any
other attribute on it (``tf.Graph`` in code that did ``import tensorflow as tf``) runs
``__init__`` then, and from there on the package is exactly what a plain import gives. A
process that imported TensorFlow before is left as it is. Worker side only.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is noise on a CPU host;
# errors still reach stderr. Read when the runtime loads, below.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _defer_package_init() -> ModuleType:
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError("TensorFlow is not installed as a regular package")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(name: str) -> Any:
        # The first missing attribute is the first use of the public API: run __init__ now.
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete
    sys.modules["tensorflow"] = package
    return package


_PACKAGE = _defer_package_init()
#: Where the installed TensorFlow is, and its C++ runtime.
PACKAGE_DIR = Path(next(iter(_PACKAGE.__spec__.submodule_search_locations or ())))  # type: ignore[union-attr]
LIBRARY_PATH = PACKAGE_DIR / "libtensorflow_cc.so.2"


@functools.cache
def library() -> ctypes.CDLL:
    """``libtensorflow_cc.so.2``: already mapped if TensorFlow's Python package loaded it."""
    return ctypes.CDLL(str(LIBRARY_PATH))


def _version() -> str:
    function = library().TF_Version
    function.restype = ctypes.c_char_p
    value: bytes = function()
    return value.decode()


# ruff: noqa: E402 - these imports must follow the registration above to load alone.
from tensorflow.core.framework import graph_pb2, tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow.core.protobuf.config_pb2 import ConfigProto, OptimizerOptions, RunOptions

from tfmerge.build import dtypes
from tfmerge.build.dtypes import make_ndarray as MakeNdarray  # noqa: N812 - TensorFlow's name
from tfmerge.build.dtypes import make_tensor_proto

#: TensorFlow's version, as its runtime reports it (``tf.__version__``).
VERSION = _version()
#: Not reported by the C++ runtime (only TensorFlow's Python bindings carry it).
GIT_VERSION = ""


def is_full_tensorflow_loaded() -> bool:
    """Whether the public API (``tensorflow/__init__``) has run in this process."""
    package: ModuleType | None = sys.modules.get("tensorflow")
    return package is not None and "__getattr__" not in package.__dict__


__all__ = [
    "GIT_VERSION",
    "LIBRARY_PATH",
    "VERSION",
    "ConfigProto",
    "MakeNdarray",
    "OptimizerOptions",
    "RunOptions",
    "dtypes",
    "graph_pb2",
    "is_full_tensorflow_loaded",
    "library",
    "make_tensor_proto",
    "meta_graph_pb2",
    "saved_model_pb2",
    "tensor_pb2",
]
