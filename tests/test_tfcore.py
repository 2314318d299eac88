"""The worker's TensorFlow: its C++ runtime and protobufs alone, the Python API on first use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from daemonlib import PATIENCE

_PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from tfmerge.build import capi, run, tfcore

    # A graph built as protobuf and run through the C API: no Python runtime involved.
    graph_def = tfcore.graph_pb2.GraphDef()
    x = graph_def.node.add(name="x", op="Placeholder")
    x.attr["dtype"].type = tfcore.dtypes.float32.as_datatype_enum
    y = graph_def.node.add(name="y", op="AddV2", input=["x", "x"])
    y.attr["T"].type = tfcore.dtypes.float32.as_datatype_enum
    graph = capi.Graph()
    graph.import_graph_def(graph_def.SerializeToString())
    with capi.Session(graph, b"") as session:
        (doubled,) = session.run({"x:0": np.array([20.5], np.float32)}, ["y:0"])
    before = {
        "python_runtime": any(name.startswith("tensorflow.python") for name in sys.modules),
        "full": tfcore.is_full_tensorflow_loaded(),
        "keras": any(name.split(".")[0] == "keras" for name in sys.modules),
        "value": doubled.tolist(),
    }
    import tensorflow as tf
    still_lazy = not tfcore.is_full_tensorflow_loaded()
    value = int(tf.constant(41) + 1)
    after = {
        "full": tfcore.is_full_tensorflow_loaded(),
        "version": tf.__version__ == tfcore.VERSION,
        "float32": tf.float32.as_datatype_enum == tfcore.dtypes.float32.as_datatype_enum,
    }
    print(json.dumps({"before": before, "still_lazy": still_lazy, "value": value, "after": after}))
    """
)


def test_a_build_process_runs_graphs_without_tensorflows_python_runtime() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["before"] == {
        "python_runtime": False,
        "full": False,
        "keras": False,
        "value": [41.0],
    }
    # `import tensorflow` alone returns the registered package; the first attribute completes it.
    assert report["still_lazy"] is True
    assert report["value"] == 42
    assert report["after"] == {"full": True, "version": True, "float32": True}
