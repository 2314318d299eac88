"""`tfmerge build`: every published signature computes what its source graph computes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfmerge import exitcodes
from tfmerge.build.constants import LARGE_CONSTANT_BYTES

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import (
    assert_close,
    assert_outputs_match,
    highest,
    manifest,
    run_signatures,
    versions,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory, tf2_pair: tuple[FrozenModel, FrozenModel]
) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("models")
    first, second = tf2_pair
    return {
        "dense": graphgen.write_dense(root / "dense.pb", seed=0),
        "dense_b": graphgen.write_dense(root / "dense_b.pb", seed=1),
        "dense_text": graphgen.write_dense(root / "dense_text.pbtxt", seed=2, text=True),
        "table": graphgen.write_table_model(root / "table.pb"),
        "tf2_a": first,
        "tf2_b": second,
        "reader": graphgen.write_file_reader(root / "reader.pb"),
        "pyfunc": graphgen.write_py_func(root / "pyfunc.pb"),
        "classifier": graphgen.write_tf1_classifier(root / "classifier.pb"),
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
        assert_outputs_match(published[sig], source_outputs(model, feeds[sig]))

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


def test_a_tf1_classifier_exported_twice_as_the_old_workflow_did(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    """The hand-run export served one TF1 graph (an empty `versions` field, functions nothing
    calls) under two signatures; tfmerge does the same, with its weights stored once."""
    classifier = models["classifier"]
    project = Project(tmp_path)
    project.add(classifier, "classifier.pb")
    project.configure([model_entry(f"classifier_{i}", "classifier.pb", classifier) for i in (1, 2)])
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK, events
    version = highest(project.serving)
    batch = np.random.default_rng(7).standard_normal((3, 640)).astype(np.float32)
    published = run_signatures(
        version, {"classifier_1": {"inputs": batch}, "classifier_2": {"inputs": batch}}
    )
    expected = source_outputs(classifier, {"inputs": batch})
    for name in ("classifier_1", "classifier_2"):
        assert_outputs_match(published[name], expected)
        assert published[name]["classes"].shape == (3,)
        assert published[name]["probs"].shape == (3,)
    # One copy of the weights, not one per signature.
    assert (version / "saved_model.pb").stat().st_size < 1.2 * classifier.path.stat().st_size


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
    assert_close(published["team/found"]["classes"], expected["classes"])
    expected_b = source_outputs(models["dense_b"], {"x": x})
    assert_close(published["from_sidecar"]["probs"], expected_b["probs"])


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
        assert_outputs_match(published[f"big{index}"], source_outputs(model, feeds[f"big{index}"]))


def _data_files(version: Path) -> list[Path]:
    return sorted((version / "variables").glob("variables.data-*"))


def _shard_of(version: Path, blob: Path) -> Path:
    """The data file of version that is the very file blob (a hard link to it)."""
    (shard,) = [f for f in _data_files(version) if f.samefile(blob)]
    return shard


def _blob(project: Project, path: Path) -> Path:
    return project.state / "blobs" / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.pb"


def _padded(model: FrozenModel, path: Path, padding: int) -> FrozenModel:
    """model with an unused string constant of padding bytes: its large constants are a
    minority of the file's bytes."""
    import tensorflow as tf

    graph_def = graphgen.load_graph_def(model.path)
    node = graph_def.node.add(name="padding", op="Const")
    node.attr["dtype"].type = tf.string.as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(b"p" * padding))
    path.write_bytes(graph_def.SerializeToString(deterministic=True))
    return dataclasses.replace(model, path=path)


def _as_text(model: FrozenModel, path: Path) -> FrozenModel:
    from google.protobuf import text_format

    path.write_text(text_format.MessageToString(graph_def := graphgen.load_graph_def(model.path)))
    assert graph_def.node
    return dataclasses.replace(model, path=path)


def _build_big(
    project: Project,
    capsys: pytest.CaptureFixture[str],
    big: Mapping[str, FrozenModel],
    refused: Mapping[str, FrozenModel] | None = None,
) -> Path:
    """Build big (and refused, declared with an output their graphs lack); check the outputs."""
    entries = []
    for name, model in {**big, **(refused or {})}.items():
        project.add(model, f"{name}{model.path.suffix}")
        entry = model_entry(name, f"{name}{model.path.suffix}", model, sample=model.sample)
        if name in (refused or {}):
            entry["outputs"] = {"probs": "no_such_node:0"}
        entries.append(entry)
    project.configure(entries)
    code, events = project.cli(capsys, "build")
    assert code == (exitcodes.FAILED if refused else exitcodes.OK), events
    assert {e["signature"] for e in named(events, "model_rejected")} == set(refused or {})
    assert one(events, "build_finished")["outcome"] == "published"
    version = highest(project.serving)
    feeds = {name: sample_feeds(model) for name, model in big.items()}
    published = run_signatures(version, feeds)
    for name, model in big.items():
        assert_outputs_match(published[name], source_outputs(model, feeds[name]))
    return version


def test_inputs_filled_with_constants_are_their_data_files_linked_from_the_state_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = tmp_path / "sources"
    dense = [
        graphgen.write_big_dense(sources / f"big{i}.pb", target_bytes=3_000_000, seed=i)
        for i in range(3)
    ]
    big = {
        "linked_a": dense[0],
        "linked_b": dense[1],
        "text": _as_text(dense[2], sources / "text.pbtxt"),
        "padded": _padded(dense[2], sources / "padded.pb", 8_000_000),
    }
    project = Project(tmp_path / "project")

    # A graph that would be its own shard too, but is refused after it was read.
    version = _build_big(project, capsys, big, refused={"refused": dense[2]})

    # The two binary graphs whose bytes are mostly constants are shards as they are, the same
    # files as their kept copies; the text graph's and the padded graph's constants are
    # written into a data file of their own.
    stats = manifest(version)["stats"]
    assert (stats["data_shards"], stats["inputs_linked"], stats["inputs_copied"]) == (3, 2, 0)
    files = _data_files(version)
    assert [f.name for f in files] == [f"variables.data-0000{i}-of-00003" for i in range(3)]
    linked = [next(f for f in files if f.samefile(_blob(project, m.path))) for m in dense[:2]]
    assert [f.read_bytes() for f in linked] == [m.path.read_bytes() for m in dense[:2]]
    (own,) = set(files) - set(linked)
    contents = [
        len(n.attr["value"].tensor.tensor_content)
        for n in graphgen.load_graph_def(dense[2].path).node
    ]
    assert own.stat().st_size == 2 * sum(c for c in contents if c >= LARGE_CONSTANT_BYTES)
    # Nothing but the bundle is left in variables/, and no temporary file in the state folder.
    assert sorted(p.name for p in (version / "variables").iterdir()) == [
        *(f.name for f in files),
        "variables.index",
    ]
    assert not [p for p in (project.state / "blobs").iterdir() if p.name.startswith(".")]


def test_a_rebuild_links_what_did_not_change_and_the_kept_copy_of_a_refused_upload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = tmp_path / "sources"
    big = {
        name: graphgen.write_big_dense(sources / f"{name}.pb", target_bytes=2_000_000, seed=seed)
        for seed, name in enumerate(("changed", "refused", "same"))
    }
    project = Project(tmp_path / "project")
    first = _build_big(project, capsys, big)
    first_shards = {name: _shard_of(first, _blob(project, m.path)) for name, m in big.items()}

    changed = graphgen.write_big_dense(sources / "changed2.pb", target_bytes=2_000_000, seed=7)
    shutil.copyfile(changed.path, project.frozen / "changed.pb")
    cut = project.frozen / "refused.pb"
    cut.write_bytes(cut.read_bytes()[:1_000_000])
    code, events = project.cli(capsys, "build")

    assert code == exitcodes.FAILED, events
    assert one(events, "model_kept")["signature"] == "refused"
    assert one(events, "build_finished")["outcome"] == "published"
    second = highest(project.serving)
    assert second != first
    stats = manifest(second)["stats"]
    assert (stats["data_shards"], stats["inputs_linked"], stats["inputs_copied"]) == (3, 3, 0)
    # The unchanged input and the refused one's kept copy are the very files of version 1.
    assert _shard_of(second, first_shards["same"])
    assert _shard_of(second, first_shards["refused"])
    assert _shard_of(second, _blob(project, changed.path))
    assert len({os.stat(f).st_ino for f in [*first_shards.values(), *_data_files(second)]}) == 4
    feeds = {name: sample_feeds(model) for name, model in big.items()}
    published = run_signatures(second, feeds)
    for name, model in {**big, "changed": changed}.items():
        assert_outputs_match(published[name], source_outputs(model, feeds[name]))


def test_a_torn_kept_copy_is_written_again_before_it_is_linked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = graphgen.write_big_dense(tmp_path / "big.pb", target_bytes=2_000_000)
    project = Project(tmp_path / "project")
    # What a power loss can leave of a copy whose bytes never reached the disk.
    blob = _blob(project, model.path)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(model.path.read_bytes()[:4096])

    version = _build_big(project, capsys, {"big": model})

    assert blob.read_bytes() == model.path.read_bytes()
    assert _shard_of(version, blob)


@pytest.fixture
def other_file_system(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than tmp_path (a tmpfs), where hard links fail."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp_path")
    folder = Path(tempfile.mkdtemp(prefix="tfmerge-state-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_state_folder_on_another_file_system_gets_its_inputs_copied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], other_file_system: Path
) -> None:
    big = {
        f"big{i}": graphgen.write_big_dense(tmp_path / f"big{i}.pb", target_bytes=2_000_000, seed=i)
        for i in range(2)
    }
    project = Project(tmp_path / "project")
    project.state = other_file_system / "state"

    entries = []
    for name, model in big.items():
        project.add(model, f"{name}.pb")
        entries.append(model_entry(name, f"{name}.pb", model, sample=model.sample))
    project.configure(entries)
    code, events = project.cli(capsys, "build")

    assert code == exitcodes.OK, events
    version = highest(project.serving)
    stats = manifest(version)["stats"]
    assert (stats["data_shards"], stats["inputs_linked"], stats["inputs_copied"]) == (2, 0, 2)
    shards = _data_files(version)
    assert sorted(f.read_bytes() for f in shards) == sorted(
        m.path.read_bytes() for m in big.values()
    )
    for model in big.values():
        blob = _blob(project, model.path)
        assert blob.read_bytes() == model.path.read_bytes()
        assert not any(f.samefile(blob) for f in shards)
    feeds = {name: sample_feeds(model) for name, model in big.items()}
    published = run_signatures(version, feeds)
    for name, model in big.items():
        assert_outputs_match(published[name], source_outputs(model, feeds[name]))
