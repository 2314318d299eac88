"""Check a merged SavedModel against its sources: every signature, on its probe input, must
give what the source frozen graph gives, within the numeric contract (docs/serving.md): the
same dtype and shape, integers and strings equal, floats within their dtype's tolerance. Both
run with TensorFlow's defaults, as TensorFlow Serving runs, but as two different graphs, which
Grappler and oneDNN may compute in another order.

Usage: ``python -m bench.check_published SET_DIR EXPORT_DIR [--discovered]``. With
``--discovered`` the signatures were inferred by tfmerge (``discover = true``), which offers
only the tensors nothing consumes (``classes``, not ``probs``): the outputs a signature has
are compared, and it must have at least one. The sources' outputs are
computed with tests/graphgen.py's ``run_frozen`` once per set and kept in SET_DIR/expected.npz.
The last line on stdout is JSON: ``signatures``, ``equal`` and the ``mismatches``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge.build.compare import outputs_close

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = "expected.npz"


def _feeds(model: dict[str, Any], names: dict[str, str]) -> dict[str, np.ndarray]:
    return {names[k]: np.asarray(v, dtype=np.float32) for k, v in model["sample"].items()}


def expected_outputs(set_dir: Path, models: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    cache = set_dir / EXPECTED
    if cache.exists():
        with np.load(cache) as stored:
            return {key: stored[key] for key in stored.files}
    sys.path.insert(0, str(ROOT / "tests"))
    import graphgen

    expected: dict[str, np.ndarray] = {}
    for model in models:
        outputs = graphgen.run_frozen(
            set_dir / "frozen" / model["frozen"], _feeds(model, model["inputs"]), model["outputs"]
        )
        expected.update({f"{model['signature']}/{k}": v for k, v in outputs.items()})
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, **expected)  # type: ignore[arg-type]  # numpy types its keywords as allow_pickle
    os.replace(partial, cache)
    return expected


def check(set_dir: Path, export_dir: Path, *, discovered: bool = False) -> dict[str, Any]:
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    models = json.loads((set_dir / "models.json").read_text())["models"]
    expected = expected_outputs(set_dir, models)
    mismatches: list[str] = []
    equal = 0
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(export_dir))
        for model in models:
            name = model["signature"]
            signature = meta.signature_def.get(name)
            if signature is None:
                mismatches.append(f"{name}: no such signature")
                continue
            feeds = _feeds(model, {k: info.name for k, info in signature.inputs.items()})
            fetches = {k: info.name for k, info in signature.outputs.items()}
            keys = [k for k in model["outputs"] if k in fetches or not discovered]
            missing = [k for k in keys if k not in fetches]
            if missing or not keys:
                mismatches.append(f"{name}: outputs {sorted(fetches)}, expected {keys}")
                continue
            got = session.run(fetches, feed_dict=feeds)
            problems = [
                f"{name}/{key}: {why}"
                for key in keys
                if (why := outputs_close(expected[f"{name}/{key}"], np.asarray(got[key])))
            ]
            mismatches.extend(problems)
            equal += not problems
    return {"signatures": len(models), "equal": equal, "mismatches": mismatches}


if __name__ == "__main__":
    discovered = "--discovered" in sys.argv[3:]
    print(json.dumps(check(Path(sys.argv[1]), Path(sys.argv[2]), discovered=discovered)))
