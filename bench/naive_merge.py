"""The naive merge, as the hand-run script did it: every frozen graph imported with
``import_graph_def(name=signature)`` into ONE tf.Graph, then ``SavedModelBuilder`` with one
predict signature per model.

Usage: ``python -m bench.naive_merge MODELS_JSON FROZEN_DIR EXPORT_DIR``. The last line on
stdout is JSON: ``import_seconds`` (``import tensorflow``), ``build_seconds`` (from after the
import to after ``save()``), or ``error`` when the merge could not be written.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def naive_merge(
    models: list[dict[str, Any]], frozen_dir: Path, export_dir: Path, stage: list[str]
) -> None:
    """The merge; ``stage`` names the step under way, so that a failure says where it was."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    signatures = {}
    with graph.as_default():
        for model in models:
            name = model["signature"]
            stage[0] = f"import_graph_def of {name}"
            graph_def = v1.GraphDef()
            graph_def.ParseFromString((frozen_dir / model["frozen"]).read_bytes())
            tf.graph_util.import_graph_def(graph_def, name=name)
            inputs = {
                k: graph.get_tensor_by_name(f"{name}/{t}") for k, t in model["inputs"].items()
            }
            outputs = {
                k: graph.get_tensor_by_name(f"{name}/{t}") for k, t in model["outputs"].items()
            }
            signatures[name] = v1.saved_model.signature_def_utils.predict_signature_def(
                inputs, outputs
            )
        stage[0] = "SavedModelBuilder"
        with v1.Session(graph=graph) as session:
            builder = v1.saved_model.builder.SavedModelBuilder(str(export_dir))
            builder.add_meta_graph_and_variables(
                session, [v1.saved_model.tag_constants.SERVING], signature_def_map=signatures
            )
            stage[0] = "SavedModelBuilder.save"
            builder.save()


def main(argv: list[str]) -> int:
    models_json, frozen_dir, export_dir = (Path(a) for a in argv)
    models = json.loads(models_json.read_text())["models"]
    started = time.monotonic()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    imported = time.monotonic()
    report: dict[str, Any] = {"import_seconds": round(imported - started, 4)}
    stage = ["start"]
    try:
        naive_merge(models, frozen_dir, export_dir, stage)
    except Exception as exc:  # noqa: BLE001 - any failure to publish is the result to record
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        report["error"] = f"{type(exc).__name__}: {str(exc)[:400]} (during {stage[0]}, at {where})"
        report["failed_after_seconds"] = round(time.monotonic() - imported, 4)
        print(json.dumps(report))
        return 1
    report["build_seconds"] = round(time.monotonic() - imported, 4)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
