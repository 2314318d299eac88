"""Writes the demo model shipped in frozen/: demo.pb and its sidecar demo.toml.

    python scripts/make_demo_model.py [OUT.pb]    (default: frozen/demo.pb)

The model is a tiny classifier (`x` float32 [-1, 4] -> `probs` float32 [-1, 3],
`classes` int64 [-1]) with fixed weights, so every run writes the same bytes.
The sidecar is named after the graph (OUT.toml) and declares its signature.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "frozen" / "demo.pb"
SAMPLE = [[0.1, 0.2, 0.3, 0.4]]
_SEED = 20240601
_IN_DIM, _HIDDEN, _CLASSES = 4, 8, 3

SIDECAR = """\
# Declares frozen/{frozen} (a sidecar: NAME.toml next to NAME.pb travels with the model in one scp).
[[models]]
signature = "{signature}"
frozen = "{frozen}"
inputs = {{ x = "x:0" }}
outputs = {{ probs = "probs:0", classes = "classes:0" }}
sample = {{ x = [[0.1, 0.2, 0.3, 0.4]] }}
"""


def build_graph_def() -> Any:
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(_SEED)
    # Two decimals keep the weights legible in a dump of the graph.
    w1 = np.round(rng.uniform(-1.0, 1.0, (_IN_DIM, _HIDDEN)), 2).astype(np.float32)
    b1 = np.round(rng.uniform(-0.1, 0.1, _HIDDEN), 2).astype(np.float32)
    w2 = np.round(rng.uniform(-1.0, 1.0, (_HIDDEN, _CLASSES)), 2).astype(np.float32)
    b2 = np.round(rng.uniform(-0.1, 0.1, _CLASSES), 2).astype(np.float32)
    with tf.Graph().as_default() as graph:
        x = v1.placeholder(tf.float32, [None, _IN_DIM], name="x")
        with v1.variable_scope("demo"):
            hidden = tf.nn.relu(
                tf.matmul(x, v1.get_variable("w1", initializer=w1))
                + v1.get_variable("b1", initializer=b1)
            )
            logits = tf.matmul(hidden, v1.get_variable("w2", initializer=w2)) + (
                v1.get_variable("b2", initializer=b2)
            )
        probs = tf.nn.softmax(logits, name="probs")
        tf.argmax(probs, axis=1, output_type=tf.int64, name="classes")
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            return v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), ["probs", "classes"]
            )


def run_sample(graph_def: Any) -> tuple[Any, Any]:
    import tensorflow as tf

    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            probs, classes = session.run(["probs:0", "classes:0"], {"x:0": SAMPLE})
    return probs, classes


def write_atomically(path: Path, data: bytes) -> None:
    # frozen/ may be watched by a running daemon: it must never see a half-written file.
    # Dotfiles are never taken as inputs.
    staging = path.with_name(f".{path.name}.writing")
    staging.write_bytes(data)
    os.replace(staging, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help="the .pb to write")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.suffix != ".pb":
        parser.error(f"{out} must end in .pb")
    out.parent.mkdir(parents=True, exist_ok=True)
    graph_def = build_graph_def()
    sidecar = SIDECAR.format(signature=out.stem, frozen=out.name)
    write_atomically(out, graph_def.SerializeToString(deterministic=True))
    write_atomically(out.with_suffix(".toml"), sidecar.encode())
    probs, classes = run_sample(graph_def)
    print(f"wrote {out} ({out.stat().st_size} bytes) and {out.with_suffix('.toml')}")
    print(f"sample {SAMPLE} -> probs {probs.round(4).tolist()} classes {classes.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
