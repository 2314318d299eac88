"""End to end: the real daemon, real writer processes, and the write patterns of upload tools.

One daemon session (each build's worker imports TensorFlow): an in-place overwrite that stays
open past ``max_wait_seconds`` (OpenSSH's scp: ``pwrite`` without truncation, cut to length
at the end), the times and mode set after the close (``scp -O -p``, ``rsync --inplace -t``,
``chmod``), and ``rm -rf frozen && mkdir frozen`` under the running daemon.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tfmerge import exitcodes
from uploaders import Uploader

import graphgen
from daemonlib import DaemonProcess
from graphgen import FrozenModel
from projectlib import Project
from servinglib import highest, manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("daemon-upload-models")
    return {
        # Two trainings of one architecture: one's head and the other's tail parse.
        "old": graphgen.write_dense(root / "old.pb", seed=31),
        "new": graphgen.write_dense(root / "new.pb", seed=32),
        "other": graphgen.write_dense(root / "other.pb", seed=33, in_dim=6),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources(project: Project) -> dict[str, str]:
    """file -> sha256 of what the newest version was built from."""
    return {s["file"]: s["sha256"] for s in manifest(highest(project.serving))["sources"]}


def published(daemon: DaemonProcess, since: int, **changes: list[str]) -> dict[str, Any]:
    def wanted(event: dict[str, Any]) -> bool:
        return event["outcome"] == "published" and all(event[k] == v for k, v in changes.items())

    return daemon.wait_for("build_finished", since=since, where=wanted)


def test_writers_attributes_and_a_removed_frozen_dir_under_a_running_daemon(
    tmp_path: Path, models: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    for name in ("w", "a"):
        project.add(models["old"], f"{name}.pb")
    project.configure(discover=True)
    # Long enough a max_wait that a batch held by a trailing attribute change would show.
    text = project.config.read_text().replace("max_wait_seconds = 10.0", "max_wait_seconds = 2.5")
    project.config.write_text(text)
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()

        # 1. An in-place overwrite of w.pb stalls half-way, open, past max_wait.
        mark = daemon.mark()
        with Uploader("inplace", project.frozen / "w.pb", models["new"].path) as upload:
            upload.wait_for("opened")
            upload.wait_for("half")
            shutil.copyfile(models["other"].path, project.frozen / "b.pb")
            held = daemon.wait_for("batch_held", since=mark)
            assert (held["file"], held["open_for_writing"]) == ("w.pb", True)
            assert held["size"] == models["old"].path.stat().st_size
            finished = published(daemon, mark, added=["b"])
            assert finished["kept"] == ["w"]
            assert finished["unsettled"] == ["w.pb"]
            rejected = daemon.named("model_rejected", mark)
            assert [(e["file"], e["code"]) for e in rejected] == [("w.pb", "still_being_written")]
            settled = daemon.named("batch_settled", mark)
            assert [(e["reason"], e["still_writing"]) for e in settled] == [("max_wait", ["w.pb"])]
            assert sources(project)["w.pb"] == sha256(models["old"].path)

            # 2. Meanwhile c.pb arrives, and its times and mode are set after its close
            # (scp -O -p, rsync --inplace -t, chmod): w.pb's writer keeps the batch open, so
            # the attribute change lands in it whatever the machine's pace.
            target = project.frozen / "c.pb"
            shutil.copyfile(models["other"].path, target)
            os.utime(target, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
            os.chmod(target, 0o640)
            upload.finish()
        finished = published(daemon, mark, updated=["w"])
        assert finished["added"] == ["c"]
        assert sources(project)["w.pb"] == sha256(models["new"].path)
        # Held only by the open file, the batch built nothing more meanwhile; once it was
        # closed, the times set on c.pb after its close held nothing.
        assert len(daemon.named("build_started", mark)) == 2
        settled = daemon.named("batch_settled", mark)
        assert [(e["reason"], e["still_writing"]) for e in settled] == [
            ("max_wait", ["w.pb"]),
            ("settled", []),
        ]
        assert sorted(settled[1]["paths"]) == ["c.pb", "w.pb"]

        # 3. rm -rf frozen && mkdir frozen, and the uploads start again.
        mark = daemon.mark()
        shutil.rmtree(project.frozen)
        project.frozen.mkdir()
        for name in ("w", "a"):
            project.add(models["new"] if name == "w" else models["old"], f"{name}.pb")
        for name in ("b", "c", "d"):
            project.add(models["other"], f"{name}.pb")
        restarted = daemon.wait_for("watch_restarted", since=mark)
        assert restarted["folder"] == str(project.frozen.resolve())
        published(daemon, mark, added=["d"])
        mark = daemon.mark()
        project.add(models["other"], "e.pb")  # heard by the new watch
        published(daemon, mark, added=["e"])
        assert sorted(sources(project)) == ["a.pb", "b.pb", "c.pb", "d.pb", "e.pb", "w.pb"]
        assert daemon.stop() == exitcodes.OK
    assert daemon.named("lease_probe_unavailable") == []
    assert [e["event"] for e in daemon.events if e.get("level") == "error"] == []
