"""Load a merged SavedModel the way TensorFlow Serving does and compare it with its sources.

Worker side. The loader is the SavedModel loader in a session with tag ``serve`` (it runs the
init op, as the server does), and every signature is looked up by name and run on the probe
input its source graph already answered. Outputs must be identical: same dtype, same shape,
same bytes (NaN equal to NaN). Both sides run under the same session settings
(``check_session_config``), and identical kernels on identical inputs give identical results,
so no tolerance is applied (see tfmerge.tolerance for comparisons across settings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge.build import tfcore
from tfmerge.build.compare import outputs_equal
from tfmerge.build.probe import check_session_config


@dataclass(frozen=True)
class Mismatch:
    signature: str
    reason: str


def load_and_run(
    export_dir: Path, feeds: Mapping[str, Mapping[str, np.ndarray]]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Load export_dir and run each named signature on its feeds (keyed by input key).

    Returns the outputs of the signatures that ran and, for the others, why they failed.
    """

    results: dict[str, dict[str, np.ndarray]] = {}
    failures: dict[str, str] = {}

    graph = tfcore.Graph()
    with tfcore.Session(graph=graph, config=check_session_config()) as session:
        meta = tfcore.load_saved_model(session, ["serve"], str(export_dir))
        for name, values in sorted(feeds.items()):
            signature = meta.signature_def.get(name)
            if signature is None:
                failures[name] = "signature missing from the SavedModel"
                continue
            fetches = {key: info.name for key, info in signature.outputs.items()}
            feed_dict: dict[Any, np.ndarray] = {
                signature.inputs[key].name: value for key, value in values.items()
            }
            try:
                results[name] = session.run(fetches, feed_dict=feed_dict)
            except tfcore.OpError as exc:
                failures[name] = f"{type(exc).__name__}: {exc.message}"
    return results, failures


def verify(
    export_dir: Path,
    feeds: Mapping[str, Mapping[str, np.ndarray]],
    expected: Mapping[str, Mapping[str, np.ndarray]],
) -> list[Mismatch]:
    """Every way the SavedModel in export_dir differs from what its sources computed."""

    try:
        actual, failures = load_and_run(export_dir, feeds)
    except (tfcore.OpError, ValueError, RuntimeError, OSError) as exc:
        return [Mismatch("*", f"the SavedModel does not load: {exc}")]
    mismatches = [Mismatch(name, f"fails to run: {why}") for name, why in failures.items()]
    for name, outputs in sorted(actual.items()):
        wanted = expected[name]
        if set(outputs) != set(wanted):
            mismatches.append(Mismatch(name, f"outputs {sorted(outputs)} != {sorted(wanted)}"))
            continue
        for key in sorted(wanted):
            problem = outputs_equal(wanted[key], outputs[key])
            if problem:
                mismatches.append(Mismatch(name, f"output {key!r}: {problem}"))
    return mismatches
