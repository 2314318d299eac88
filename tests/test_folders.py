"""The serving and state folders under stress: what the server takes for a version, folders
tfmerge cannot write, and one-shot builds that run together or were killed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tfmerge import exitcodes, logs
from tfmerge.config import load as load_config

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one, parse_events
from servinglib import highest, manifest, versions

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> FrozenModel:
    return graphgen.write_dense(tmp_path_factory.mktemp("folders") / "m.pb", seed=80, in_dim=3)


@pytest.fixture
def project(tmp_path: Path, model: FrozenModel) -> Project:
    project = Project(tmp_path / "p")
    project.add(model, "m.pb")
    project.configure([model_entry("m", "m.pb", model)], keep_versions=2)
    return project


def run_command(
    project: Project, command: str, fault: str | None = None, faultfs: Path | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    """`tfmerge COMMAND` in a process of its own, with a fault injected where fault says."""
    env = None
    if fault is not None and faultfs is not None:
        control = project.root / "faultfs.control"
        control.write_text(fault + "\n")
        env = {
            **{k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            "LD_PRELOAD": str(faultfs),
            "FAULTFS_CONTROL": str(control),
        }
    done = subprocess.run(
        [sys.executable, "-m", "tfmerge", command, "-c", str(project.config)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    return done.returncode, parse_events(done.stdout), done.stderr


# --- what TensorFlow Serving takes for a version ------------------------------------------


def test_a_file_named_like_a_higher_version_blocks_the_publish_until_it_is_removed(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project.serving.mkdir(parents=True)
    (project.serving / "99").write_text("notes someone left here")

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.FAILED
    foreign = one(events, "foreign_version")
    assert foreign["paths"] == [str(project.serving / "99")]
    assert foreign["version"] == 1
    assert "remove 99" in foreign["reason"]
    assert one(events, "build_finished")["outcome"] == "error"
    assert sorted(p.name for p in project.serving.iterdir()) == ["99"]

    (project.serving / "99").unlink()
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK
    assert sorted(versions(project.serving)) == [1]


def test_pruning_never_follows_a_symlinked_version(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere" / "1"
    elsewhere.mkdir(parents=True)
    (elsewhere / "saved_model.pb").write_bytes(b"someone else's")
    project.serving.mkdir(parents=True)
    (project.serving / "1").symlink_to(elsewhere, target_is_directory=True)
    for number in ("2", "3"):
        (project.serving / number).mkdir()

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.OK, events
    assert one(events, "version_published")["version"] == 4
    assert [e["version"] for e in named(events, "version_pruned")] == [2]
    assert (project.serving / "1").is_symlink()
    assert (elsewhere / "saved_model.pb").read_bytes() == b"someone else's"
    assert sorted(p.name for p in project.serving.iterdir()) == [
        "1", "3", "4", "current_version", "exported_models",
    ]  # fmt: skip


# --- folders that cannot be written -------------------------------------------------------


def assert_one_folder_event(
    events: list[dict[str, Any]], name: str, number: int, under: Path
) -> dict[str, Any]:
    event = one(events, name)
    assert event["errno"] == number
    assert event["error"] == errno.errorcode[number]
    assert Path(event["path"]).is_relative_to(under) or under.is_relative_to(event["path"])
    return dict(event)


def test_a_state_dir_under_a_regular_file_is_one_event_and_exit_74(
    project: Project, model: FrozenModel, capsys: pytest.CaptureFixture[str]
) -> None:
    (project.root / "blocker").write_text("a file where a folder is expected")
    project.state = project.root / "blocker" / "state"
    project.configure([model_entry("m", "m.pb", model)])

    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FOLDER
    assert_one_folder_event(events, "state_dir_failed", errno.ENOTDIR, project.state)

    code, events, stderr = run_command(project, "run")
    assert code == exitcodes.FOLDER
    assert_one_folder_event(events, "state_dir_failed", errno.ENOTDIR, project.state)
    assert "Traceback" not in stderr


@pytest.mark.parametrize("folder", ["state_dir", "serving_dir"])
def test_a_read_only_folder_stops_the_daemon_with_one_event_and_exit_74(
    project: Project, faultfs: Path, folder: str
) -> None:
    project.state.mkdir()
    project.serving.mkdir()
    path = project.state if folder == "state_dir" else project.serving

    code, events, stderr = run_command(project, "run", f"EROFS {path}/", faultfs)

    assert code == exitcodes.FOLDER, stderr[-2000:]
    assert_one_folder_event(events, f"{folder}_failed", errno.EROFS, path)
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "event", "number", "published"),
    [
        ("ENOSPC /serving/.staging-", "serving_dir_failed", errno.ENOSPC, []),
        ("EIO /serving/.current_version", "serving_dir_failed", errno.EIO, [1]),
    ],
)
def test_a_full_or_failing_disk_during_a_build_is_one_event_and_exit_74(
    project: Project, faultfs: Path, fault: str, event: str, number: int, published: list[int]
) -> None:
    code, events, stderr = run_command(project, "build", fault, faultfs)

    assert code == exitcodes.FOLDER, stderr[-2000:]
    failed = assert_one_folder_event(events, event, number, project.serving)
    assert fault.split()[1] in failed["path"]
    assert one(events, "build_finished")["outcome"] == "error"
    assert "Traceback" not in stderr
    # Nothing partial: no staging left, and a version that is there is whole.
    assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]
    assert sorted(versions(project.serving)) == published
    for number_ in published:
        assert manifest(project.serving / str(number_))["signatures"]


# --- one-shot builds together, and killed -------------------------------------------------


def test_two_builds_of_the_same_inputs_publish_one_version(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    from tfmerge.build.run import run_build
    from tfmerge.daemon import pipeline

    logs.configure(fmt="json")
    config = load_config(project.config)
    other: list[pipeline.Outcome] = []
    staging_seen: list[list[str]] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        """This build has its result; another one publishes the same inputs first."""
        result = run_build(*args, **kwargs)
        staging_seen.append(sorted(p.name for p in project.serving.glob(".staging-*")))
        other.append(pipeline.run_once(config, run_build, trigger="command"))
        return result

    capsys.readouterr()
    outcome = pipeline.run_once(config, racing, trigger="command")
    events = parse_events(capsys.readouterr().out)

    assert other[0].outcome == "published"
    assert other[0].version == 1
    assert outcome.outcome == "unchanged"
    assert sorted(versions(project.serving)) == [1]
    unchanged = [e for e in named(events, "build_unchanged") if e["build_id"] == outcome.build_id]
    assert unchanged[0]["reason"] == "a concurrent build published these inputs first"
    # The other build left this one's staging alone while this one ran.
    assert staging_seen == [[f".staging-{outcome.build_id}"]]
    assert named(events, "staging_removed") == []
    assert not list(project.serving.glob(".staging-*"))


_HOLD_STAGING = """
import sys
from pathlib import Path
from tfmerge.folders import publish
staging = publish.Staging.create(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
(staging.path / "saved_model.pb").write_bytes(b"half a version")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def staging_holders(project: Project) -> Iterator[dict[str, subprocess.Popen[str]]]:
    project.serving.mkdir(parents=True)
    holders: dict[str, subprocess.Popen[str]] = {}
    for name in ("killed", "running"):
        holders[name] = subprocess.Popen(
            [sys.executable, "-c", _HOLD_STAGING, str(project.serving), str(project.state), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holders[name].stdout is not None
        assert holders[name].stdout.readline() == "ready\n"
    yield holders
    for holder in holders.values():
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


def test_a_killed_build_s_staging_is_removed_by_the_next_build_and_a_running_one_s_is_not(
    project: Project,
    staging_holders: dict[str, subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    staging_holders["killed"].kill()
    staging_holders["killed"].wait()

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.OK
    assert [e["path"] for e in named(events, "staging_removed")] == [
        str(project.serving / ".staging-killed")
    ]
    assert (project.serving / ".staging-running" / "saved_model.pb").exists()
    assert sorted(versions(project.serving)) == [1]

    # Once its build is gone (killed as well), the next build removes its staging too.
    staging_holders["running"].kill()
    staging_holders["running"].wait()
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK
    assert [e["path"] for e in named(events, "staging_removed")] == [
        str(project.serving / ".staging-running")
    ]
    assert not list(project.serving.glob(".staging-*"))
    assert manifest(highest(project.serving))["signatures"]


@pytest.mark.parametrize(("code", "tolerated"), [(errno.EINVAL, True), (errno.EIO, False)])
def test_a_folder_that_cannot_be_synced_is_tolerated_and_a_failing_sync_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, tolerated: bool
) -> None:
    """Some file systems (network, FUSE) refuse to sync a folder with EINVAL: that is no
    error. Any other failure of the sync is one, and names the folder."""
    from tfmerge.folders import fs

    real_fsync = os.fsync
    synced: list[int] = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        if Path(f"/proc/self/fd/{fd}").resolve() == tmp_path.resolve():
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if tolerated:
        fs.fsync_dir(tmp_path)
    else:
        with pytest.raises(OSError, match=str(tmp_path)) as raised:
            fs.fsync_dir(tmp_path)
        assert raised.value.errno == code
    assert len(synced) == 1
