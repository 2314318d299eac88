"""The part of TensorFlow a build uses, imported without the rest of the ``tensorflow`` package.

``import tensorflow`` loads the whole public API: Keras, tf.data, distribution strategies and
the generated ``tf.*`` modules, about 4 s of a 6 s start on a 2-core host. A build needs the
C++ runtime, graph import, sessions, the SavedModel loader and the protobufs, which load in
about 1.5 s. Importing this module registers ``tensorflow`` as a package whose ``__init__`` has
not run yet, so that its submodules load alone; the first lookup of any other attribute on it
(``tf.Graph`` in code that did ``import tensorflow as tf``) runs ``__init__`` then, and from
there on the package is exactly what a plain import gives. A process that imported TensorFlow
before is left as it is. Worker side only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is noise on a CPU host;
# errors still reach stderr. Read when the runtime loads, below.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _defer_package_init() -> None:
    if "tensorflow" in sys.modules:
        return
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not a regular package: let the imports below fail or succeed as they would
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(name: str) -> Any:
        # The first missing attribute is the first use of the public API: run __init__ now.
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete
    sys.modules["tensorflow"] = package


_defer_package_init()

# ruff: noqa: E402 - these imports must follow the registration above to load alone.
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow.core.protobuf.config_pb2 import ConfigProto, OptimizerOptions, RunOptions
from tensorflow.python.client.session import Session
from tensorflow.python.framework import dtypes
from tensorflow.python.framework.errors_impl import (
    DeadlineExceededError,
    OpError,
    ResourceExhaustedError,
)
from tensorflow.python.framework.importer import import_graph_def
from tensorflow.python.framework.ops import Graph
from tensorflow.python.framework.tensor_util import MakeNdarray, make_tensor_proto
from tensorflow.python.framework.versions import GIT_VERSION, VERSION
from tensorflow.python.lib.io.tf_record import TFRecordWriter
from tensorflow.python.platform.tf_logging import get_logger
from tensorflow.python.saved_model.loader_impl import load as load_saved_model

# The SavedModel loader's deprecation notice would be printed on every build.
get_logger().setLevel("ERROR")


def is_full_tensorflow_loaded() -> bool:
    """Whether the public API (``tensorflow/__init__``) has run in this process."""
    package: ModuleType | None = sys.modules.get("tensorflow")
    return package is not None and "__getattr__" not in package.__dict__


__all__ = [
    "GIT_VERSION",
    "VERSION",
    "ConfigProto",
    "DeadlineExceededError",
    "Graph",
    "MakeNdarray",
    "OpError",
    "OptimizerOptions",
    "ResourceExhaustedError",
    "RunOptions",
    "Session",
    "TFRecordWriter",
    "dtypes",
    "graph_pb2",
    "import_graph_def",
    "is_full_tensorflow_loaded",
    "load_saved_model",
    "make_tensor_proto",
    "meta_graph_pb2",
    "saved_model_pb2",
]
