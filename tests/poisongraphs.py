"""Frozen graphs that attack the process checking them, for the isolation tests and benchmarks.

Each writer builds a small GraphDef with TensorFlow's own graph API and writes it as a
binary `.pb`; same arguments, same bytes. Most are a few hundred bytes that ask for far more
than the host has:

- `huge_placeholder`: a float32 input of [1e6, 1e6, 1000] (a probe value of 7 PiB);
- `big_placeholder`: a float32 input of [30000, 30000] (3.6 GB, 10.8 GB as numpy makes it);
- `recursion`: a function that calls itself, as a PartitionedCall, a StatefulPartitionedCall
  or a call by name; TensorFlow's import recurses into it until the stack overflows;
- `deep_calls`: functions nested thousands deep, which overflow that stack as well;
- `while_true`: a while loop whose condition is always true (TF1 or TF2 control flow);
- `splat_constant`: a 12 GB constant written as one float;
- `fill`: a Fill of 6 GB with constant dimensions, and `fill_dynamic`, whose dimensions are
  only known when it runs;
- `abort`: an Abort op, which ends the process with SIGABRT (allowed only with allow_ops);
- `fifo_reader`: a ReadFile of a named pipe no one writes, one kernel that never returns
  and ignores the run's deadline (allowed only with allow_ops);
- `list_growth`: a loop that grows a TensorList by 1 MiB a step, forever.

And two sound models that meet tfmerge's limits and names: `big_intermediate`, which needs a
large tensor, and `named_input`, whose node names are tfmerge's own.

TensorFlow is imported inside the writers, as in graphgen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphgen import FrozenModel


def _write(graph_def: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(graph_def.SerializeToString(deterministic=True))
    return path


def _graph_def(build: Callable[[], None]) -> Any:
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        build()
    graph_def = graph.as_graph_def()
    for node in graph_def.node:
        node.device = ""
    return graph_def


def huge_placeholder(path: Path) -> Path:
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [1000000, 1000000, 1000], name="x")
        tf.identity(x, name="y")

    return _write(_graph_def(build), path)


def big_placeholder(path: Path) -> Path:
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [30000, 30000], name="x")
        tf.identity(x, name="y")

    return _write(_graph_def(build), path)


def _calling_graph() -> Any:
    """x -> PartitionedCall(outer) -> y, outer's body calling inner; both made by TensorFlow.

    Traced once per process (a trace costs about a second); each caller gets a copy.
    """
    import tensorflow as tf

    copy = tf.compat.v1.GraphDef()
    copy.CopyFrom(_traced_calling_graph())
    return copy


@functools.cache
def _traced_calling_graph() -> Any:
    import tensorflow as tf

    @tf.function(autograph=False)
    def inner(t: Any) -> Any:
        return tf.identity(t)

    @tf.function(autograph=False)
    def outer(t: Any) -> Any:
        return inner(t) + 1.0

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        tf.identity(outer(x), name="y")

    return _graph_def(build)


def recursion(path: Path, call: str = "PartitionedCall") -> Path:
    """outer's call of inner made a call of outer itself; ``call`` is the calling op, or
    ``"direct"`` for the function's own name used as the op."""
    import tensorflow as tf

    source = _calling_graph()
    outer = next(f for f in source.library.function if "outer" in f.signature.name)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.versions.CopyFrom(source.versions)
    function = graph_def.library.function.add()
    function.CopyFrom(outer)
    function.signature.name = "recurse"
    output_arg = function.signature.output_arg[0].name
    for node in [*source.node, *function.node_def]:
        if node.op not in ("PartitionedCall", "StatefulPartitionedCall"):
            continue
        if call == "direct":
            node.op = "recurse"
            node.ClearField("attr")
        else:
            node.op = call
            node.attr["f"].func.name = "recurse"
    if call == "direct":
        # A call by name names its outputs after the function's output args.
        for node in function.node_def:
            node.input[:] = [
                ref.replace("PartitionedCall:output:", f"PartitionedCall:{output_arg}:")
                for ref in node.input
            ]
    graph_def.node.extend(source.node)
    return _write(graph_def, path)


def deep_calls(path: Path, depth: int) -> Path:
    """depth functions, each calling the next; the last one calls nothing."""
    import tensorflow as tf

    source = _calling_graph()
    outer = next(f for f in source.library.function if "outer" in f.signature.name)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.versions.CopyFrom(source.versions)
    for level in range(depth + 1):
        function = graph_def.library.function.add()
        function.CopyFrom(outer)
        function.signature.name = f"level_{level}"
        for node in function.node_def:
            if node.op != "PartitionedCall":
                continue
            if level < depth:
                node.attr["f"].func.name = f"level_{level + 1}"
            else:
                node.op = "Identity"
                node.ClearField("attr")
                node.attr["T"].type = tf.float32.as_datatype_enum
    for node in source.node:
        if node.op == "PartitionedCall":
            node.attr["f"].func.name = "level_0"
    graph_def.node.extend(source.node)
    return _write(graph_def, path)


def while_true(path: Path, *, v2: bool) -> Path:
    import tensorflow as tf

    v1 = tf.compat.v1
    was_v2 = v1.control_flow_v2_enabled()

    def build() -> None:
        x = v1.placeholder(tf.float32, [2], name="x")
        _, out = v1.while_loop(
            lambda i, t: tf.constant(True),
            lambda i, t: (i + 1, t + 1.0),
            [0, x],
            name="forever",
        )
        tf.identity(out, name="y")

    try:
        (v1.enable_control_flow_v2 if v2 else v1.disable_control_flow_v2)()
        graph_def = _graph_def(build)
    finally:
        (v1.enable_control_flow_v2 if was_v2 else v1.disable_control_flow_v2)()
    return _write(graph_def, path)


def splat_constant(path: Path) -> Path:
    """y = x + c, c a float32 [3000, 1000, 1000] constant (12 GB) written as one float."""
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        c = tf.constant(0.5, dtype=tf.float32, shape=[3000, 1000, 1000], name="c")
        tf.add(x, c, name="y")

    return _write(_graph_def(build), path)


def fill(path: Path) -> Path:
    """Fill([1500, 1000, 1000], x): 6 GB from one kernel, its shape known statically."""
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        tf.fill(tf.constant([1500, 1000, 1000], tf.int32, name="dims"), x, name="y")

    return _write(_graph_def(build), path)


def fill_dynamic(path: Path) -> Path:
    """The same 6 GB Fill, its dimensions computed from an input's value (n * 0 + dims)."""
    import tensorflow as tf

    def build() -> None:
        n = tf.compat.v1.placeholder(tf.int32, [3], name="n")
        dims = tf.add(n * 0, tf.constant([1500, 1000, 1000], tf.int32), name="dims")
        tf.fill(dims, tf.constant(1.0), name="y")

    return _write(_graph_def(build), path)


def abort(path: Path) -> FrozenModel:
    """y = x, run after an Abort op: the process that runs it dies by SIGABRT."""
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        stop = tf.raw_ops.Abort(error_msg="poisoned graph", exit_without_error=False)
        with tf.control_dependencies([stop]):
            tf.identity(x, name="y")

    _write(_graph_def(build), path)
    return FrozenModel(path, {"x": "x:0"}, {"y": "y:0"}, {"x": [1.0, 2.0]})


def fifo_reader(path: Path, fifo: Path) -> FrozenModel:
    """y = x + the length of the contents of fifo: ReadFile opens the pipe and waits for a
    writer, inside one kernel."""
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        contents = tf.io.read_file(tf.constant(str(fifo)), name="contents")
        length = tf.cast(tf.strings.length(contents), tf.float32)
        tf.add(x, length, name="y")

    _write(_graph_def(build), path)
    return FrozenModel(path, {"x": "x:0"}, {"y": "y:0"}, {"x": [1.0, 2.0]})


def big_intermediate(path: Path, dims: tuple[int, ...]) -> FrozenModel:
    """y = sum(fill(n * 0 + dims, x)): a sound model that needs a large intermediate tensor,
    whose size is known only when it runs."""
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        n = tf.compat.v1.placeholder(tf.int32, [len(dims)], name="n")
        shape = tf.add(n * 0, tf.constant(list(dims), tf.int32), name="dims")
        tf.reduce_sum(tf.fill(shape, x), name="y")

    _write(_graph_def(build), path)
    return FrozenModel(
        path, {"x": "x:0", "n": "n:0"}, {"y": "y:0"}, {"x": 0.5, "n": [0] * len(dims)}
    )


def named_input(path: Path, name: str) -> FrozenModel:
    """y = 2 * an input called name: a node name chosen to meet tfmerge's own."""
    import tensorflow as tf

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name=name)
        tf.multiply(x, 2.0, name="y")

    _write(_graph_def(build), path)
    # Keyed by the input's name, as discovery keys it.
    return FrozenModel(path, {name: f"{name}:0"}, {"y": "y:0"}, {name: [[1.0, 2.0]]})


def list_growth(path: Path, elements: int = 262144) -> Path:
    """while True: a new float32 tensor of `elements` (1 MiB) pushed onto a TensorList each
    step; memory grows until something stops it."""
    import tensorflow as tf

    v1 = tf.compat.v1
    was_v2 = v1.control_flow_v2_enabled()

    def build() -> None:
        x = v1.placeholder(tf.float32, [], name="x")
        grown = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[elements])

        def body(i: Any, grown: Any) -> tuple[Any, Any]:
            return i + 1, grown.write(i, tf.fill([elements], x + tf.cast(i, tf.float32)))

        _, grown = v1.while_loop(lambda i, g: tf.constant(True), body, [0, grown], name="grow")
        tf.identity(grown.size(), name="y")

    try:
        v1.enable_control_flow_v2()
        graph_def = _graph_def(build)
    finally:
        (v1.enable_control_flow_v2 if was_v2 else v1.disable_control_flow_v2)()
    return _write(graph_def, path)
