"""Load a merged SavedModel the way TensorFlow Serving does and compare it with its sources.

Worker side. The loader is the SavedModel loader in a session with tag ``serve`` (it runs the
init op, as the server does), and every signature is looked up by name and run on the probe
input its source graph already answered. Outputs must be identical: same dtype, same shape,
same bytes (NaN equal to NaN). Identical kernels on identical inputs give identical results,
so no tolerance is applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge.build import tfcore
from tfmerge.build.probe import check_session_config


@dataclass(frozen=True)
class Mismatch:
    signature: str
    reason: str


def outputs_equal(expected: np.ndarray, actual: np.ndarray) -> str | None:
    """None when equal; otherwise why not, in a few words."""
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype} != source {expected.dtype}"
    if expected.shape != actual.shape:
        return f"shape {actual.shape} != source {expected.shape}"
    if expected.dtype.kind in "fc":
        equal = np.array_equal(expected, actual, equal_nan=True)
    else:
        equal = np.array_equal(expected, actual)
    if not equal:
        if expected.dtype.kind in "fc":
            diff: float = np.nanmax(np.abs(expected.astype(np.float64) - actual.astype(np.float64)))
            return f"values differ from the source (max abs difference {diff:.3g})"
        return "values differ from the source"
    return None


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
