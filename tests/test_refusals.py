"""Bad input: a named event with the file and the reason, exit 1, the served version untouched."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tfmerge import exitcodes

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import assert_outputs_match, highest, manifest, run_signatures, versions

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("refusal-models")
    return {
        "good": graphgen.write_dense(root / "good.pb", seed=3),
        "other": graphgen.write_dense(root / "other.pb", seed=4),
        "reader": graphgen.write_file_reader(root / "reader.pb"),
        "pyfunc": graphgen.write_py_func(root / "pyfunc.pb"),
    }


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def published_project(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> Project:
    project = Project(tmp_path)
    project.add(models["good"], "good.pb")
    project.configure([model_entry("good", "good.pb", models["good"])])
    assert project.cli(capsys, "build")[0] == exitcodes.OK
    return project


Setup = Callable[[Project, dict[str, FrozenModel]], dict[str, object]]


def _truncated(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    data = models["other"].path.read_bytes()
    (project.frozen / "bad.pb").write_bytes(data[: len(data) // 2 + 1])
    return model_entry("bad", "bad.pb", models["other"])


def _random_bytes(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    (project.frozen / "bad.pb").write_bytes(np.random.default_rng(0).bytes(4096))
    return model_entry("bad", "bad.pb", models["other"])


def _saved_model(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    source = highest(project.serving) / "saved_model.pb"
    (project.frozen / "bad.pb").write_bytes(source.read_bytes())
    return model_entry("bad", "bad.pb", models["other"])


def _empty(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    (project.frozen / "bad.pb").write_bytes(b"")
    return model_entry("bad", "bad.pb", models["other"])


def _missing_tensor(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    project.add(models["other"], "bad.pb")
    return {**model_entry("bad", "bad.pb", models["other"]), "outputs": {"y": "no/such/tensor:0"}}


def _escape_dots(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    (project.root / "outside.pb").write_bytes(models["other"].path.read_bytes())
    return model_entry("bad", "../outside.pb", models["other"])


def _escape_symlink(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    (project.root / "outside.pb").write_bytes(models["other"].path.read_bytes())
    (project.frozen / "bad.pb").symlink_to(project.root / "outside.pb")
    return model_entry("bad", "bad.pb", models["other"])


def _too_large(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    project.add(models["other"], "bad.pb")
    return model_entry("bad", "bad.pb", models["other"])


def _reader(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    project.add(models["reader"], "bad.pb")
    return model_entry("bad", "bad.pb", models["reader"])


def _pyfunc(project: Project, models: dict[str, FrozenModel]) -> dict[str, object]:
    project.add(models["pyfunc"], "bad.pb")
    return model_entry("bad", "bad.pb", models["pyfunc"])


CASES: list[tuple[str, Setup, set[str], str]] = [
    ("truncated", _truncated, {"unparseable", "invalid_graph"}, ""),
    ("random_bytes", _random_bytes, {"unparseable", "not_a_graphdef"}, ""),
    ("saved_model", _saved_model, {"not_a_graphdef"}, "SavedModel"),
    ("empty", _empty, {"empty_file"}, "empty"),
    ("missing_tensor", _missing_tensor, {"missing_tensor"}, "no/such/tensor:0"),
    ("escape_dots", _escape_dots, {"path_escapes"}, "outside frozen_dir"),
    ("escape_symlink", _escape_symlink, {"path_escapes"}, "outside frozen_dir"),
    ("too_large", _too_large, {"too_large"}, "max_model_bytes"),
    ("reads_files", _reader, {"forbidden_op"}, "ReadFile"),
    ("python_callback", _pyfunc, {"forbidden_op"}, "PyFunc"),
]


@pytest.mark.parametrize(("case", "setup", "codes", "words"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_new_model_is_refused_and_the_served_version_is_untouched(
    tmp_path: Path,
    models: dict[str, FrozenModel],
    capsys: pytest.CaptureFixture[str],
    case: str,
    setup: Setup,
    codes: set[str],
    words: str,
) -> None:
    project = published_project(tmp_path, models, capsys)
    before = tree_digest(project.serving / "1")
    bad = setup(project, models)
    # With a limit below both files, the good model keeps serving from its last input too.
    extra = {"max_model_bytes": 1000} if case == "too_large" else {}
    project.configure([model_entry("good", "good.pb", models["good"]), bad], **extra)
    user_files = {
        p: p.read_bytes() for p in project.frozen.rglob("*") if p.is_file() and not p.is_symlink()
    }

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.FAILED
    rejected = [e for e in named(events, "model_rejected") if e.get("signature") == "bad"]
    assert len(rejected) == 1, events
    assert rejected[0]["code"] in codes
    assert rejected[0]["file"] in ("bad.pb", "../outside.pb")
    assert words in rejected[0]["reason"]
    finished = one(events, "build_finished")
    assert [r["signature"] for r in finished["rejected"] if r.get("signature") == "bad"] == ["bad"]
    assert sorted(versions(project.serving)) == [1]
    assert tree_digest(project.serving / "1") == before
    assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]
    for path, data in user_files.items():
        assert path.read_bytes() == data


def test_a_refused_update_keeps_serving_the_last_good_input(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = published_project(tmp_path, models, capsys)
    data = models["other"].path.read_bytes()
    (project.frozen / "good.pb").write_bytes(data[: len(data) // 3])  # an upload cut off

    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    assert one(events, "model_rejected")["file"] == "good.pb"
    assert one(events, "model_kept")["signature"] == "good"
    assert one(events, "build_finished")["outcome"] == "unchanged"
    assert sorted(versions(project.serving)) == [1]

    # A new model still publishes, and the refused one is served from its last good input.
    project.add(models["other"], "other.pb")
    project.configure(
        [
            model_entry("good", "good.pb", models["good"]),
            model_entry("other", "other.pb", models["other"]),
        ]
    )
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED  # good.pb is still refused
    finished = one(events, "build_finished")
    assert finished["outcome"] == "published"
    assert finished["kept"] == ["good"]
    assert finished["added"] == ["other"]
    version = highest(project.serving)
    assert manifest(version)["signatures"]["good"]["kept"] is True
    x = np.asarray(models["good"].sample["x"], dtype=np.float32)
    published = run_signatures(version, {"good": {"x": x}, "other": {"x": x}})
    for name in ("good", "other"):
        expected = graphgen.run_frozen(
            models[name].path, {models[name].inputs["x"]: x}, models[name].outputs
        )
        assert_outputs_match(published[name], expected)

    # Completing the upload publishes it.
    project.add(models["other"], "good.pb")
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK
    assert one(events, "build_finished")["updated"] == ["good"]


def test_allow_ops_widens_the_policy(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["reader"], "reader.pb")
    entry = model_entry("reader", "reader.pb", models["reader"], sample=models["reader"].sample)
    project.configure([entry])
    assert project.cli(capsys, "build")[0] == exitcodes.FAILED
    project.configure([entry], allow_ops=["ReadFile"])
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK, events
    feeds = {k: np.asarray(v) for k, v in models["reader"].sample.items()}
    published = run_signatures(highest(project.serving), {"reader": feeds})
    expected = graphgen.run_frozen(
        models["reader"].path,
        {models["reader"].inputs[k]: v for k, v in feeds.items()},
        models["reader"].outputs,
    )
    assert_outputs_match(published["reader"], expected)


def test_duplicate_signature_across_config_and_sidecar(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = published_project(tmp_path, models, capsys)
    project.add(models["other"], "other.pb")
    (project.frozen / "other.toml").write_text(
        '[[models]]\nsignature = "good"\ninputs = { x = "x:0" }\noutputs = { probs = "probs:0" }\n'
    )
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    rejected = one(events, "model_rejected")
    assert rejected["code"] == "duplicate_signature"
    assert rejected["signature"] == "good"
    assert "sidecar other.toml" in rejected["reason"]
    assert one(events, "model_kept")["signature"] == "good"
    assert sorted(versions(project.serving)) == [1]


def test_a_broken_sidecar_keeps_its_model_serving(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["good"], "carried.pb")
    sidecar = project.frozen / "carried.toml"
    sidecar.write_text(
        '[[models]]\nsignature = "carried"\ninputs = { x = "x:0" }\noutputs = { probs = "probs:0" }\n'
    )
    project.configure(discover=True)
    assert project.cli(capsys, "build")[0] == exitcodes.OK
    before = tree_digest(project.serving / "1")

    sidecar.write_text("[[models]\nsignature = ")  # a half-uploaded edit
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    assert one(events, "model_rejected")["code"] == "bad_sidecar"
    assert one(events, "model_kept")["signature"] == "carried"
    assert not named(events, "model_inferred")  # not rediscovered under its file name
    finished = one(events, "build_finished")
    assert finished["outcome"] == "unchanged"
    assert finished["removed"] == []
    assert sorted(versions(project.serving)) == [1]
    assert tree_digest(project.serving / "1") == before
