"""Uploads that are not at rest, or not what was meant, never replace what is served.

Builds run in-process (``tfmerge build``) against real writer processes that follow the write
patterns of upload tools: an in-place overwrite without truncation (OpenSSH's scp), a writer
that keeps the file open, a writer killed half-way, a rename over the file (rsync), and paths
swapped for a link or a FIFO after the models were resolved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfmerge import exitcodes
from tfmerge.build import check
from uploaders import Uploader

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import assert_outputs_match, highest, manifest, run_signatures, versions

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("upload-models")
    return {
        # Two trainings of one architecture: a file of one's head and the other's tail parses.
        "old": graphgen.write_dense(root / "old.pb", seed=3),
        "new": graphgen.write_dense(root / "new.pb", seed=4),
        "other": graphgen.write_dense(root / "other.pb", seed=5, in_dim=6),
    }


def outputs_of(version: Path, signature: str, model: FrozenModel) -> None:
    """The published signature computes what model's graph computes."""
    x = np.asarray(model.sample["x"], dtype=np.float32)
    served = run_signatures(version, {signature: {"x": x}})[signature]
    assert_outputs_match(served, graphgen.run_frozen(model.path, {"x:0": x}, model.outputs))


def entries(models: dict[str, FrozenModel], **files: str) -> list[dict[str, Any]]:
    """Config entries, signature = model: the signatures serve probs and classes both."""
    return [model_entry(name, f"{name}.pb", models[model]) for name, model in files.items()]


def published(project: Project, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK, [e for e in events if e.get("level") in ("warning", "error")]
    return events


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_digest(frozen: Path, name: str, source: Path) -> None:
    """NAME.sha256 as `sha256sum NAME > NAME.sha256` writes it on the uploader's machine."""
    machine = frozen.parent / "uploader"
    machine.mkdir(exist_ok=True)
    shutil.copyfile(source, machine / name)
    with (frozen / f"{name}.sha256").open("w") as out:
        subprocess.run(["sha256sum", name], cwd=machine, stdout=out, check=True)


# --- files open for writing ------------------------------------------------------------------


def test_files_open_for_writing_are_not_built_and_the_rest_publishes(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["old"], "good.pb")
    project.configure(entries(models, good="old"))
    published(project, capsys)

    project.add(models["other"], "other.pb")
    project.add(models["new"], "fresh.pb")
    project.configure(entries(models, good="old", other="other", fresh="new"))
    good = project.frozen / "good.pb"
    with (
        Uploader("inplace", good, models["new"].path) as upload,
        Uploader("hold", project.frozen / "fresh.pb") as holder,
    ):
        upload.wait_for("opened")
        upload.wait_for("half")
        holder.wait_for("opened")
        code, events = project.cli(capsys, "build")

        assert code == exitcodes.FAILED
        refused = {e["file"]: e for e in named(events, "model_rejected")}
        assert sorted(refused) == ["fresh.pb", "good.pb"]
        for event in refused.values():
            assert (event["code"], event["level"]) == ("still_being_written", "warning")
        kept = one(events, "model_kept")
        assert (kept["signature"], kept["code"]) == ("good", "still_being_written")
        assert kept["sha256"] == sha256_of(models["old"].path)
        finished = one(events, "build_finished")
        assert finished["outcome"] == "published"
        assert (finished["added"], finished["kept"]) == (["other"], ["good"])
        assert finished["unsettled"] == ["fresh.pb", "good.pb"]
        assert one(events, "inputs_unsettled")["files"] == ["fresh.pb", "good.pb"]
        version = highest(project.serving)
        assert sorted(manifest(version)["signatures"]) == ["good", "other"]
        outputs_of(version, "good", models["old"])
        # Whatever the next start finds on disk, these files were not built as they are.
        assert manifest(version)["raw_fingerprint"] is None

        upload.finish()
        holder.finish()
    events = published(project, capsys)
    finished = one(events, "build_finished")
    assert (finished["added"], finished["updated"]) == (["fresh"], ["good"])
    version = highest(project.serving)
    outputs_of(version, "good", models["new"])
    outputs_of(version, "fresh", models["new"])


# --- files that change while they are read ---------------------------------------------------


def test_a_file_renamed_over_while_it_is_read_is_not_used(
    tmp_path: Path,
    models: dict[str, FrozenModel],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = Project(tmp_path)
    project.add(models["old"], "good.pb")
    project.configure(entries(models, good="old"))
    published(project, capsys)
    project.add(models["new"], "good.pb")
    shutil.copyfile(models["other"].path, project.frozen / ".good.pb.Xq3z")
    real_copy, real_readv = os.copy_file_range, os.readv
    renamed: list[bool] = []

    def rsync_renames(source: int) -> None:
        if not renamed and Path(f"/proc/self/fd/{source}").readlink().name == "good.pb":
            # rsync renames its finished temporary over the file being taken.
            (project.frozen / ".good.pb.Xq3z").replace(project.frozen / "good.pb")
            renamed.append(True)

    def copy_while_rsync_renames(source: int, target: int, count: int) -> int:
        moved = real_copy(source, target, count)
        rsync_renames(source)
        return moved

    def read_while_rsync_renames(source: int, buffers: list[memoryview]) -> int:
        # A small input is read into memory rather than copied file to file.
        moved = real_readv(source, buffers)
        rsync_renames(source)
        return moved

    monkeypatch.setattr(os, "copy_file_range", copy_while_rsync_renames)
    monkeypatch.setattr(os, "readv", read_while_rsync_renames)
    code, events = project.cli(capsys, "build")
    monkeypatch.undo()
    assert renamed == [True]

    assert code == exitcodes.FAILED
    rejected = one(events, "model_rejected")
    assert (rejected["code"], rejected["file"]) == ("changed_while_read", "good.pb")
    assert one(events, "model_kept")["code"] == "changed_while_read"
    finished = one(events, "build_finished")
    assert (finished["outcome"], finished["unsettled"]) == ("unchanged", ["good.pb"])
    assert sorted(versions(project.serving)) == [1]

    events = published(project, capsys)  # at rest now: the renamed file is built
    assert one(events, "build_finished")["updated"] == ["good"]
    outputs_of(highest(project.serving), "good", models["other"])


# --- declared digests ------------------------------------------------------------------------


@pytest.mark.parametrize("digest_sent", ["before", "after"])
def test_an_in_place_upload_killed_half_way_is_caught_by_its_digest(
    tmp_path: Path,
    models: dict[str, FrozenModel],
    capsys: pytest.CaptureFixture[str],
    digest_sent: str,
) -> None:
    project = Project(tmp_path)
    good = project.add(models["old"], "good.pb")
    write_digest(project.frozen, "good.pb", models["old"].path)
    project.add(models["other"], "other.pb")
    project.configure(entries(models, good="old", other="other"))
    published(project, capsys)

    if digest_sent == "before":
        write_digest(project.frozen, "good.pb", models["new"].path)
    with Uploader("inplace", good, models["new"].path) as upload:
        upload.wait_for("opened")
        upload.wait_for("half")
        upload.kill()  # the connection is lost: the file is closed, new head, old tail
    old, new = models["old"].path.read_bytes(), models["new"].path.read_bytes()
    half = len(new) // 2
    assert good.read_bytes() == new[:half] + old[half:]

    declared = sha256_of(models["new" if digest_sent == "before" else "old"].path)
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    rejected = one(events, "model_rejected")
    assert (rejected["code"], rejected["file"]) == ("digest_mismatch", "good.pb")
    assert rejected["sha256"] == sha256_of(good)
    assert rejected["declared_sha256"] == declared
    assert rejected["declared_by"] == "good.pb.sha256"
    assert declared in rejected["reason"]
    assert one(events, "model_kept")["sha256"] == sha256_of(models["old"].path)
    assert one(events, "build_finished")["outcome"] == "unchanged"

    project.add(models["new"], "good.pb")  # the upload, done again and whole
    if digest_sent == "after":
        code, events = project.cli(capsys, "build")
        assert one(events, "model_rejected")["code"] == "digest_mismatch"
        assert sorted(versions(project.serving)) == [1]
        write_digest(project.frozen, "good.pb", models["new"].path)
    events = published(project, capsys)
    assert one(events, "build_finished")["updated"] == ["good"]
    outputs_of(highest(project.serving), "good", models["new"])


# --- breaking interface changes --------------------------------------------------------------


def graph_cut_after(data: bytes, node: str) -> bytes:
    """The GraphDef's bytes cut right after one of its nodes, as an upload stopped there."""
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        length, start = _varint(data, position)
        position = start + length
        if tag == (1 << 3 | 2) and _node_name(data[start:position]) == node:
            return data[:position]
    raise AssertionError(f"no node {node!r}")


def _node_name(node: bytes) -> str:
    tag, position = _varint(node, 0)
    assert tag == (1 << 3 | 2)
    length, start = _varint(node, position)
    return node[start : start + length].decode()


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def test_a_cut_graph_that_loses_an_output_is_refused_unless_declared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    demo = REPO / "frozen" / "demo.pb"
    shutil.copyfile(demo, project.frozen / "demo.pb")
    project.configure(discover=True)
    published(project, capsys)
    assert manifest(highest(project.serving))["signatures"]["demo"]["outputs"] == {
        "classes": "classes:0"
    }

    # Cut after the Softmax: it parses, and discovery would now serve `probs` only.
    (project.frozen / "demo.pb").write_bytes(graph_cut_after(demo.read_bytes(), "probs"))
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    rejected = one(events, "model_rejected")
    assert rejected["code"] == "interface_changed"
    assert rejected["changes"] == ["output 'classes' removed"]
    assert one(events, "model_kept")["code"] == "interface_changed"
    assert sorted(versions(project.serving)) == [1]

    project.configure(discover=True, allow_interface_change=True)
    events = published(project, capsys)
    assert one(events, "build_finished")["updated"] == ["demo"]
    assert manifest(highest(project.serving))["signatures"]["demo"]["outputs"] == {
        "probs": "probs:0"
    }

    # Back to the whole graph, without the allowance: `probs` would go, unless declared.
    project.configure(discover=True)
    shutil.copyfile(demo, project.frozen / "demo.pb")
    code, events = project.cli(capsys, "build")
    assert one(events, "model_rejected")["changes"] == ["output 'probs' removed"]
    shutil.copyfile(REPO / "frozen" / "demo.toml", project.frozen / "demo.toml")
    events = published(project, capsys)
    assert one(events, "build_finished")["updated"] == ["demo"]
    assert sorted(manifest(highest(project.serving))["signatures"]["demo"]["outputs"]) == [
        "classes",
        "probs",
    ]


# --- path swaps between the resolution and the read ------------------------------------------


def _swap_for_link(frozen: Path, outside: Path) -> None:
    (frozen / "z.pb").unlink()
    (frozen / "z.pb").symlink_to(outside)


def _swap_for_fifo(frozen: Path, outside: Path) -> None:
    (frozen / "z.pb").unlink()
    os.mkfifo(frozen / "z.pb")  # no writer ever comes: a plain open would wait forever


@pytest.mark.parametrize(
    ("swap", "code"),
    [(_swap_for_link, "path_escapes"), (_swap_for_fifo, "not_a_file")],
    ids=["symlink", "fifo"],
)
@pytest.mark.timeout(180)
def test_a_path_swapped_after_resolution_is_refused_never_followed(
    tmp_path: Path,
    models: dict[str, FrozenModel],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    swap: Callable[[Path, Path], None],
    code: str,
) -> None:
    project = Project(tmp_path)
    for name in ("a.pb", "b.pb", "c.pb", "z.pb"):
        project.add(models["old"], name)
    outside = tmp_path / "outside.pb"
    shutil.copyfile(models["other"].path, outside)
    project.configure(discover=True)
    real_check = check._check_read
    swapped: list[str] = []

    def check_and_swap(spec: Any, *args: Any, **kwargs: Any) -> Any:
        # While the build checks `a`, long after z.pb was resolved as a regular file, and
        # before its copy starts (copies run two models ahead).
        if spec.signature == "a":
            swap(project.frozen, outside)
            swapped.append(spec.signature)
        return real_check(spec, *args, **kwargs)

    monkeypatch.setattr(check, "_check_read", check_and_swap)
    code_, events = project.cli(capsys, "build")
    monkeypatch.undo()

    assert swapped == ["a"]
    assert one(events, "build_started")["models"] == 4  # z.pb was resolved as a regular file
    assert code_ == exitcodes.FAILED
    rejected = one(events, "model_rejected")
    assert (rejected["code"], rejected["file"], rejected["signature"]) == (code, "z.pb", "z")
    assert one(events, "build_finished")["added"] == ["a", "b", "c"]
    sources = manifest(highest(project.serving))["sources"]
    assert sha256_of(outside) not in {s["sha256"] for s in sources}
    assert {s["file"] for s in sources} == {"a.pb", "b.pb", "c.pb"}
