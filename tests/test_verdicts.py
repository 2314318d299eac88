"""Reused checks: a verdict serves only the very bytes, declaration, limits, settings and
TensorFlow it was found for.

Each test builds two models, then replaces the stored verdict of model ``a`` with model
``b``'s (same interface, other weights: other outputs) and builds again. A verdict reused
where it must not be makes the merged model differ from what the verdict says its source
computes, and the build fails its verification; where nothing changed, that is the proof
that the verdict is read at all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfmerge import exitcodes
from tfmerge.build import verdicts
from tfmerge.folders.packs import Packs, Record

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import assert_outputs_match, highest, manifest, run_signatures

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("verdict-models")
    return {
        name: graphgen.write_dense(root / f"{name}.pb", seed=seed)
        for name, seed in (("a", 0), ("b", 1), ("c", 2), ("a2", 3))
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entries(models: dict[str, FrozenModel], **a_changes: Any) -> list[dict[str, Any]]:
    return [
        {**model_entry("a", "a.pb", models["a"]), **a_changes},
        model_entry("b", "b.pb", models["b"]),
    ]


def _swap_in_b_for_a(project: Project) -> None:
    """Model a's verdict now holds model b's findings, under a's key."""
    packs = Packs(project.state / "checks")
    records = packs.records()
    by_input = {r.input_sha256: r for r in records.values()}
    a = by_input[_sha256(project.frozen / "a.pb")]
    b = by_input[_sha256(project.frozen / "b.pb")]
    for pack in packs.folder.glob("*.pack"):
        pack.unlink()
    forged = Record(a.key, a.input_sha256, b.body)
    packs.write([*(r for r in records.values() if r.key != a.key), forged])


def _first_build(project: Project, models: dict[str, FrozenModel], capsys: Any) -> None:
    project.add(models["a"], "a.pb")
    project.add(models["b"], "b.pb")
    project.configure(_entries(models))
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK, events
    assert manifest(highest(project.serving))["stats"]["checks_reused"] == 0
    _swap_in_b_for_a(project)
    # A new model makes the next build publish, and so verify, whatever else it reuses.
    project.add(models["c"], "c.pb")


def _second_build(
    project: Project, models: dict[str, FrozenModel], capsys: Any, **top: Any
) -> tuple[int, list[dict[str, Any]]]:
    entries = top.pop("entries", None) or _entries(models)
    project.configure([*entries, model_entry("c", "c.pb", models["c"])], **top)
    return project.cli(capsys, "build")


def test_an_unchanged_input_reuses_its_verdict(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    _first_build(project, models, capsys)

    code, events = _second_build(project, models, capsys)

    # The forged verdict was used: its outputs are b's, the merged a computes a's.
    assert code == exitcodes.FAILED
    assert one(events, "build_finished")["outcome"] == "failed"
    failed = named(events, "verify_failed")
    assert {(e["signature"], e["reused_check"]) for e in failed} == {("a", True)}

    # A verdict the merged model did not reproduce is dropped: the next build checks a in
    # full, and publishes.
    code, events = _second_build(project, models, capsys)
    assert code == exitcodes.OK, named(events, "verify_failed")
    version = highest(project.serving)
    assert manifest(version)["stats"]["checks_reused"] == 2  # b's and c's
    _assert_a_is_its_source(project, version, models["a"].sample["x"])


def _replace_bytes(project: Project, models: dict[str, FrozenModel]) -> dict[str, Any]:
    project.add(models["a2"], "a.pb")
    return {}


def _drop_an_output(project: Project, models: dict[str, FrozenModel]) -> dict[str, Any]:
    return {"entries": _entries(models, outputs={"probs": "probs:0"})}


def _rename_an_input(project: Project, models: dict[str, FrozenModel]) -> dict[str, Any]:
    return {"entries": _entries(models, inputs={"features": "x:0"})}


def _another_sample(project: Project, models: dict[str, FrozenModel]) -> dict[str, Any]:
    sample = {"x": [[0.5] * 8, [-0.25] * 8]}
    return {"entries": _entries(models, sample=sample)}


_CHANGES: dict[str, tuple[Callable[[Project, dict[str, FrozenModel]], dict[str, Any]], int]] = {
    # name: (the change, how many verdicts the second build may reuse: b's, or none)
    "bytes": (_replace_bytes, 1),
    "outputs": (_drop_an_output, 1),
    "inputs": (_rename_an_input, 1),
    "sample": (_another_sample, 1),
    "allow_ops": (lambda project, models: {"allow_ops": ["ReadFile"]}, 0),
    # A pass under larger limits says nothing about smaller ones.
    "limits": (lambda p, m: {"entries": _entries(m, limits={"memory_bytes": 2**30})}, 1),
    "check": (lambda project, models: {"check": {"seconds": 100.0}}, 0),
    "max_model_bytes": (lambda project, models: {"max_model_bytes": 10 * 2**20}, 0),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_a_verdict_is_never_reused_for_another_input_declaration_or_setting(
    change: str,
    tmp_path: Path,
    models: dict[str, FrozenModel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = Project(tmp_path)
    _first_build(project, models, capsys)
    make_change, reusable = _CHANGES[change]

    code, events = _second_build(project, models, capsys, **make_change(project, models))

    assert code == exitcodes.OK, named(events, "verify_failed")
    version = highest(project.serving)
    assert manifest(version)["stats"]["checks_reused"] == reusable
    _assert_a_is_its_source(project, version, models["a"].sample["x"])


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("tensorflow", "2.99.0"),
        ("cpu", "64 cpus, flags 0123456789abcdef"),  # a resized or migrated host
        # A build from a shell, then the unit's (whichever of the two this run has).
        (
            "env.TF_ENABLE_ONEDNN_OPTS",
            "0" if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1" else "1",
        ),
    ],
)
def test_a_verdict_of_another_tensorflow_or_cpu_is_never_reused(
    setting: str,
    value: str,
    tmp_path: Path,
    models: dict[str, FrozenModel],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = Project(tmp_path)
    _first_build(project, models, capsys)
    assert verdicts.ENVIRONMENT[setting] != value
    monkeypatch.setitem(verdicts.ENVIRONMENT, setting, value)

    code, events = _second_build(project, models, capsys)

    assert code == exitcodes.OK, named(events, "verify_failed")
    assert manifest(highest(project.serving))["stats"]["checks_reused"] == 0


def test_a_damaged_verdict_is_a_full_check(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    _first_build(project, models, capsys)
    (pack,) = (project.state / "checks").glob("*.pack")
    data = bytearray(pack.read_bytes())
    # One byte of the first record's body, whichever model it is.
    data[data.index(b"\t") + 10] ^= 0x01
    pack.write_bytes(bytes(data))

    code, events = _second_build(project, models, capsys)

    # The damaged record is a miss; the other one is still reused (or is the forged a, caught).
    first_line = bytes(data).split(b"\n", 1)[0]
    damaged_a = _sha256(project.frozen / "a.pb").encode() in first_line
    if damaged_a:
        assert code == exitcodes.OK, named(events, "verify_failed")
        assert manifest(highest(project.serving))["stats"]["checks_reused"] == 1
    else:
        assert {e["signature"] for e in named(events, "verify_failed")} == {"a"}


def test_the_verdicts_of_inputs_no_version_uses_are_removed_with_their_blobs(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["a"], "a.pb")
    project.add(models["b"], "b.pb")
    entries = _entries(models)
    project.configure(entries, keep_versions=2)
    assert project.cli(capsys, "build")[0] == exitcodes.OK
    a_sha = _sha256(project.frozen / "a.pb")
    inputs = {r.input_sha256 for r in Packs(project.state / "checks").records().values()}
    assert a_sha in inputs

    # Two more versions without a: version 1, the last to use its input, is pruned.
    (project.frozen / "a.pb").unlink()
    project.configure(entries[1:], keep_versions=2)
    assert project.cli(capsys, "build")[0] == exitcodes.OK
    project.add(models["c"], "c.pb")
    project.configure([*entries[1:], model_entry("c", "c.pb", models["c"])], keep_versions=2)
    assert project.cli(capsys, "build")[0] == exitcodes.OK

    assert not list((project.state / "blobs").glob(f"{a_sha}*"))
    inputs = {r.input_sha256 for r in Packs(project.state / "checks").records().values()}
    assert a_sha not in inputs
    assert _sha256(project.frozen / "b.pb") in inputs
    assert len(list((project.state / "checks").glob("*.pack"))) == 1


def _assert_a_is_its_source(project: Project, version: Path, sample: Any) -> None:
    """Signature a of the version computes what the graph now in a.pb computes."""
    signature = manifest(version)["signatures"]["a"]
    x = np.asarray(sample, np.float32)
    published = run_signatures(version, {"a": {next(iter(signature["inputs"])): x}})["a"]
    source = graphgen.run_frozen(project.frozen / "a.pb", {"x:0": x}, dict(signature["outputs"]))
    assert_outputs_match(published, source)
