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
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import graphgen
from daemonlib import PATIENCE, DaemonProcess, wait_until
from graphgen import FrozenModel
from projectlib import Project, model_entry
from servinglib import manifest, versions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TESTS = Path(__file__).resolve().parent
#: SIGKILLs of each kind, at the least, over all parts of a test.
KILLS = 20
#: Each kill test can run in parts, each with a daemon and a poller of its own, which
#: pytest-xdist runs side by side. Every part costs a poller and a first build (about 10 s of
#: CPU), and on two cores the suite's CPU time bounds its wall time: one part.
PARTS = 1
KILLS_PER_PART = KILLS // PARTS
#: Worker kills per upload: as many as the build has retries, so it always publishes.
KILLS_PER_UPLOAD = 3
#: The first variants serve the disk-fault tests and the daemon kills; the others are uploads
#: of content never seen before, which the worker copies into the state folder first.
VARIANTS = 12


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> list[FrozenModel]:
    root = tmp_path_factory.mktemp("fault-models")
    return [graphgen.write_dense(root / f"v{i}.pb", seed=40 + i, in_dim=6) for i in range(VARIANTS)]


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
        wait_until(self.report_path.exists)

    def report(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.report_path.read_text())
        return value

    def has_loaded(self, version: int) -> bool:
        return version in self.report()["loaded"] or bool(self.report()["failures"])

    def finish(self) -> dict[str, Any]:
        self.stop_path.touch()
        self.process.wait(timeout=PATIENCE)
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


def _start_to_ready(project: Project) -> float:
    """Seconds from starting the daemon to its first version, on this machine as busy as it is
    now: start-up, a worker importing TensorFlow, its build and the publish. Kill moments are
    drawn over this span (a fifth longer, to take in what follows a publish), so that they land
    in every step on a slow machine as on a fast one."""
    started = time.monotonic()
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()
        return time.monotonic() - started


@pytest.mark.parametrize("part", range(PARTS))
def test_daemon_killed_at_random_moments(
    project: Project, poller: Poller, variants: list[FrozenModel], part: int
) -> None:
    # As installed: a warm worker is importing TensorFlow whenever the daemon is idle.
    project.configure(
        [model_entry("a", "a.pb", variants[0])], keep_versions=3, worker={"warm": True}
    )
    rng = random.Random(20261125 + part)
    span = 1.2 * _start_to_ready(project)
    for cycle in range(KILLS_PER_PART):
        upload(project, variants[(cycle + 1) % 2])
        daemon = DaemonProcess(project.config)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.process.wait(timeout=rng.uniform(0.0, span))
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
        wait_until(lambda: poller.has_loaded(newest))
    report = poller.finish()
    assert report["failures"] == []
    assert report["loaded"][-1] == newest


@pytest.mark.parametrize("part", range(PARTS))
def test_worker_killed_at_random_moments(
    project: Project, poller: Poller, variants: list[FrozenModel], part: int
) -> None:
    # Kills land in whichever worker is alive: one importing TensorFlow, one building (reading,
    # copying into the state folder, checking, merging, verifying, writing), or a warm one
    # waiting. Each upload is new content, so every build also copies it into the state folder.
    project.configure(
        [model_entry("a", "a.pb", variants[0])],
        keep_versions=3,
        worker={"warm": True, "retries": KILLS_PER_UPLOAD},
    )
    rng = random.Random(1125 + part)
    fresh = variants[3:]
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()
        # A worker's life, as the first build took it on this machine now: the build waited
        # for its worker to import TensorFlow, then ran. Kill moments are drawn over it.
        span = 1.2 * (
            _at(daemon.named("build_finished")[0]) - _at(daemon.named("build_started")[0])
        )
        killed = 0
        uploads = 0
        while killed < KILLS_PER_PART:
            mark = daemon.mark()
            upload(project, fresh[uploads % len(fresh)])
            uploads += 1
            daemon.wait_for("build_started", since=mark)
            for _ in range(KILLS_PER_UPLOAD):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.process.wait(timeout=rng.uniform(0.0, span))
                for pid in daemon.worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
            # A killed try ends with build_finished outcome error and is retried; the build
            # itself must still end published (or unchanged, when the kills came after it).
            finished = daemon.wait_for(
                "build_finished",
                since=mark,
                where=lambda e: e["outcome"] != "error",
            )
            assert finished["outcome"] in ("published", "unchanged")
            assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]
            assert_only_complete_versions(project)
        # Each crash was retried to success: no build gave up.
        assert daemon.named("worker_crashed") == []
        assert daemon.named("build_retry"), "no kill landed during a build"
        newest = max(versions(project.serving))
        assert manifest(project.serving / str(newest))["signatures"]["a"]["sha256"] == _sha(
            fresh[(uploads - 1) % len(fresh)]
        )
        wait_until(lambda: poller.has_loaded(newest))
    report = poller.finish()
    assert report["failures"] == []
    assert report["loaded"][-1] == newest


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


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
    project.configure(
        [model_entry("a", "a.pb", variants[0])], keep_versions=3, worker={"retries": 1}
    )
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
        failed = daemon.wait_for(event, since=mark)
        assert message in failed["reason"]
        assert failed["error"] == error
        assert where in failed["path"]
        assert sorted(versions(project.serving)) == [1]
        assert (project.serving / "1" / "saved_model.pb").read_bytes() == before
        assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]

        control.write_text("")
        mark = daemon.mark()
        upload(project, variants[2])
        finished = daemon.wait_for("build_finished", since=mark)
        assert finished["outcome"] == "published"
        assert sorted(versions(project.serving)) == [1, 2]
