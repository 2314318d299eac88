"""The TensorFlow side of ``bench.numeric``: freeze real architectures, run them under one setting.

Each function here runs in a child process that ``bench.numeric`` starts, because
``TF_ENABLE_ONEDNN_OPTS`` and ``ONEDNN_MAX_CPU_ISA`` are read once, when TensorFlow starts.
The architectures are ``keras.applications`` models with ``weights=None``, an LSTM and a
Transformer, all seeded. Deep nets with untrained batch normalisation blow up or vanish, so
each image model's batch-normalisation statistics are first set to those of a calibration
batch, as a trained model's would match its activations.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH = 2
IMAGE_SIDE = 96
SEED = 1234

#: Model name -> (architecture, compute dtype). The variants in other dtypes reuse the weights
#: of the float32 model, converted.
MODELS: dict[str, tuple[str, str]] = {
    "mobilenetv2": ("mobilenetv2", "float32"),
    "resnet50": ("resnet50", "float32"),
    "efficientnetb0": ("efficientnetb0", "float32"),
    "densenet121": ("densenet121", "float32"),
    "resnet50_224": ("resnet50_224", "float32"),  # full-size input: does the spread grow?
    "lstm": ("lstm", "float32"),
    "transformer": ("transformer", "float32"),
    "mobilenetv2_f16": ("mobilenetv2", "float16"),
    "mobilenetv2_bf16": ("mobilenetv2", "bfloat16"),
    "mobilenetv2_f64": ("mobilenetv2", "float64"),
    "transformer_f16": ("transformer", "float16"),
    "transformer_bf16": ("transformer", "bfloat16"),
    "transformer_f64": ("transformer", "float64"),
    "lstm_f64": ("lstm", "float64"),
}

#: Session settings by name: (session options, environment). "off" is tfmerge's own check
#: (check_session_config); "default" is TensorFlow's defaults, as TensorFlow Serving runs.
SETTINGS: dict[str, tuple[str, dict[str, str]]] = {
    "off": ("off", {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "off_again": ("off", {"TF_ENABLE_ONEDNN_OPTS": "0"}),  # a fresh process, same setting
    "off_1thr": ("off_1thread", {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "off_dnn": ("off", {"TF_ENABLE_ONEDNN_OPTS": "1"}),
    "def": ("default", {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "def_dnn": ("default", {"TF_ENABLE_ONEDNN_OPTS": "1"}),
    "def_dnn_avx2": ("default", {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "def_dnn_sse41": ("default", {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "SSE41"}),
    "def_1thr": ("default_1thread", {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    # The thread count of a bigger serving host.
    "def_8thr": ("default_8threads", {"TF_ENABLE_ONEDNN_OPTS": "0"}),
}


def session_config(kind: str) -> Any:
    from tensorflow.core.protobuf.config_pb2 import ConfigProto

    from tfmerge.build.probe import check_session_config

    config = check_session_config() if kind.startswith("off") else ConfigProto()
    threads = {"_1thread": 1, "_8threads": 8}
    for suffix, count in threads.items():
        if kind.endswith(suffix):
            config.intra_op_parallelism_threads = count
            config.inter_op_parallelism_threads = count
    return config


# --------------------------------------------------------------------------- architectures


def _calibrate_batch_norm(keras: Any, model: Any, batch: np.ndarray) -> None:
    layers = [
        layer
        # Keras has no public walk of nested layers.
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(batch, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def _image_model(keras: Any, name: str, side: int) -> Any:
    applications = {
        "mobilenetv2": keras.applications.MobileNetV2,
        "resnet50": keras.applications.ResNet50,
        "efficientnetb0": keras.applications.EfficientNetB0,
        "densenet121": keras.applications.DenseNet121,
    }
    return applications[name](input_shape=(side, side, 3), weights=None, classifier_activation=None)


def _image_input(name: str, seed: int, side: int, batch: int = BATCH) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(batch, side, side, 3))
    if name == "efficientnetb0":  # it rescales from [0, 255] itself
        x = (x + 1.0) * 127.5
    return x.astype(np.float32)


def _lstm_model(keras: Any) -> Any:
    tokens = keras.Input((40,), dtype="int32")
    hidden = keras.layers.Embedding(5000, 64)(tokens)
    hidden = keras.layers.LSTM(128, return_sequences=True)(hidden)
    hidden = keras.layers.LSTM(128)(hidden)
    return keras.Model(tokens, keras.layers.Dense(20)(hidden))


def _transformer_model(keras: Any, vocab: int = 8000, length: int = 32, width: int = 128) -> Any:
    class AddPosition(keras.layers.Layer):  # type: ignore[misc,name-defined]
        def build(self, shape: Any) -> None:
            self.position = self.add_weight(shape=(shape[1], shape[2]), initializer="random_normal")

        def call(self, x: Any) -> Any:
            return x + keras.ops.cast(self.position, x.dtype)[None]

    tokens = keras.Input((length,), dtype="int32")
    h = AddPosition()(keras.layers.Embedding(vocab, width)(tokens))
    for _ in range(2):
        attended = keras.layers.MultiHeadAttention(4, width // 4)(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(h + attended)
        forward = keras.layers.Dense(512, activation="gelu")(h)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(h + keras.layers.Dense(width)(forward))
    # A per-token language-model head: many tiny probabilities.
    lm_logits = keras.layers.Dense(vocab)(h)
    cls_logits = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, [cls_logits, lm_logits])


def _tokens(vocab: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(BATCH, length)).astype(np.int32)


def _make(keras: Any, family: str) -> tuple[Any, np.ndarray]:
    """A new model of family in the current dtype policy, and its input."""
    if family == "lstm":
        return _lstm_model(keras), _tokens(5000, 40, seed=42)
    if family == "transformer":
        return _transformer_model(keras), _tokens(8000, 32, seed=42)
    base, side = (family.removesuffix("_224"), 224) if family.endswith("_224") else (family, 96)
    return _image_model(keras, base, side), _image_input(base, seed=42, side=side)


# --------------------------------------------------------------------------- freezing


def freeze(work: Path, names: list[str]) -> None:
    """Freeze every model not yet in work/build: NAME.pb, NAME.input.npy, NAME.json."""
    out = work / "build"
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not (out / f"{n}.json").exists()]
    if not todo:
        return
    import tensorflow as tf

    keras = tf.keras
    float32_weights: dict[str, list[Any]] = {}
    for name in sorted(todo, key=lambda n: (list(MODELS).index(n), n)):
        family, dtype = MODELS[name]
        started = time.monotonic()
        keras.utils.set_random_seed(SEED)
        keras.config.set_dtype_policy("float32")
        if family not in float32_weights:
            model, _ = _make(keras, family)
            if family not in ("lstm", "transformer"):
                base = family.removesuffix("_224")
                side = 224 if family.endswith("_224") else IMAGE_SIDE
                _calibrate_batch_norm(keras, model, _image_input(base, 7, side, batch=8))
            float32_weights[family] = model.get_weights()
        keras.config.set_dtype_policy(dtype)
        try:
            model, x = _make(keras, family)
            model.set_weights([np.asarray(w, np.float32) for w in float32_weights[family]])
        finally:
            keras.config.set_dtype_policy("float32")
        graph_def, input_name, outputs = _frozen(tf, model, x, family, dtype)
        (out / f"{name}.pb").write_bytes(graph_def.SerializeToString(deterministic=True))
        np.save(out / f"{name}.input.npy", x)
        meta = {
            "name": name,
            "family": family,
            "dtype": dtype,
            "input": input_name,
            "outputs": outputs,
            "nodes": len(graph_def.node),
            "bytes": graph_def.ByteSize(),
            "freeze_seconds": round(time.monotonic() - started, 1),
        }
        (out / f"{name}.json").write_text(json.dumps(meta))
        print(f"  froze {name}: {meta['nodes']} nodes, {meta['bytes'] / 1e6:.1f} MB", flush=True)


def _frozen(
    tf: Any, model: Any, x: np.ndarray, family: str, dtype: str
) -> tuple[Any, str, dict[str, str]]:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    tokens = x.dtype == np.int32
    spec = tf.TensorSpec(x.shape, tf.int32 if tokens else tf.float32, name="input")

    @tf.function(input_signature=[spec])
    def serve(inputs: Any) -> dict[str, Any]:
        results = model(inputs if tokens else tf.cast(inputs, dtype), training=False)
        if family == "transformer":
            cls_logits, lm_logits = results
            named = {"cls_logits": cls_logits, "lm_logits": lm_logits}
            named |= {"cls_probs": tf.nn.softmax(cls_logits), "lm_probs": tf.nn.softmax(lm_logits)}
        else:
            named = {"logits": results, "probs": tf.nn.softmax(results)}
            named["top1"] = tf.argmax(results, axis=-1, output_type=tf.int32)
        return {key: tf.identity(value, name=f"out_{key}") for key, value in named.items()}

    concrete = serve.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    (input_name,) = [t.name for t in frozen.inputs]
    outputs = {key: f"out_{key}:0" for key in sorted(concrete.structured_outputs)}
    return frozen.graph.as_graph_def(), input_name, outputs


# --------------------------------------------------------------------------- one setting


def run_setting(work: Path, setting: str, names: list[str]) -> None:
    """Run every model twice in one session under setting; save the first run's outputs."""
    import tensorflow as tf

    kind = SETTINGS[setting][0]
    out = work / "runs" / setting
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"setting": setting, "env": SETTINGS[setting][1], "models": {}}
    for name in names:
        meta = json.loads((work / "build" / f"{name}.json").read_text())
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString((work / "build" / f"{name}.pb").read_bytes())
        x = np.load(work / "build" / f"{name}.input.npy")
        with tf.Graph().as_default() as graph:
            tf.graph_util.import_graph_def(graph_def, name="")
        try:
            with tf.compat.v1.Session(graph=graph, config=session_config(kind)) as session:
                first = session.run(meta["outputs"], {meta["input"]: x})
                second = session.run(meta["outputs"], {meta["input"]: x})
        except tf.errors.OpError as exc:  # a kernel missing for a dtype under a setting
            report["models"][name] = {"error": f"{type(exc).__name__}: {exc.message[:300]}"}
            print(f"  [{setting}] {name}: {type(exc).__name__}", flush=True)
            continue
        dtypes = {}
        for key, value in first.items():
            array = np.asarray(value)
            dtypes[key] = array.dtype.name
            # numpy has no bfloat16 of its own: keep the raw bits.
            raw = array.view(np.uint16) if array.dtype.name == "bfloat16" else array
            np.save(out / f"{name}.{key}.npy", raw)
        report["models"][name] = {
            "dtypes": dtypes,
            "rerun_identical": all(
                np.asarray(first[k]).tobytes() == np.asarray(second[k]).tobytes() for k in first
            ),
        }
    (out / "report.json").write_text(json.dumps(report, indent=1))
