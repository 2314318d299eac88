"""Faults: the daemon or its worker SIGKILLed mid-build, a full or failing disk.

Throughout, a separate process behaving like TensorFlow Serving polls the serving folder
every 20 ms, loads each new highest version with the SavedModel loader and runs every
signature: it must never meet a version it cannot load or run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import graphgen
from daemonlib import DaemonProcess, wait_until
from graphgen import FrozenModel
from projectlib import Project, model_entry
from servinglib import manifest, versions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TESTS = Path(__file__).resolve().parent
CYCLES = 20


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> list[FrozenModel]:
    root = tmp_path_factory.mktemp("fault-models")
    return [graphgen.write_dense(root / f"v{i}.pb", seed=40 + i, in_dim=6) for i in range(3)]


class Poller:
    def __init__(self, base: Path, work: Path) -> None:
        self.report_path = work / "poller.json"
        self.stop_path = work / "poller.stop"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "tfs_poller.py"),
                str(base),
                "--report",
                str(self.report_path),
                "--stop",
                str(self.stop_path),
            ],
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.report_path.exists, timeout=120)

    def report(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.report_path.read_text())
        return value

    def has_loaded(self, version: int) -> bool:
        return version in self.report()["loaded"] or bool(self.report()["failures"])

    def finish(self) -> dict[str, Any]:
        self.stop_path.touch()
        self.process.wait(timeout=60)
        return self.report()


@pytest.fixture
def project(tmp_path: Path, variants: list[FrozenModel]) -> Project:
    project = Project(tmp_path / "p")
    project.add(variants[0], "a.pb")
    project.configure([model_entry("a", "a.pb", variants[0])], keep_versions=3)
    project.serving.mkdir(parents=True)
    return project


@pytest.fixture
def poller(project: Project, tmp_path: Path) -> Iterator[Poller]:
    poller = Poller(project.serving, tmp_path)
    yield poller
    if poller.process.poll() is None:
        poller.finish()


def assert_only_complete_versions(project: Project) -> None:
    for number, path in versions(project.serving).items():
        assert (path / "saved_model.pb").stat().st_size > 0, number
        assert manifest(path)["signatures"], number


def upload(project: Project, model: FrozenModel) -> None:
    """A whole new file, written elsewhere and renamed into place."""
    temporary = project.frozen / ".a.pb.upload"
    shutil.copyfile(model.path, temporary)
    temporary.rename(project.frozen / "a.pb")


def test_daemon_killed_at_random_moments(
    project: Project, poller: Poller, variants: list[FrozenModel]
) -> None:
    rng = random.Random(20261125)
    for cycle in range(CYCLES):
        upload(project, variants[cycle % 2])
        daemon = DaemonProcess(project.config)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.process.wait(timeout=rng.uniform(0.0, 7.0))
        assert daemon.process.returncode is None, "the daemon must not exit by itself"
        daemon.kill()
        assert_only_complete_versions(project)

    upload(project, variants[2])
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()
        assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]
        newest = max(versions(project.serving))
        assert manifest(project.serving / str(newest))["signatures"]["a"]["sha256"] == _sha(
            variants[2]
        )
        wait_until(lambda: poller.has_loaded(newest), timeout=60)
    report = poller.finish()
    assert report["failures"] == []
    assert report["loaded"][-1] == newest


def test_worker_killed_at_random_moments(
    project: Project, poller: Poller, variants: list[FrozenModel]
) -> None:
    # A warm worker has TensorFlow imported before the build starts, so the kill moments
    # spread over reading, checking, merging, verifying and writing, not the import.
    text = project.config.read_text().replace("[watch]", "[worker]\nwarm = true\n[watch]")
    project.config.write_text(text)
    rng = random.Random(1125)
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()
        killed = 0
        for cycle in range(CYCLES):
            mark = daemon.mark()
            upload(project, variants[(cycle + 1) % 2])
            daemon.wait_for("build_started", since=mark)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.process.wait(timeout=rng.uniform(0.0, 1.5))
            for pid in daemon.worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed += 1
            # A killed try ends with build_finished outcome error and is retried; the build
            # itself must still end published (or unchanged, when the kill came after it).
            finished = daemon.wait_for(
                "build_finished",
                since=mark,
                where=lambda e: e["outcome"] != "error",
                timeout=180,
            )
            assert finished["outcome"] in ("published", "unchanged")
            assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]
            assert_only_complete_versions(project)
        assert killed >= CYCLES // 2, "too few kills landed during a build to mean anything"
        # Each crash was retried to success: no build gave up.
        assert daemon.named("worker_crashed") == []
        assert daemon.named("build_retry")
        newest = max(versions(project.serving))
        wait_until(lambda: poller.has_loaded(newest), timeout=60)
    report = poller.finish()
    assert report["failures"] == []
    assert len(set(report["loaded"])) >= CYCLES


def _sha(model: FrozenModel) -> str:
    import hashlib

    return hashlib.sha256(model.path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("error", "where", "message", "event"),
    [
        ("ENOSPC", "/serving/.staging-", "No space left on device", "serving_dir_failed"),
        ("EIO", "/state/blobs/", "Input/output error", "state_dir_failed"),
    ],
)
def test_full_or_failing_disk_publishes_nothing_partial(
    project: Project,
    variants: list[FrozenModel],
    faultfs: Path,
    tmp_path: Path,
    error: str,
    where: str,
    message: str,
    event: str,
) -> None:
    control = tmp_path / "faultfs.control"
    project.configure([model_entry("a", "a.pb", variants[0])], keep_versions=3)
    text = project.config.read_text().replace("[watch]", "[worker]\nretries = 1\n[watch]")
    project.config.write_text(text)
    env = {"LD_PRELOAD": str(faultfs), "FAULTFS_CONTROL": str(control)}
    with DaemonProcess(project.config, env=env) as daemon:
        daemon.wait_ready()
        assert sorted(versions(project.serving)) == [1]
        before = (project.serving / "1" / "saved_model.pb").read_bytes()

        control.write_text(f"{error} {where}\n")
        mark = daemon.mark()
        upload(project, variants[1])
        retry = daemon.wait_for("build_retry", since=mark)
        assert message in retry["reason"]
        # Retried as transient, then one event naming the folder, the path and the errno.
        failed = daemon.wait_for(event, since=mark, timeout=180)
        assert message in failed["reason"]
        assert failed["error"] == error
        assert where in failed["path"]
        assert sorted(versions(project.serving)) == [1]
        assert (project.serving / "1" / "saved_model.pb").read_bytes() == before
        assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]

        control.write_text("")
        mark = daemon.mark()
        upload(project, variants[2])
        finished = daemon.wait_for("build_finished", since=mark, timeout=180)
        assert finished["outcome"] == "published"
        assert sorted(versions(project.serving)) == [1, 2]
