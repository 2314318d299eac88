"""inspect, check, status, rollback, pruning and config errors, through the command line."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tfmerge import cli, exitcodes

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import assert_outputs_match, highest, manifest, run_signatures, versions

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("command-models")
    return {
        f"m{i}": graphgen.write_dense(root / f"m{i}.pb", seed=10 + i, in_dim=4 + i)
        for i in range(4)
    } | {"table": graphgen.write_table_model(root / "table.pb")}


def test_inspect_prints_a_ready_to_paste_entry(
    models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    path = models["table"].path
    assert cli.main(["inspect", str(path), "--json"]) == exitcodes.OK
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == path.stat().st_size
    names = {info["name"] for info in report["placeholders"].values()}
    assert names == set(models["table"].inputs.values())
    dtypes = {info["name"]: info["dtype"] for info in report["placeholders"].values()}
    assert dtypes[models["table"].inputs["words"]] == "string"
    assert report["ops"]["LookupTableImportV2"] + report["ops"].get("InitializeTableV2", 0) >= 1
    assert report["initializers"]
    entry = tomllib.loads(report["entry"])["models"][0]
    assert entry["signature"] == "table"
    assert entry["frozen"] == "table.pb"
    assert set(entry["inputs"].values()) == names

    assert cli.main(["inspect", str(path)]) == exitcodes.OK
    text = capsys.readouterr().out
    assert "[[models]]" in text
    assert models["table"].inputs["words"] in text


def test_inspect_refuses_a_file_that_is_not_a_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "notes.pb"
    bogus.write_bytes(b"\xff" * 64)
    assert cli.main(["inspect", str(bogus)]) == exitcodes.FAILED


def test_check_validates_and_publishes_nothing(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["m0"], "m0.pb")
    project.configure([model_entry("m0", "m0.pb", models["m0"])])
    code, events = project.cli(capsys, "check")
    assert code == exitcodes.OK
    assert one(events, "check_finished")["accepted"] == ["m0"]
    assert not project.serving.exists() or not versions(project.serving)

    project.configure([{**model_entry("m0", "m0.pb", models["m0"]), "inputs": {"x": "nope:0"}}])
    code, events = project.cli(capsys, "check")
    assert code == exitcodes.FAILED
    assert one(events, "model_rejected")["code"] == "missing_tensor"


def test_config_errors_are_all_reported_with_their_own_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        'frozen_dir = "f"\nstate_dir = 3\nkeep_versions = 1\ncolour = "blue"\n'
        '[watch]\nquiet_seconds = "soon"\n[[models]]\nsignature = "a"\n'
    )
    assert cli.main(["build", "-c", str(config)]) == exitcodes.CONFIG
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    event = one(events, "config_invalid")
    assert event["path"] == str(config)
    problems = "\n".join(event["problems"])
    for expected in (
        "serving_dir: is required",
        "state_dir: expected a non-empty string",
        "keep_versions: expected an integer >= 2",
        "colour: unknown key",
        "watch.quiet_seconds: expected a number",
        "models[0].frozen: is required",
        "models[0].inputs: is required",
    ):
        assert expected in problems


def test_status_rollback_and_pruning(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    entries = []
    for index in range(4):
        name = f"m{index}"
        project.add(models[name], f"{name}.pb")
        entries.append(model_entry(name, f"{name}.pb", models[name]))
        project.configure(entries, keep_versions=2)
        assert project.cli(capsys, "build")[0] == exitcodes.OK
    assert sorted(versions(project.serving)) == [3, 4]

    assert cli.main(["status", "--json", "-c", str(project.config)]) == exitcodes.OK
    report = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in report["versions"]] == [3, 4]
    assert report["serving"] == 4
    assert report["versions"][-1]["signatures"] == ["m0", "m1", "m2", "m3"]
    assert {s["file"] for s in report["versions"][-1]["sources"]} == {f"m{i}.pb" for i in range(4)}

    code, events = project.cli(capsys, "rollback")
    assert code == exitcodes.OK
    rolled = one(events, "rollback_published")
    assert rolled == {**rolled, "version": 5, "restored": 3, "replaced": 4}
    assert sorted(versions(project.serving)) == [4, 5]
    assert manifest(highest(project.serving))["rolled_back_from"] == 3
    assert set(manifest(highest(project.serving))["signatures"]) == {"m0", "m1", "m2"}
    history = (project.serving / "current_version").read_text().splitlines()
    assert history[0].startswith("5\t\t")
    assert "rollback to version 3" in history[0]
    x = np.asarray(models["m2"].sample["x"], dtype=np.float32)
    published = run_signatures(highest(project.serving), {"m2": {"x": x}})
    expected = graphgen.run_frozen(models["m2"].path, {"x:0": x}, models["m2"].outputs)
    assert_outputs_match(published["m2"], expected)

    # The rolled-back inputs are not rebuilt by themselves, but an explicit build is obeyed.
    assert cli.main(["status", "-c", str(project.config)]) == exitcodes.OK
    assert "rollback of 3" in capsys.readouterr().out
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK
    assert one(events, "build_finished")["added"] == ["m3"]
    assert sorted(versions(project.serving)) == [5, 6]

    code, events = project.cli(capsys, "rollback", "--to", "1")
    assert code == exitcodes.FAILED
    assert "does not exist" in one(events, "rollback_failed")["reason"]
    assert not named(events, "rollback_published")


def test_smoke_without_a_server_configured_is_a_usage_error(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["m0"], "m0.pb")
    project.configure([model_entry("m0", "m0.pb", models["m0"])])
    assert project.cli(capsys, "build")[0] == exitcodes.OK
    code, events = project.cli(capsys, "smoke")
    assert code == exitcodes.USAGE
    assert "grpc_target" in one(events, "smoke_not_run")["reason"]
