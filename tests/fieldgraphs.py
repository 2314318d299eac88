"""Frozen graphs of real architectures, and the quirks of graphs frozen in the field.

Keras applications with random weights, a text model (string -> lookup table -> embedding ->
LSTM in a functional While), a TF1 graph with v1 while loops (conv, FusedBatchNorm, a
``dynamic_rnn`` GRU), a Transformer block; and graphs frozen the ways people freeze them: with
every node pinned to ``/device:GPU:0``, with a GPU-only kernel, with an 8 MiB constant inside a
loop body, with a table whose initializer runs a v1 while loop.

One child process writes a whole set (``write_set``), in a fixed order with fixed seeds, so
that a set is generated identically every time (TensorFlow names functions after
process-wide counters) and TensorFlow and Keras are imported once. Each set folder holds
``frozen/*.pb`` and ``models.json``, written last: the declaration of every model (signature,
file, inputs, outputs, sample) plus ``example``, the dtype and shape of an input batch, and
``init_ops``, the nodes to run before the graph answers (table initializers).

Run as ``python tests/fieldgraphs.py OUT SET``; SET is ``small`` (the test suite's, seconds to
generate) or ``real`` (bench/fieldset.py's, about 170 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "models.json"
TABLE_INIT_OP = "init_all_tables"
GPU = "/device:GPU:0"
VOCAB = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat")
TEXT_SAMPLE = ["the quick brown fox", "a lazy dog jumps over the cat", ""]
_TIMEOUT_SECONDS = 1800.0

# What each set holds: writer name -> keyword arguments, in generation order.
SETS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "small": [
        ("mobilenet", "keras_image", {"app": "MobileNetV2", "size": 32, "alpha": 0.35}),
        ("text_lstm", "text_lstm", {"vocab": 1000, "dim": 16, "units": 24, "seq": 6}),
        ("loop_const", "loop_constant", {"rows": 2048, "cols": 1024}),
        ("gru_a", "tf1_gru", {"units": 8, "side": 8, "seed": 1}),
        ("gru_b", "tf1_gru", {"units": 6, "side": 8, "seed": 2}),
        ("table_loop_a", "table_in_loop", {"count": 4}),
        ("table_loop_b", "table_in_loop", {"count": 6}),
        ("gpu_text", "pinned", {"source": "text_lstm"}),
        ("cudnn", "gpu_only_kernel", {}),
    ],
    "real": [
        ("mobilenet_v2", "keras_image", {"app": "MobileNetV2", "size": 224}),
        ("resnet50", "keras_image", {"app": "ResNet50", "size": 224}),
        ("efficientnet_b0", "keras_image", {"app": "EfficientNetB0", "size": 224}),
        ("densenet121", "keras_image", {"app": "DenseNet121", "size": 224}),
        ("text_lstm", "text_lstm", {"vocab": 5000, "dim": 64, "units": 128, "seq": 32}),
        ("transformer", "transformer", {"vocab": 2000, "dim": 128, "seq": 64}),
        ("gru_tf1", "tf1_gru", {"units": 256, "side": 32, "seed": 3}),
    ],
}


def write_set(out: Path, name: str) -> list[dict[str, Any]]:
    """Generate set ``name`` into out (in a child process) unless it is there; its models."""
    manifest = out / MANIFEST
    if not manifest.exists():
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(out), name],
            env=env,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"generating set {name} failed:\n{done.stderr[-4000:]}")
    models: list[dict[str, Any]] = json.loads(manifest.read_text())["models"]
    return models


def example_feeds(entry: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """A batch for every input of a model: its sample, or values drawn for its dtype and shape."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for key, spec in entry["example"].items():
        if "values" in spec:
            dtype = object if spec["dtype"] == "string" else spec["dtype"]
            values = spec["values"]
            feeds[key] = np.array(
                [v.encode() for v in values] if dtype is object else values, dtype=dtype
            )
        elif spec["dtype"].startswith("float"):
            feeds[key] = rng.uniform(-1.0, 1.0, spec["shape"]).astype(spec["dtype"])
        else:
            feeds[key] = rng.integers(0, spec.get("high", 2), spec["shape"]).astype(spec["dtype"])
    return feeds


# --- writers (run in the child process) ----------------------------------------------


def _save(path: Path, graph_def: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(graph_def.SerializeToString(deterministic=True))


def _freeze_function(function: Any, *, lower: bool) -> Any:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(
        function.get_concrete_function(), lower_control_flow=lower
    )
    return frozen.graph.as_graph_def()


def _calibrate_batch_norm(keras: Any, model: Any, batch: np.ndarray) -> None:
    """Moving statistics from one batch: with random weights, the stored 0/1 statistics make a
    deep network's activations blow up or vanish, and outputs of inf or 0 compare poorly."""
    layers = [x for x in model._flatten_layers() if isinstance(x, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(batch, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def keras_image(path: Path, *, app: str, size: int, alpha: float | None = None) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(1234)
    options: dict[str, Any] = {"alpha": alpha} if alpha is not None else {}
    model = getattr(keras.applications, app)(
        input_shape=(size, size, 3), weights=None, classifier_activation=None, **options
    )
    rng = np.random.default_rng(7)
    _calibrate_batch_norm(keras, model, rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
    def serve(image: Any) -> Any:
        logits = model(image, training=False)
        return tf.identity(logits, name="logits"), tf.nn.softmax(logits, name="probs")

    _save(path, _freeze_function(serve, lower=False))
    return {
        "inputs": {"image": "image:0"},
        "outputs": {"logits": "logits:0", "probs": "probs:0"},
        "example": {"image": {"dtype": "float32", "shape": [2, size, size, 3]}},
    }


def _keras_sequence_graph(build: Callable[[Any, Any], Any], seq: int) -> Any:
    """A Keras network on int64 token ids [None, seq], frozen with its While loops kept."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(1234)
    tokens = keras.Input((seq,), dtype="int64")
    model = keras.Model(tokens, build(keras, tokens))

    @tf.function(input_signature=[tf.TensorSpec([None, seq], tf.int64, name="ids")])
    def serve(ids: Any) -> Any:
        return tf.identity(model(ids, training=False), name="logits")

    return _freeze_function(serve, lower=False)


def text_lstm(path: Path, *, vocab: int, dim: int, units: int, seq: int) -> dict[str, Any]:
    """Strings -> words -> a lookup table -> embedding -> LSTM (a functional While) -> classes.

    The table is a TF1 HashTableV2 whose initializer the graph names ``init_all_tables``, as
    in a graph frozen from a TF1 session; its keys are the words of VOCAB.
    """
    import tensorflow as tf

    network = _keras_sequence_graph(
        lambda keras, x: keras.layers.Dense(5)(
            keras.layers.LSTM(units)(keras.layers.Embedding(vocab, dim)(x))
        ),
        seq,
    )
    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        text = v1.placeholder(tf.string, [None], name="text")
        words = tf.strings.split(tf.strings.lower(text)).to_tensor("", shape=[None, seq])
        initializer = tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(VOCAB)), tf.constant(np.arange(2, len(VOCAB) + 2, dtype=np.int64))
        )
        table = tf.lookup.StaticHashTable(initializer, default_value=1, name="vocab")
        ids = tf.where(tf.equal(words, ""), tf.zeros_like(words, tf.int64), table.lookup(words))
        (logits,) = tf.graph_util.import_graph_def(
            network, input_map={"ids:0": ids}, return_elements=["logits:0"], name="net"
        )
        tf.identity(logits, name="logits")
        tf.nn.softmax(logits, name="probs")
        tf.identity(ids, name="ids")
        v1.tables_initializer(name=TABLE_INIT_OP)
    graph_def = v1.graph_util.extract_sub_graph(
        graph.as_graph_def(), ["logits", "probs", "ids", TABLE_INIT_OP]
    )
    for node in graph_def.node:
        if node.op == "HashTableV2":
            # A random name otherwise: the file would differ from run to run.
            node.attr["shared_name"].s = f"vocab_{path.stem}".encode()
    _save(path, graph_def)
    return {
        "inputs": {"text": "text:0"},
        "outputs": {"logits": "logits:0", "probs": "probs:0", "ids": "ids:0"},
        "sample": {"text": TEXT_SAMPLE},
        "example": {"text": {"dtype": "string", "values": TEXT_SAMPLE}},
        "init_ops": [TABLE_INIT_OP],
    }


def transformer(path: Path, *, vocab: int, dim: int, seq: int) -> dict[str, Any]:
    """One Transformer encoder block on token ids, with a classification head."""

    def build(keras: Any, tokens: Any) -> Any:
        h = keras.layers.Embedding(vocab, dim)(tokens)
        attention = keras.layers.MultiHeadAttention(4, dim // 4)(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(h + attention)
        forward = keras.layers.Dense(dim)(keras.layers.Dense(4 * dim, activation="gelu")(h))
        h = keras.layers.LayerNormalization(epsilon=1e-6)(h + forward)
        return keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(h))

    _save(path, _keras_sequence_graph(build, seq))
    return {
        "inputs": {"ids": "ids:0"},
        "outputs": {"logits": "logits:0"},
        "example": {"ids": {"dtype": "int64", "shape": [2, seq], "high": vocab}},
    }


class _MiniGRU:
    """GRUCell's equations (reset gate, update gate, candidate) as an object ``dynamic_rnn``
    accepts: Keras 3 no longer provides ``tf.compat.v1.nn.rnn_cell.GRUCell``."""

    def __init__(self, units: int, inputs: int, seed: int) -> None:
        import tensorflow as tf

        # Outside the loop, where a frozen TF1 graph has its weights: read through Enter.
        rng = np.random.default_rng(seed)
        width = inputs + units
        self.units = units
        self.weights = tuple(
            tf.constant(rng.normal(0, 1 / np.sqrt(width), shape).astype(np.float32), name=name)
            for name, shape in (
                ("gru/gates/kernel", (width, 2 * units)),
                ("gru/gates/bias", (2 * units,)),
                ("gru/candidate/kernel", (width, units)),
                ("gru/candidate/bias", (units,)),
            )
        )

    @property
    def state_size(self) -> int:
        return self.units

    @property
    def output_size(self) -> int:
        return self.units

    def zero_state(self, batch_size: Any, dtype: Any) -> Any:
        import tensorflow as tf

        return tf.zeros([batch_size, self.units], dtype)

    def __call__(self, x: Any, h: Any, scope: Any = None) -> tuple[Any, Any]:
        import tensorflow as tf

        gate_kernel, gate_bias, kernel, bias = self.weights
        gates = tf.sigmoid(tf.matmul(tf.concat([x, h], 1), gate_kernel) + gate_bias)
        reset, update = tf.split(gates, 2, axis=1)
        candidate = tf.tanh(tf.matmul(tf.concat([x, reset * h], 1), kernel) + bias)
        new_h = update * h + (1 - update) * candidate
        return new_h, new_h


def tf1_gru(path: Path, *, units: int, side: int, seed: int) -> dict[str, Any]:
    """A TF1 graph: conv, FusedBatchNorm, then a ``dynamic_rnn`` GRU over the image's rows."""
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    channels = 8
    v1.disable_control_flow_v2()
    try:
        with tf.Graph().as_default() as graph:
            image = v1.placeholder(tf.float32, [None, side, side, 3], name="image")
            kernel = rng.normal(0, 0.3, (3, 3, 3, channels)).astype(np.float32)
            conv = tf.nn.conv2d(image, kernel, strides=1, padding="SAME")
            normed, _, _ = v1.nn.fused_batch_norm(
                conv,
                scale=rng.uniform(0.5, 1.5, channels).astype(np.float32),
                offset=rng.normal(0, 0.1, channels).astype(np.float32),
                mean=rng.normal(0, 0.1, channels).astype(np.float32),
                variance=rng.uniform(0.5, 1.5, channels).astype(np.float32),
                is_training=False,
            )
            rows = tf.reshape(tf.nn.relu(normed), [-1, side, side * channels])
            _, state = v1.nn.dynamic_rnn(
                _MiniGRU(units, side * channels, seed), rows, dtype=tf.float32
            )
            dense = rng.normal(0, 0.3, (units, 4)).astype(np.float32)
            tf.nn.softmax(tf.matmul(state, dense), name="probs")
            tf.identity(state, name="state")
        graph_def = v1.graph_util.extract_sub_graph(graph.as_graph_def(), ["probs", "state"])
    finally:
        v1.enable_control_flow_v2()
    _save(path, graph_def)
    return {
        "inputs": {"image": "image:0"},
        "outputs": {"probs": "probs:0", "state": "state:0"},
        "example": {"image": {"dtype": "float32", "shape": [2, side, side, 3]}},
    }


def table_in_loop(path: Path, *, count: int) -> dict[str, Any]:
    """A TF1 table whose keys a v1 while loop computes: its initializer runs that loop."""
    import tensorflow as tf

    v1 = tf.compat.v1
    v1.disable_control_flow_v2()
    try:
        with tf.Graph().as_default() as graph:
            words = v1.placeholder(tf.string, [None], name="words")
            _, keys = v1.while_loop(
                lambda i, _: i < count,
                lambda i, acc: (i + 1, tf.concat([acc, [i * 10]], 0)),
                (tf.constant(0), tf.zeros([0], tf.int32)),
                shape_invariants=(tf.TensorShape([]), tf.TensorShape([None])),
            )
            initializer = tf.lookup.KeyValueTensorInitializer(
                tf.strings.as_string(keys), tf.cast(keys, tf.int64)
            )
            table = tf.lookup.StaticHashTable(initializer, -1)
            tf.identity(table.lookup(words), name="ids")
            v1.tables_initializer(name=TABLE_INIT_OP)
        graph_def = v1.graph_util.extract_sub_graph(graph.as_graph_def(), ["ids", TABLE_INIT_OP])
    finally:
        v1.enable_control_flow_v2()
    for node in graph_def.node:
        if node.op == "HashTableV2":
            node.attr["shared_name"].s = f"table_{path.stem}".encode()
    _save(path, graph_def)
    sample = ["0", "10", "30", "50", "x"]
    return {
        "inputs": {"words": "words:0"},
        "outputs": {"ids": "ids:0"},
        "sample": {"words": sample},
        "example": {"words": {"dtype": "string", "values": sample}},
        "init_ops": [TABLE_INIT_OP],
    }


def loop_constant(path: Path, *, rows: int, cols: int) -> dict[str, Any]:
    """A TF2 graph whose While body holds a constant of rows x cols floats (8 MiB and more)."""
    import tensorflow as tf

    weights = np.random.default_rng(5).normal(0, 0.03, (rows, cols)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, cols], tf.float32, name="x")])
    def serve(x: Any) -> Any:
        def body(i: Any, h: Any) -> Any:
            wide = tf.concat([h] * (rows // cols), 1)
            return i + 1, tf.tanh(tf.matmul(wide, tf.constant(weights)))

        _, h = tf.while_loop(lambda i, _: i < 3, body, (tf.constant(0), x))
        return tf.identity(h, name="y")

    _save(path, _freeze_function(serve, lower=False))
    return {
        "inputs": {"x": "x:0"},
        "outputs": {"y": "y:0"},
        "example": {"x": {"dtype": "float32", "shape": [2, cols]}},
    }


def pinned(path: Path, *, source: str) -> dict[str, Any]:
    """A copy of another model of the set with every node pinned to GPU, functions included,
    as graphs frozen with ``convert_variables_to_constants`` on a GPU machine are."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((path.parent / f"{source}.pb").read_bytes())
    for node in graph_def.node:
        node.device = GPU
    for function in graph_def.library.function:
        for node in function.node_def:
            node.device = GPU
    _save(path, graph_def)
    entry = dict(_written[source])
    entry["unpinned"] = f"{source}.pb"
    return entry


def gpu_only_kernel(path: Path) -> dict[str, Any]:
    """A cuDNN LSTM: its op has GPU kernels only."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        x = v1.placeholder(tf.float32, [None, 1, 4], name="x")
        outputs = tf.raw_ops.CudnnRNNV3(
            input=x,
            input_h=tf.zeros([1, 1, 4]),
            input_c=tf.zeros([1, 1, 4]),
            params=tf.zeros([200]),
            sequence_lengths=tf.constant([2], tf.int32),
            rnn_mode="lstm",
            is_training=False,
        )
        tf.identity(outputs[0], name="y")
    _save(path, graph.as_graph_def())
    return {
        "inputs": {"x": "x:0"},
        "outputs": {"y": "y:0"},
        "example": {"x": {"dtype": "float32", "shape": [2, 1, 4]}},
    }


_written: dict[str, dict[str, Any]] = {}


def _generate(out: Path, name: str) -> None:
    models = []
    writers = sys.modules[__name__].__dict__
    for signature, writer, options in SETS[name]:
        path = out / "frozen" / f"{signature}.pb"
        entry = writers[writer](path, **options)
        _written[signature] = entry
        models.append({"signature": signature, "frozen": path.name, **entry})
        models[-1]["bytes"] = path.stat().st_size
    (out / MANIFEST).write_text(json.dumps({"set": name, "models": models}, indent=1) + "\n")


if __name__ == "__main__":
    _generate(Path(sys.argv[1]), sys.argv[2])
