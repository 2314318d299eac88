"""Test helpers that look at a serving folder the way TensorFlow Serving does.

TensorFlow Serving counts a child as a version only if its whole name parses as an integer,
serves the highest, and loads it with the SavedModel loader (tag ``serve``), looking
signatures up by name. These helpers do exactly that, independently of tfmerge's code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge.build.compare import outputs_close

_INTEGER = re.compile(r"^[0-9]+$")


def versions(base: Path) -> dict[int, Path]:
    return dict(
        sorted((int(p.name), p) for p in base.iterdir() if _INTEGER.match(p.name) and p.is_dir())
    )


def highest(base: Path) -> Path:
    found = versions(base)
    assert found, f"no version in {base}"
    return found[max(found)]


def manifest(version_dir: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((version_dir / "assets.extra" / "tfmerge.json").read_text())
    return value


def run_signatures(
    version_dir: Path, feeds: Mapping[str, Mapping[str, Any]], config: Any = None
) -> dict[str, dict[str, np.ndarray]]:
    """Load version_dir with the SavedModel loader and run each named signature once.

    ``config``: the session's ConfigProto; None for TensorFlow's defaults, the server's.
    """
    import tensorflow as tf

    results = {}
    with (
        tf.Graph().as_default() as graph,
        tf.compat.v1.Session(graph=graph, config=config) as session,
    ):
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(version_dir))
        for name, values in feeds.items():
            signature = meta.signature_def[name]
            fetches = {key: info.name for key, info in signature.outputs.items()}
            feed_dict = {signature.inputs[key].name: value for key, value in values.items()}
            results[name] = {
                k: np.asarray(v) for k, v in session.run(fetches, feed_dict=feed_dict).items()
            }
    return results


def run_signatures_together(
    version_dir: Path, feeds: Mapping[str, Mapping[str, Any]], config: Any = None
) -> dict[str, dict[str, np.ndarray]]:
    """Every named signature in ONE Session.run, as a MultiInference request runs them."""
    import tensorflow as tf

    with (
        tf.Graph().as_default() as graph,
        tf.compat.v1.Session(graph=graph, config=config) as session,
    ):
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(version_dir))
        fetches = {
            (name, key): info.name
            for name in feeds
            for key, info in meta.signature_def[name].outputs.items()
        }
        feed_dict = {
            meta.signature_def[name].inputs[key].name: value
            for name, values in feeds.items()
            for key, value in values.items()
        }
        outputs = session.run(fetches, feed_dict=feed_dict)
    results: dict[str, dict[str, np.ndarray]] = {name: {} for name in feeds}
    for (name, key), value in outputs.items():
        results[name][key] = np.asarray(value)
    return results


def signature_names(version_dir: Path) -> set[str]:
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return set(saved.meta_graphs[0].signature_def)


def assert_close(actual: Any, expected: Any, what: str = "output") -> None:
    """actual is within the numeric contract of expected (docs/serving.md): same dtype and shape,
    integers, booleans and strings equal, floats within their dtype's tolerance.

    For every comparison of runs under different settings: a published SavedModel and its
    source graph each run with TensorFlow's defaults, so Grappler rewrites the two graphs
    differently, and oneDNN or the CPU's instruction set can change the last bits.
    """
    problem = outputs_close(np.asarray(expected), np.asarray(actual))
    assert problem is None, f"{what}: {problem}"


def assert_outputs_match(actual: Mapping[str, np.ndarray], expected: Mapping[str, Any]) -> None:
    """Every output of a signature is within the numeric contract of its source's."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert_close(actual[key], value, key)


def assert_close_across_settings(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, Any]
) -> None:
    """Outputs computed under other session settings than expected's, within the contract."""
    assert_outputs_match(actual, expected)
