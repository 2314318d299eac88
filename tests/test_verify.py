"""Verification runs every signature of the merged model in as few session calls as are safe.

A fed tensor is fed for the whole call: two signatures of one graph that feed it different
values must not share a call, or one of them computes on the other's input. Signatures of
different graphs, and a signature and its serving_default copy, share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfmerge import exitcodes
from tfmerge.build import verify

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry
from servinglib import assert_outputs_match, highest, manifest, run_signatures

pytestmark = pytest.mark.timeout(600)

_OTHER_SAMPLE = [[0.5] * 8, [-1.0] * 8]
_HIDDEN = [[0.25] * 16, [1.5] * 16]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One version: three signatures on one graph (different probes on the same input, and
    an intermediate tensor as input), one on another graph, and serving_default."""
    root = tmp_path_factory.mktemp("verify")
    models = {
        "dense": graphgen.write_dense(root / "models" / "dense.pb", seed=0),
        "other": graphgen.write_dense(root / "models" / "other.pb", seed=1),
    }
    project = Project(root / "project")
    project.add(models["dense"], "dense.pb")
    project.add(models["other"], "other.pb")
    dense = models["dense"]
    entries = [
        model_entry("a", "dense.pb", dense, sample=dense.sample),
        model_entry("a_again", "dense.pb", dense, sample={"x": _OTHER_SAMPLE}),
        {
            "signature": "a_hidden",
            "frozen": "dense.pb",
            "inputs": {"hidden": "dense/Relu:0"},
            "outputs": {"probs": "probs:0"},
            "sample": {"hidden": _HIDDEN},
        },
        model_entry("b", "other.pb", models["other"], sample=models["other"].sample),
    ]
    project.configure(entries, default_signature="a")
    code = _build(project)
    assert code == exitcodes.OK
    return highest(project.serving), {"project": project, "models": models}


def _build(project: Project) -> int:
    from tfmerge import cli

    return cli.main(["build", "-c", str(project.config)])


def _source(model: FrozenModel, feeds: dict[str, Any], outputs: dict[str, str]) -> Any:
    return graphgen.run_frozen(model.path, feeds, outputs)


def test_signatures_sharing_a_graph_with_other_inputs_are_each_their_source(
    published: tuple[Path, dict[str, Any]],
) -> None:
    version, context = published
    dense: FrozenModel = context["models"]["dense"]
    x, other_x = np.asarray(dense.sample["x"], np.float32), np.asarray(_OTHER_SAMPLE, np.float32)
    hidden = np.asarray(_HIDDEN, np.float32)
    outputs = run_signatures(
        version,
        {
            "a": {"x": x},
            "a_again": {"x": other_x},
            "a_hidden": {"hidden": hidden},
            "serving_default": {"x": x},
        },
    )
    assert_outputs_match(outputs["a"], _source(dense, {"x:0": x}, dense.outputs))
    assert_outputs_match(outputs["a_again"], _source(dense, {"x:0": other_x}, dense.outputs))
    hidden_source = _source(dense, {"dense/Relu:0": hidden}, {"probs": "probs:0"})
    assert_outputs_match(outputs["a_hidden"], hidden_source)
    assert_outputs_match(outputs["serving_default"], outputs["a"])
    assert manifest(version)["stats"]["aliases"] == {"serving_default": "a"}


def test_the_plan_shares_calls_only_where_no_feed_reaches_another_signature(
    published: tuple[Path, dict[str, Any]],
) -> None:
    _, context = published
    dense: FrozenModel = context["models"]["dense"]
    x = np.asarray(dense.sample["x"], np.float32)
    calls = [
        verify._Call("a", {"probs": "a/probs:0"}, {"a/x:0": x}),
        verify._Call("serving_default", {"probs": "a/probs:0"}, {"a/x:0": x.copy()}),
        verify._Call("a_again", {"probs": "a/probs:0"}, {"a/x:0": x + 1}),
        verify._Call("a_hidden", {"probs": "a/probs:0"}, {"a/dense/Relu:0": x}),
        verify._Call("b", {"probs": "b/probs:0"}, {"b/x:0": x + 1}),
    ]

    groups = [[call.signature for call in group] for group in verify.plan_calls(calls)]

    assert groups == [["a", "serving_default", "b"], ["a_again"], ["a_hidden"]]


def test_the_graphs_of_one_call_add_up_to_a_bounded_size() -> None:
    big = verify.CALL_BYTES // 2 + 1
    calls = [
        verify._Call(name, {"y": f"{name}/y:0"}, {f"{name}/x:0": np.zeros(1)}, size)
        for name, size in (("a", big), ("b", big), ("c", 10), ("d", 3 * verify.CALL_BYTES))
    ]

    groups = [[call.signature for call in group] for group in verify.plan_calls(calls)]

    assert groups == [["a"], ["b", "c"], ["d"]]


def test_a_signature_failing_in_a_shared_call_is_named_alone(
    published: tuple[Path, dict[str, Any]],
) -> None:
    version, context = published
    dense: FrozenModel = context["models"]["dense"]
    x = np.asarray(dense.sample["x"], np.float32)
    feeds = {
        "a": {"x": x},
        "b": {"x": np.zeros((2, 3), np.float32)},  # 3 columns where the graph takes 8
        "a_hidden": {"hidden": np.asarray(_HIDDEN, np.float32)},
    }

    results, failures = verify.load_and_run(version, feeds)

    assert sorted(failures) == ["b"]
    assert "InvalidArgumentError" in failures["b"]
    assert sorted(results) == ["a", "a_hidden"]
    assert_outputs_match(results["a"], _source(dense, {"x:0": x}, dense.outputs))
