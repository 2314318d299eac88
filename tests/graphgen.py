"""Frozen GraphDef fixtures for the test suite and the benchmarks.

Every writer is deterministic (same arguments, byte-identical file) and returns a
`FrozenModel` that says which tensors a signature maps and what a valid probe is.
The cases are the ones a merge gets wrong: TF2 graphs whose function names collide,
a TF1 lookup table that needs its initializer run at load, string tensors, several
inputs and outputs, and graphs that read files or call back into Python.

TensorFlow is imported inside functions: importing this module stays cheap for tests
that only need the dataclass, and the TF2 writer must start from a fresh process.

Run as a script (`python tests/graphgen.py tf2 --variant N --out PATH`) it freezes one
TF2 control-flow graph; `write_tf2_control_flow` does that in a child process.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

TABLE_INIT_OP = "init_all_tables"
HOSTNAME_FILE = "/etc/hostname"
# The PyFunc token names a function registered in the writing process only; fixing it
# keeps the file reproducible. Such a graph is meant to be refused, never run.
PY_FUNC_TOKEN = "pyfunc_0"  # noqa: S105 (a PyFunc registry key, not a secret)

# A fresh process importing TensorFlow: seconds when idle, minutes on a crowded machine.
_TF2_TIMEOUT_SECONDS = 240.0
# Large constants are split so that no single tensor dwarfs the rest and each branch
# stays a cheap matrix product.
_BIG_CONST_BYTES = 64 * 2**20
_FLOAT_BYTES = 4


@dataclass(frozen=True)
class FrozenModel:
    path: Path
    inputs: dict[str, str]  # signature input key -> tensor name
    outputs: dict[str, str]  # signature output key -> tensor name
    sample: dict[str, list[Any]]  # a valid probe value per input key
    # Nodes to run once before the graph answers (table initializers).
    init_ops: tuple[str, ...] = field(default=())


# --- reading and running ---------------------------------------------------------


def load_graph_def(path: Path) -> Any:
    """Parses a binary `.pb` or, by suffix, a text `.pbtxt` GraphDef."""
    import tensorflow as tf
    from google.protobuf import text_format

    graph_def = tf.compat.v1.GraphDef()
    if path.suffix == ".pbtxt":
        text_format.Parse(path.read_text(encoding="utf-8"), graph_def)
    else:
        graph_def.ParseFromString(path.read_bytes())
    return graph_def


def run_frozen(
    path: Path,
    feeds: Mapping[str, Any],
    fetches: Mapping[str, str],
    init_ops: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Runs a frozen graph on its own; `feeds` maps tensor names to values, `fetches`
    maps result keys to tensor names. `init_ops` run first, in order."""
    import tensorflow as tf

    graph_def = load_graph_def(path)
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            for op_name in init_ops:
                session.run(op_name)
            results = session.run(dict(fetches), feed_dict=dict(feeds))
    return {key: np.asarray(value) for key, value in results.items()}


def function_conflicts(first: Path, second: Path) -> list[str]:
    """Names of library functions both graphs define, with different bodies."""
    first_functions = {f.signature.name: f for f in load_graph_def(first).library.function}
    second_functions = {f.signature.name: f for f in load_graph_def(second).library.function}
    shared = first_functions.keys() & second_functions.keys()
    return sorted(name for name in shared if first_functions[name] != second_functions[name])


# --- writing ---------------------------------------------------------------------


def _write_graph_def(path: Path, graph_def: Any, *, text: bool = False) -> None:
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    if text:
        path.write_text(text_format.MessageToString(graph_def), encoding="utf-8")
    else:
        path.write_bytes(graph_def.SerializeToString(deterministic=True))


def _freeze_session(session: Any, output_nodes: Sequence[str]) -> Any:
    import tensorflow as tf

    return tf.compat.v1.graph_util.convert_variables_to_constants(
        session, session.graph.as_graph_def(), list(output_nodes)
    )


def write_dense(
    path: Path,
    *,
    seed: int = 0,
    in_dim: int = 8,
    hidden: int = 16,
    classes: int = 4,
    text: bool = False,
) -> FrozenModel:
    """A TF1 classifier: `x` float32 [None, in_dim] -> `probs`, `classes` (int64)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((in_dim, hidden)) / math.sqrt(in_dim)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / math.sqrt(hidden)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(classes)).astype(np.float32)
    with tf.Graph().as_default() as graph:
        x = v1.placeholder(tf.float32, [None, in_dim], name="x")
        with v1.variable_scope("dense"):
            hidden_layer = tf.nn.relu(
                tf.matmul(x, v1.get_variable("w1", initializer=w1))
                + v1.get_variable("b1", initializer=b1)
            )
            logits = tf.matmul(hidden_layer, v1.get_variable("w2", initializer=w2)) + (
                v1.get_variable("b2", initializer=b2)
            )
        probs = tf.nn.softmax(logits, name="probs")
        tf.argmax(probs, axis=1, output_type=tf.int64, name="classes")
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            frozen = _freeze_session(session, ["probs", "classes"])
    _write_graph_def(path, frozen, text=text)
    return FrozenModel(
        path=path,
        inputs={"x": "x:0"},
        outputs={"probs": "probs:0", "classes": "classes:0"},
        sample={"x": _dense_sample(in_dim)},
    )


def _dense_sample(in_dim: int) -> list[list[float]]:
    # Two rows so that the batch dimension is exercised; short decimals survive TOML.
    return [
        [round((i + 1) / 10, 2) for i in range(in_dim)],
        [round(1.0 - i / 4, 2) for i in range(in_dim)],
    ]


DEFAULT_VOCAB = ("the", "quick", "brown", "fox", "jumps")


def write_table_model(
    path: Path, *, vocab: Sequence[str] = DEFAULT_VOCAB, seed: int = 0
) -> FrozenModel:
    """A TF1 graph with a constant-initialized hash table that must be initialized at
    load: inputs `words` string [None] and `weights` float32 [None]; outputs `ids`
    (position in `vocab`, -1 when absent), `scores` and the string `tokens_upper`."""
    import tensorflow as tf

    if not vocab or len(set(vocab)) != len(vocab):
        raise ValueError(f"vocab must be non-empty and without repeats, got {vocab!r}")
    v1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    # Row 0 scores unknown words; row i + 1 scores vocab[i].
    score_rows = rng.uniform(0.5, 2.0, len(vocab) + 1).astype(np.float32)
    with tf.Graph().as_default() as graph:
        words = v1.placeholder(tf.string, [None], name="words")
        weights = v1.placeholder(tf.float32, [None], name="weights")
        initializer = tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(vocab)), tf.constant(np.arange(len(vocab), dtype=np.int64))
        )
        table = tf.lookup.StaticHashTable(initializer, default_value=-1, name="vocab_table")
        ids = tf.identity(table.lookup(words), name="ids")
        row_scores = v1.get_variable("row_scores", initializer=score_rows)
        tf.multiply(weights, tf.gather(row_scores, ids + 1), name="scores")
        tf.strings.upper(words, name="tokens_upper")
        v1.tables_initializer(name=TABLE_INIT_OP)
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            # Naming the initializer as an output keeps the table's import node.
            frozen = _freeze_session(session, ["ids", "scores", "tokens_upper", TABLE_INIT_OP])
    digest = hashlib.sha256(repr((tuple(vocab), seed)).encode()).hexdigest()[:16]
    for node in frozen.node:
        if node.op == "HashTableV2":
            # TensorFlow names the shared table with a random UUID; a digest of the
            # contents keeps the file reproducible and distinct tables apart.
            node.attr["shared_name"].s = f"hash_table_{digest}".encode()
    _write_graph_def(path, frozen)
    return FrozenModel(
        path=path,
        inputs={"words": "words:0", "weights": "weights:0"},
        outputs={"ids": "ids:0", "scores": "scores:0", "tokens_upper": "tokens_upper:0"},
        sample={"words": [vocab[0], "unknown-word", vocab[-1]], "weights": [1.0, 2.0, 0.5]},
        init_ops=(TABLE_INIT_OP,),
    )


def write_file_reader(path: Path) -> FrozenModel:
    """A graph that reads HOSTNAME_FILE at run time: `y = x + len(file)`."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        x = v1.placeholder(tf.float32, [None], name="x")
        content = tf.io.read_file(HOSTNAME_FILE)
        tf.add(x, tf.cast(tf.strings.length(content), tf.float32), name="y")
    _write_graph_def(path, graph.as_graph_def())
    return FrozenModel(path=path, inputs={"x": "x:0"}, outputs={"y": "y:0"}, sample={"x": [1.0]})


def write_py_func(path: Path) -> FrozenModel:
    """A graph with a PyFunc node (calls back into the Python of the writing process)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        x = v1.placeholder(tf.float32, [None], name="x")
        squared = v1.py_func(np.square, [x], tf.float32)
        tf.identity(squared, name="y")
    graph_def = graph.as_graph_def()
    for node in graph_def.node:
        if node.op == "PyFunc":
            node.attr["token"].s = PY_FUNC_TOKEN.encode()
    _write_graph_def(path, graph_def)
    return FrozenModel(path=path, inputs={"x": "x:0"}, outputs={"y": "y:0"}, sample={"x": [2.0]})


# --- a TF1-era classifier, node for node ------------------------------------------

CLASSIFIER_SCOPE = "classifier"
# Two functions of an input pipeline, left in the library of a graph frozen with TensorFlow 1:
# nothing in the graph calls them, yet importing the graph imports them too.
_UNREACHABLE_FUNCTIONS = (
    """
    signature {
      name: "tf_map_func_labels"
      input_arg { name: "label" type: DT_INT64 }
      output_arg { name: "one_hot" type: DT_FLOAT }
    }
    node_def {
      name: "depth" op: "Const"
      attr { key: "dtype" value { type: DT_INT32 } }
      attr { key: "value" value { tensor { dtype: DT_INT32 tensor_shape {} int_val: 2 } } }
    }
    node_def {
      name: "on" op: "Const"
      attr { key: "dtype" value { type: DT_FLOAT } }
      attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape {} float_val: 1 } } }
    }
    node_def {
      name: "off" op: "Const"
      attr { key: "dtype" value { type: DT_FLOAT } }
      attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape {} float_val: 0 } } }
    }
    node_def {
      name: "OneHot" op: "OneHot"
      input: "label" input: "depth:output:0" input: "on:output:0" input: "off:output:0"
      attr { key: "T" value { type: DT_FLOAT } }
      attr { key: "TI" value { type: DT_INT64 } }
      attr { key: "axis" value { i: -1 } }
    }
    ret { key: "one_hot" value: "OneHot:output:0" }
    """,
    """
    signature {
      name: "tf_map_func_samples"
      input_arg { name: "samples" type: DT_INT16 }
      output_arg { name: "features" type: DT_FLOAT }
    }
    node_def {
      name: "Cast" op: "Cast" input: "samples"
      attr { key: "SrcT" value { type: DT_INT16 } }
      attr { key: "DstT" value { type: DT_FLOAT } }
      attr { key: "Truncate" value { b: false } }
    }
    node_def {
      name: "scale" op: "Const"
      attr { key: "dtype" value { type: DT_FLOAT } }
      attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape {} float_val: 3.0517578e-05 } } }
    }
    node_def {
      name: "Mul" op: "Mul" input: "Cast:y:0" input: "scale:output:0"
      attr { key: "T" value { type: DT_FLOAT } }
    }
    ret { key: "features" value: "Mul:z:0" }
    """,
)


def write_tf1_classifier(
    path: Path, *, seed: int = 0, in_dim: int = 640, hidden: int = 20, classes: int = 2
) -> FrozenModel:
    """A classifier as TensorFlow 1 froze them, written node by node: input `features` float32
    [-1, in_dim] -> MatMul, BiasAdd, Relu -> MatMul, BiasAdd, Softmax -> TopKV2 (k = 1), whose
    values and indices, squeezed, are the outputs `probs` float32 [-1] and `classes` int32
    [-1]. Weights are constants read through Identity nodes, the function library holds two
    functions nothing calls, and the `versions` field is left empty, as in graphs written
    before TensorFlow recorded it."""
    import tensorflow as tf
    from google.protobuf import text_format

    attr = tf.compat.v1.AttrValue
    t_float = attr(type=tf.float32.as_datatype_enum)
    t_int32 = attr(type=tf.int32.as_datatype_enum)
    rng = np.random.default_rng(seed)
    scope = CLASSIFIER_SCOPE
    graph_def = tf.compat.v1.GraphDef()

    def add(node: Any) -> str:
        graph_def.node.append(node)
        return str(node.name)

    def weights(name: str, shape: tuple[int, ...], scale: float) -> str:
        values = (scale * rng.standard_normal(shape)).astype(np.float32)
        const = add(
            _node(name, "Const", dtype=t_float, value=attr(tensor=tf.make_tensor_proto(values)))
        )
        colocate = attr(list=attr.ListValue(s=[f"loc:@{const}".encode()]))
        return add(_node(f"{const}/read", "Identity", [const], T=t_float, _class=colocate))

    def dense(name: str, inputs: str, width: int, out: int) -> str:
        kernel = weights(f"{scope}/{name}/weights", (width, out), 1.0 / math.sqrt(width))
        bias = weights(f"{scope}/{name}/biases", (out,), 0.1)
        false = attr(b=False)
        product = add(
            _node(
                f"{scope}/{name}/MatMul",
                "MatMul",
                [inputs, kernel],
                T=t_float,
                transpose_a=false,
                transpose_b=false,
            )
        )
        nhwc = attr(s=b"NHWC")
        return add(
            _node(
                f"{scope}/{name}/BiasAdd", "BiasAdd", [product, bias], T=t_float, data_format=nhwc
            )
        )

    shape = tf.TensorShape([None, in_dim]).as_proto()
    features = add(
        _node(f"{scope}/features", "Placeholder", dtype=t_float, shape=attr(shape=shape))
    )
    hidden_layer = dense("fully_connected", features, in_dim, hidden)
    relu = add(_node(f"{scope}/fully_connected/Relu", "Relu", [hidden_layer], T=t_float))
    logits = dense("logits", relu, hidden, classes)
    softmax = add(_node(f"{scope}/prediction", "Softmax", [logits], T=t_float))
    one = attr(tensor=tf.make_tensor_proto(np.int32(1)))
    k = add(_node(f"{scope}/TopKV2/k", "Const", dtype=t_int32, value=one))
    top = add(_node(f"{scope}/TopKV2", "TopKV2", [softmax, k], T=t_float, sorted=attr(b=True)))
    squeeze = attr(list=attr.ListValue(i=[1]))
    probs = add(_node(f"{scope}/Squeeze", "Squeeze", [top], T=t_float, squeeze_dims=squeeze))
    indices = add(
        _node(f"{scope}/Squeeze_1", "Squeeze", [f"{top}:1"], T=t_int32, squeeze_dims=squeeze)
    )
    add(_node(f"{scope}/predict_probs", "Identity", [probs], T=t_float))
    add(_node(f"{scope}/predict_classes", "Identity", [indices], T=t_int32))
    for text in _UNREACHABLE_FUNCTIONS:
        text_format.Parse(text, graph_def.library.function.add())
    _write_graph_def(path, graph_def)
    sample = np.round(np.random.default_rng(seed + 1).standard_normal((3, in_dim)), 2)
    return FrozenModel(
        path=path,
        inputs={"inputs": f"{scope}/features:0"},
        outputs={"classes": f"{scope}/predict_classes:0", "probs": f"{scope}/predict_probs:0"},
        sample={"inputs": sample.tolist()},
    )


# --- TF2 control flow, frozen in a fresh process -----------------------------------

TF2_INPUTS = {"x": "x:0"}
TF2_OUTPUTS = {"y": "y:0", "row_sum": "row_sum:0"}
TF2_SAMPLE: dict[str, list[Any]] = {"x": [[0.5, -1.0, 0.25, 2.0], [-0.5, 0.0, 1.5, -2.0]]}


def _freeze_tf2_control_flow(path: Path, variant: int) -> None:
    """Runs in the child process. Every variant builds the same ops in the same order,
    so TensorFlow's process-wide counters give the functions the same names in every
    process, while the constants inside them differ with `variant`."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    rng = np.random.default_rng(variant)
    shift = tf.Variable(rng.standard_normal(4).astype(np.float32))
    decay = 0.5 + 0.1 * variant
    steps = 3 + variant

    def model(x: Any) -> tuple[Any, Any]:
        def body(i: Any, acc: Any) -> tuple[Any, Any]:
            return i + 1, tf.tanh(acc * decay + shift)

        _, acc = tf.while_loop(lambda i, _acc: i < steps, body, [tf.constant(0), x])
        y = tf.cond(
            tf.reduce_sum(acc) > 0,
            lambda: acc * (2.0 + variant),
            lambda: acc - (1.0 + variant),
        )
        return tf.identity(y, name="y"), tf.reduce_sum(y, axis=1, name="row_sum")

    signature = [tf.TensorSpec([None, 4], tf.float32, name="x")]
    concrete = tf.function(model, input_signature=signature).get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False)
    _write_graph_def(path, frozen.graph.as_graph_def())


def _tf2_model(path: Path) -> FrozenModel:
    return FrozenModel(
        path=path, inputs=dict(TF2_INPUTS), outputs=dict(TF2_OUTPUTS), sample=dict(TF2_SAMPLE)
    )


def _start_tf2(path: Path, variant: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(Path(__file__).resolve()), "tf2"]
    command += ["--variant", str(variant), "--out", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _finish_tf2(process: subprocess.Popen[bytes]) -> None:
    try:
        _, stderr = process.communicate(timeout=_TF2_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        tail = stderr.decode(errors="replace")[-4000:]
        raise RuntimeError(f"{process.args!r} exited {process.returncode}:\n{tail}")


def _run_tf2(jobs: Sequence[tuple[Path, int]]) -> None:
    for path, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.extend(_start_tf2(path, variant) for path, variant in jobs)
        for process in processes:
            _finish_tf2(process)
    finally:
        # An error in one child must not leave the other running.
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def write_tf2_control_flow(path: Path, *, variant: int) -> FrozenModel:
    """A TF2 graph (`tf.while_loop` and `tf.cond` kept as functions) frozen in a child
    process: `x` float32 [None, 4] -> `y` [None, 4], `row_sum` [None]."""
    if variant < 0:
        raise ValueError(f"variant must be >= 0, got {variant}")
    _run_tf2([(path, variant)])
    return _tf2_model(path)


def tf2_pair(directory: Path) -> tuple[FrozenModel, FrozenModel]:
    """Two TF2 graphs frozen in two processes whose function libraries define the same
    names with different bodies; raises if they do not."""
    first, second = tf2_models(directory)
    _run_tf2([(first.path, 0), (second.path, 1)])
    if not function_conflicts(first.path, second.path):
        raise RuntimeError(
            f"{first.path} and {second.path} share no function name with different bodies"
        )
    return first, second


def tf2_models(directory: Path) -> tuple[FrozenModel, FrozenModel]:
    """The models of the pair `tf2_pair` writes into directory."""
    return _tf2_model(directory / "tf2_variant0.pb"), _tf2_model(directory / "tf2_variant1.pb")


# --- big graphs for benchmarks, written without building them in memory ------------


def _node(name: str, op: str, inputs: Sequence[str] = (), **attrs: Any) -> Any:
    import tensorflow as tf

    node = tf.compat.v1.NodeDef(name=name, op=op, input=list(inputs))
    for key, value in attrs.items():
        node.attr[key].CopyFrom(value)
    return node


def _write_field(out: BinaryIO, field_number: int, payload: bytes) -> None:
    # Length-delimited protobuf field: tag, varint length, bytes.
    header = bytearray([(field_number << 3) | 2])
    length = len(payload)
    while length >= 0x80:
        header.append((length & 0x7F) | 0x80)
        length >>= 7
    header.append(length)
    out.write(bytes(header))
    out.write(payload)


def write_big_dense(
    path: Path, *, target_bytes: int, seed: int = 0, in_dim: int = 8, classes: int = 4
) -> FrozenModel:
    """A classifier like `write_dense` whose float32 weights total about `target_bytes`:
    parallel branches `relu(x @ A_k) @ B_k`, summed into logits. One run costs about
    one pass over the weights. The GraphDef is streamed node by node, so memory stays
    near one constant; a GraphDef must stay below 2 GiB to be readable at all."""
    import tensorflow as tf

    if not 0 < target_bytes < 2**31 - 2**26:
        raise ValueError(f"target_bytes must be positive and well below 2 GiB: {target_bytes}")
    attr = tf.compat.v1.AttrValue
    t_float = attr(type=tf.float32.as_datatype_enum)
    branch_floats = in_dim + classes  # per unit of hidden width
    branches = max(1, math.ceil(target_bytes / _BIG_CONST_BYTES))
    width = max(1, round(target_bytes / (_FLOAT_BYTES * branch_floats * branches)))
    rng = np.random.default_rng(seed)

    def weights(shape: tuple[int, ...], scale: float) -> Any:
        # Uniform on [-scale, scale): twice as fast to draw as normals at this size.
        values = rng.random(shape, dtype=np.float32)
        values *= np.float32(2 * scale)
        values -= np.float32(scale)
        return attr(tensor=tf.make_tensor_proto(values))

    def const(name: str, value: Any) -> Any:
        return _node(name, "Const", dtype=t_float, value=value)

    def matmul(name: str, a: str, b: str) -> Any:
        false = attr(b=False)
        return _node(name, "MatMul", [a, b], T=t_float, transpose_a=false, transpose_b=false)

    # sqrt(3) turns a uniform bound into unit variance; the sum over every branch's
    # width is scaled down so the logits stay near unit size.
    in_scale = math.sqrt(3.0 / in_dim)
    out_scale = math.sqrt(6.0 / (width * branches))
    shape = tf.TensorShape([None, in_dim]).as_proto()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:

        def emit(node: Any) -> None:
            _write_field(out, 1, node.SerializeToString(deterministic=True))

        emit(_node("x", "Placeholder", dtype=t_float, shape=attr(shape=shape)))
        branch_logits = []
        for k in range(branches):
            emit(const(f"big/a{k}", weights((in_dim, width), in_scale)))
            emit(const(f"big/b{k}", weights((width, classes), out_scale)))
            emit(matmul(f"big/h{k}", "x", f"big/a{k}"))
            emit(_node(f"big/relu{k}", "Relu", [f"big/h{k}"], T=t_float))
            emit(matmul(f"big/logits{k}", f"big/relu{k}", f"big/b{k}"))
            branch_logits.append(f"big/logits{k}")
        emit(_node("big/sum", "AddN", branch_logits, T=t_float, N=attr(i=branches)))
        emit(const("big/bias", weights((classes,), 0.1)))
        emit(_node("big/logits", "BiasAdd", ["big/sum", "big/bias"], T=t_float))
        emit(_node("probs", "Softmax", ["big/logits"], T=t_float))
        axis = attr(tensor=tf.make_tensor_proto(np.int32(1)))
        emit(_node("classes/axis", "Const", dtype=attr(type=tf.int32.as_datatype_enum), value=axis))
        emit(
            _node(
                "classes",
                "ArgMax",
                ["probs", "classes/axis"],
                T=t_float,
                Tidx=attr(type=tf.int32.as_datatype_enum),
                output_type=attr(type=tf.int64.as_datatype_enum),
            )
        )
        versions = tf.compat.v1.GraphDef().versions
        versions.producer = tf.version.GRAPH_DEF_VERSION
        versions.min_consumer = tf.version.GRAPH_DEF_VERSION_MIN_CONSUMER
        _write_field(out, 4, versions.SerializeToString(deterministic=True))
    return FrozenModel(
        path=path,
        inputs={"x": "x:0"},
        outputs={"probs": "probs:0", "classes": "classes:0"},
        sample={"x": _dense_sample(in_dim)},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tf2 = commands.add_parser("tf2", help="freeze one TF2 control-flow graph")
    tf2.add_argument("--variant", type=int, required=True)
    tf2.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    _freeze_tf2_control_flow(args.out, args.variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
