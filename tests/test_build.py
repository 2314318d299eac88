"""`tfmerge build`: every published signature computes what its source graph computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfmerge import exitcodes

import graphgen
from conftest import HYAUDIO
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import assert_same_outputs, highest, manifest, run_signatures, versions

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("models")
    first, second = graphgen.tf2_pair(root)
    return {
        "dense": graphgen.write_dense(root / "dense.pb", seed=0),
        "dense_b": graphgen.write_dense(root / "dense_b.pb", seed=1),
        "dense_text": graphgen.write_dense(root / "dense_text.pbtxt", seed=2, text=True),
        "table": graphgen.write_table_model(root / "table.pb"),
        "tf2_a": first,
        "tf2_b": second,
        "reader": graphgen.write_file_reader(root / "reader.pb"),
        "pyfunc": graphgen.write_py_func(root / "pyfunc.pb"),
    }


def source_outputs(model: FrozenModel, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    by_tensor = {model.inputs[k]: v for k, v in feeds.items()}
    return graphgen.run_frozen(model.path, by_tensor, model.outputs, model.init_ops)


def sample_feeds(model: FrozenModel) -> dict[str, np.ndarray]:
    feeds = {}
    for key, value in model.sample.items():
        array = np.asarray(value)
        feeds[key] = array.astype(object) if array.dtype.kind in "US" else array
    return feeds


def test_mixed_models_publish_one_version_equal_to_their_sources(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    declared = {
        "dense": ("dense.pb", models["dense"]),
        "text model": ("sub/dense_text.pbtxt", models["dense_text"]),
        "lookup (v2)": ("table.pb", models["table"]),
        "flow_a": ("tf2_a.pb", models["tf2_a"]),
        "flow_b": ("tf2_b.pb", models["tf2_b"]),
        "modèle": ("dense_b.pb", models["dense_b"]),
    }
    for frozen, model in declared.values():
        project.add(model, frozen)
    project.configure(
        [model_entry(sig, frozen, m, sample=m.sample) for sig, (frozen, m) in declared.items()]
    )

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.OK, events
    assert sorted(versions(project.serving)) == [1]
    finished = one(events, "build_finished")
    assert finished["outcome"] == "published"
    assert finished["version"] == 1
    assert finished["added"] == sorted(declared)
    assert finished["rejected"] == []
    version = highest(project.serving)
    feeds = {sig: sample_feeds(m) for sig, (_, m) in declared.items()}
    published = run_signatures(version, feeds)
    for sig, (_, model) in declared.items():
        assert_same_outputs(published[sig], source_outputs(model, feeds[sig]))

    history = (project.serving / "current_version").read_text().splitlines()
    number, new, message = history[0].split("\t")
    assert number == "1"
    assert new.split(",") == sorted(declared)
    assert message.startswith('"')
    assert message.endswith('"')
    assert (project.serving / "exported_models").read_text().split("\n")[:-1] == sorted(declared)
    recorded = manifest(version)
    assert set(recorded["signatures"]) == set(declared)
    assert {s["file"] for s in recorded["sources"]} == {f for f, _ in declared.values()}
    assert all(len(s["sha256"]) == 64 for s in recorded["sources"])
    assert recorded["tool"] == "tfmerge"


def test_colliding_tf2_functions_are_both_kept(models: dict[str, FrozenModel]) -> None:
    assert graphgen.function_conflicts(models["tf2_a"].path, models["tf2_b"].path)


def test_same_inputs_give_identical_bytes_and_a_second_build_publishes_nothing(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    built = []
    for name in ("one", "two"):
        project = Project(tmp_path / name)
        project.add(models["table"], "table.pb")
        project.add(models["tf2_a"], "a.pb")
        project.configure(
            [
                model_entry("table", "table.pb", models["table"]),
                model_entry("flow", "a.pb", models["tf2_a"]),
            ]
        )
        assert project.cli(capsys, "build")[0] == exitcodes.OK
        built.append((highest(project.serving) / "saved_model.pb").read_bytes())
    assert built[0] == built[1]

    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK
    assert one(events, "build_finished")["outcome"] == "unchanged"
    assert named(events, "build_unchanged")
    assert sorted(versions(project.serving)) == [1]


@pytest.mark.skipif(
    not HYAUDIO.exists(), reason=f"shared fixture {HYAUDIO} is not in this checkout"
)
def test_hyaudio_exported_twice_as_the_old_workflow_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    shutil.copyfile(HYAUDIO, project.frozen / "hyaudio.pb")
    spec = FrozenModel(
        HYAUDIO,
        {"inputs": "hyaudio/vggish_input:0"},
        {"classes": "hyaudio/predict_classes:0", "probs": "hyaudio/predict_probs:0"},
        {},
    )
    project.configure([model_entry(f"hyaudio_{i}", "hyaudio.pb", spec) for i in (1, 2)])
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK, events
    version = highest(project.serving)
    batch = np.random.default_rng(7).standard_normal((3, 640)).astype(np.float32)
    published = run_signatures(
        version, {"hyaudio_1": {"inputs": batch}, "hyaudio_2": {"inputs": batch}}
    )
    expected = source_outputs(spec, {"inputs": batch})
    for name in ("hyaudio_1", "hyaudio_2"):
        assert_same_outputs(published[name], expected)
        assert published[name]["classes"].shape == (3,)
    # One copy of the weights, not one per signature.
    assert (version / "saved_model.pb").stat().st_size < 1.2 * HYAUDIO.stat().st_size


def test_discovery_and_sidecar(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["dense"], "team/found.pb")
    project.add(models["dense_b"], "carried.pb")
    (project.frozen / "carried.toml").write_text(
        "[[models]]\n"
        'signature = "from_sidecar"\n'
        f"inputs = {{ x = {json.dumps(models['dense_b'].inputs['x'])} }}\n"
        f"outputs = {{ probs = {json.dumps(models['dense_b'].outputs['probs'])} }}\n"
    )
    project.configure(discover=True)

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.OK, events
    inferred = one(events, "model_inferred")
    assert inferred["signature"] == "team/found"
    assert inferred["file"] == "team/found.pb"
    assert set(inferred["inputs"].values()) == {models["dense"].inputs["x"]}
    # Sinks only: `probs` feeds the argmax, so `classes` is the one tensor nothing consumes.
    assert set(inferred["outputs"].values()) == {models["dense"].outputs["classes"]}
    version = highest(project.serving)
    x = np.asarray(models["dense"].sample["x"], dtype=np.float32)
    published = run_signatures(
        version,
        {
            "team/found": {inferred_key(inferred, "x"): x},
            "from_sidecar": {"x": x},
        },
    )
    expected = source_outputs(models["dense"], {"x": x})
    np.testing.assert_array_equal(published["team/found"]["classes"], expected["classes"])
    expected_b = source_outputs(models["dense_b"], {"x": x})
    np.testing.assert_array_equal(published["from_sidecar"]["probs"], expected_b["probs"])


def inferred_key(event: dict[str, Any] | Any, placeholder: str) -> str:
    return next(k for k, v in event["inputs"].items() if v.startswith(placeholder))


def test_discovery_off_publishes_only_declared_models(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["dense"], "declared.pb")
    project.add(models["dense_b"], "undeclared.pb")
    project.configure([model_entry("declared", "declared.pb", models["dense"])], discover=False)
    assert project.cli(capsys, "build")[0] == exitcodes.OK
    assert set(manifest(highest(project.serving))["signatures"]) == {"declared"}


def test_large_constants_move_into_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    # Five graphs of two large constants each: more variables than restore ops, so that some
    # restore op fills several.
    big = [
        graphgen.write_big_dense(tmp_path / f"big{i}.pb", target_bytes=6_000_000, seed=i)
        for i in range(5)
    ]
    entries = []
    for index, model in enumerate(big):
        project.add(model, f"big{index}.pb")
        entries.append(model_entry(f"big{index}", f"big{index}.pb", model, sample=model.sample))
    project.configure(entries)

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.OK, events
    version = highest(project.serving)
    stats = manifest(version)["stats"]
    assert stats["variables"] >= 10
    assert stats["variable_bytes"] > 0.9 * sum(m.path.stat().st_size for m in big)
    assert (version / "variables" / "variables.index").exists()
    assert (version / "saved_model.pb").stat().st_size < 100_000
    feeds = {f"big{i}": sample_feeds(m) for i, m in enumerate(big)}
    published = run_signatures(version, feeds)
    for index, model in enumerate(big):
        assert_same_outputs(published[f"big{index}"], source_outputs(model, feeds[f"big{index}"]))
