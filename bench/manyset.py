"""Many small models: N distinct frozen graphs of about 100 KiB each, as a busy host has them.

Even indices are MLPs (2 or 3 dense layers), odd ones small conv nets (2 convolutions, a
pool and a dense layer); the weights are seeded by index, so every file is distinct, and no
constant reaches 1 MiB, so nothing goes into ``variables/``. The graphs are built directly
from Const nodes, the way a frozen graph holds its weights.

The set of N is the first N models of the largest set: the graph of model ``m0042`` is the
same bytes in every set, so that the costs of sets of different N differ only by the number
of models. ``change_one`` rewrites one model with new weights (same names and shapes), the
upload a one-model rebuild measures.

Usage: ``python -m bench.manyset DIR N SEED`` (what bench/sets.py runs in a child process).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _mlp(rng: np.random.Generator, index: int) -> tuple[Any, dict[str, str], dict[str, str]]:
    import tensorflow as tf

    v1 = tf.compat.v1
    in_dim = 48 + 8 * (index % 5)
    layers = [160, 96] if index % 4 == 0 else [128, 96, 64]
    classes = 10
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, in_dim], name="x")
        hidden, width_in = x, in_dim
        for k, width in enumerate(layers):
            w = (rng.standard_normal((width_in, width)) / math.sqrt(width_in)).astype(np.float32)
            b = (0.1 * rng.standard_normal(width)).astype(np.float32)
            product = tf.matmul(hidden, tf.constant(w, name=f"w{k}"))
            hidden = tf.nn.relu(product + tf.constant(b, name=f"b{k}"), name=f"relu{k}")
            width_in = width
        w = (rng.standard_normal((width_in, classes)) / math.sqrt(width_in)).astype(np.float32)
        logits = tf.matmul(hidden, tf.constant(w, name="wout"), name="logits")
        probs = tf.nn.softmax(logits, name="probs")
        tf.argmax(probs, axis=1, output_type=tf.int64, name="classes")
    return graph.as_graph_def(), {"x": "x:0"}, {"probs": "probs:0", "classes": "classes:0"}


def _conv(rng: np.random.Generator, index: int) -> tuple[Any, dict[str, str], dict[str, str]]:
    del index
    import tensorflow as tf

    v1 = tf.compat.v1
    side, c1, c2, classes = 16, 16, 32, 12
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, side, side, 3], name="image")
        k1 = (rng.standard_normal((3, 3, 3, c1)) / math.sqrt(27)).astype(np.float32)
        k2 = (rng.standard_normal((3, 3, c1, c2)) / math.sqrt(9 * c1)).astype(np.float32)
        h = tf.nn.relu(tf.nn.conv2d(x, tf.constant(k1, name="k1"), 1, "SAME"), name="conv1")
        h = tf.nn.max_pool2d(h, 2, 2, "VALID", name="pool1")
        h = tf.nn.relu(tf.nn.conv2d(h, tf.constant(k2, name="k2"), 1, "SAME"), name="conv2")
        flat = (side // 2) * (side // 2) * c2
        h = tf.reshape(h, [-1, flat], name="flat")
        w = (rng.standard_normal((flat, classes)) / math.sqrt(flat)).astype(np.float32)
        b = (0.1 * rng.standard_normal(classes)).astype(np.float32)
        logits = tf.add(
            tf.matmul(h, tf.constant(w, name="wfc")), tf.constant(b, name="bfc"), name="logits"
        )
        tf.nn.softmax(logits, name="scores")
        tf.argmax(logits, axis=1, output_type=tf.int64, name="label")
    return graph.as_graph_def(), {"image": "image:0"}, {"scores": "scores:0", "label": "label:0"}


def signature_of(index: int) -> str:
    return f"m{index:04d}"


def write_model(path: Path, index: int, seed: int) -> dict[str, Any]:
    """Model ``index`` of the set, written to path (through a temporary name and a rename)."""
    rng = np.random.default_rng(seed * 1_000_003 + index)
    make = _mlp if index % 2 == 0 else _conv
    graph_def, inputs, outputs = make(rng, index)
    # What bench/check_published feeds both sides with: two rows of short decimals.
    sample = {key: _sample(graph_def, name, rng) for key, name in inputs.items()}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(graph_def.SerializeToString(deterministic=True))
    os.replace(temporary, path)
    return {
        "signature": signature_of(index),
        "frozen": path.name,
        "inputs": inputs,
        "outputs": outputs,
        "sample": sample,
        "bytes": path.stat().st_size,
    }


def _sample(graph_def: Any, tensor: str, rng: np.random.Generator) -> list[Any]:
    node = next(n for n in graph_def.node if n.name == tensor.split(":", maxsplit=1)[0])
    dims = [2 if d.size < 0 else d.size for d in node.attr["shape"].shape.dim]
    values: list[Any] = np.round(rng.uniform(-1.0, 1.0, dims), 2).tolist()
    return values


def change_one(frozen_dir: Path, index: int, salt: int) -> Path:
    """Model ``index`` again with other weights: the same interface, other bytes."""
    path = frozen_dir / f"{signature_of(index)}.pb"
    write_model(path, index, seed=10_000 + salt)
    return path


def generate(root: Path, count: int, seed: int, source: Path | None = None) -> None:
    """Write the set; models a larger set of the same seed has already are linked from it."""
    frozen = root / "frozen"
    frozen.mkdir(parents=True, exist_ok=True)
    known: dict[str, dict[str, Any]] = {}
    if source is not None and (source / "models.json").exists():
        listed = json.loads((source / "models.json").read_text())["models"]
        known = {m["signature"]: m for m in listed}
    models = []
    for index in range(count):
        signature = signature_of(index)
        path = frozen / f"{signature}.pb"
        if signature in known and source is not None:
            os.link(source / "frozen" / path.name, path)
            models.append(known[signature])
        else:
            models.append(write_model(path, index, seed))
    manifest = {"set": f"N{count}", "seed": seed, "models": models}
    (root / "models.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    source_dir = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    generate(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), source_dir)
