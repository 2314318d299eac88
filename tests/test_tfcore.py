"""The worker's TensorFlow: its graph-mode core alone, the public API only on first use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from daemonlib import PATIENCE

_PROBE = textwrap.dedent(
    """
    import json, sys
    from tfmerge.build import run, tfcore
    before = {
        "full": tfcore.is_full_tensorflow_loaded(),
        "api": "tensorflow._api.v2" in sys.modules,
        "keras": any(name.split(".")[0] == "keras" for name in sys.modules),
    }
    import tensorflow as tf
    still_lazy = not tfcore.is_full_tensorflow_loaded()
    value = int(tf.constant(41) + 1)
    after = {
        "full": tfcore.is_full_tensorflow_loaded(),
        "same_session": tf.compat.v1.Session is tfcore.Session,
        "same_graph": tf.Graph is tfcore.Graph,
        "version": tf.__version__ == tfcore.VERSION,
    }
    print(json.dumps({"before": before, "still_lazy": still_lazy, "value": value, "after": after}))
    """
)


def test_a_build_process_loads_no_public_api_until_something_asks_for_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["before"] == {"full": False, "api": False, "keras": False}
    # `import tensorflow` alone returns the registered package; the first attribute completes it.
    assert report["still_lazy"] is True
    assert report["value"] == 42
    assert report["after"] == {
        "full": True,
        "same_session": True,
        "same_graph": True,
        "version": True,
    }
