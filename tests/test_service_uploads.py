"""The daemon's loop in-process, on uploads that are not at rest and a watcher that goes deaf.

The rig of ``test_service``: a scripted watcher, scripted workers and a fake clock. What the
kernel says is real: the files are on tmp paths, a writer is a real process that holds a file
open (``tests/uploaders.py``), and the daemon asks the kernel with a read lease whether a file
is open for writing, as it does in service.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from test_service import Build, Play, Rig, publishes
from tfmerge import exitcodes
from tfmerge.daemon.debounce import Change
from tfmerge.daemon.writers import LeaseProbe
from tfmerge.folders.publish import MANIFEST, read_manifest, versions
from tfmerge.folders.state import Store
from tfmerge.models import BuildResult
from uploaders import Uploader

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def default_structlog() -> Iterator[None]:
    """Log at every level here, whatever an earlier test configured."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    (rig.frozen / "a.pb").write_bytes(b"graph a")
    yield rig
    rig.notify.messages()


def publishes_what_is_at_rest(refusals: list[list[str]]) -> Play:
    """What a worker builds when files are open for writing: it refuses them (the kernel
    refuses it a lease), their models keep their last accepted input, and the build lists
    them in ``unsettled``; the rest publishes. Each build's refusals land in refusals."""

    def play(build: Build) -> BuildResult:
        request = build.request
        frozen = request.config.frozen_dir
        probe = LeaseProbe()
        refused = {s.relpath for s in request.resolution.specs if probe(frozen, s.relpath)}
        refusals.append(sorted(refused))
        return _without(build, refused)

    return play


def refuses_as_changed_while_read(relpath: str) -> Play:
    """A build that found relpath changed while it read it (a touch during the copy)."""
    return lambda build: _without(build, {relpath})


def _without(build: Build, refused: set[str]) -> BuildResult:
    """The build of every model but those of the refused files, which keep their last
    accepted input (in the manifest too, as a real build serves them)."""
    request = build.request
    rest = tuple(s for s in request.resolution.specs if s.relpath not in refused)
    resolution = dataclasses.replace(request.resolution, specs=rest)
    trimmed = dataclasses.replace(request, resolution=resolution)
    result = publishes(dataclasses.replace(build, request=trimmed))
    kept = tuple(
        dataclasses.replace(model, kept=True)
        for model in Store(request.config.state_dir).accepted().values()
        if model.relpath in refused
    )
    if result.staging is not None and kept:
        manifest_path = Path(result.staging) / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest["signatures"].update({m.signature: m.as_dict() for m in kept})
        manifest_path.write_text(json.dumps(manifest))
    return dataclasses.replace(
        result, models=result.models + kept, unsettled=tuple(sorted(refused))
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served(rig: Rig, version: int, signature: str) -> str:
    manifest = read_manifest(rig.serving / str(version))
    return str(manifest["signatures"][signature]["sha256"])


# --- files open for writing -------------------------------------------------------------------


def test_a_file_open_for_writing_past_max_wait_is_not_built_and_the_rest_publishes(
    rig: Rig, tmp_path: Path
) -> None:
    old, new = b"old graph b " * 100, b"new graph b " * 100  # one architecture, one size
    (rig.frozen / "b.pb").write_bytes(old)
    upload = tmp_path / "upload.pb"
    upload.write_bytes(new)
    refusals: list[list[str]] = []
    at_rest = publishes_what_is_at_rest(refusals)
    rig.workers.script(publishes, at_rest, at_rest)
    uploads: list[Uploader] = []

    def scp_starts_overwriting_b() -> None:
        uploads.append(Uploader("inplace", rig.frozen / "b.pb", upload))
        uploads[0].wait_for("opened")
        uploads[0].wait_for("half")  # new bytes, then old ones: it would parse
        rig.watchers.current.replay([Change("b.pb", "modified")])

    def scp_finishes() -> None:
        uploads[0].finish()
        rig.watchers.current.replay([Change("b.pb", "modified"), Change("b.pb", "closed")])

    rig.timeline.at(10, scp_starts_overwriting_b)
    rig.timeline.at(11, lambda: rig.upload("c.pb"))
    rig.timeline.at(50, scp_finishes)
    rig.timeline.at(90, rig.stop)
    try:
        assert rig.run() == exitcodes.OK
    finally:
        for uploader in uploads:
            uploader.close()

    # The hold is said once, a quiet period in, with the size so far.
    held = [
        {k: e[k] for k in ("file", "size", "waited_seconds", "open_for_writing", "at")}
        for e in rig.named("batch_held")
    ]
    assert held == [
        {
            "file": "b.pb",
            "size": len(old),
            "waited_seconds": 2.0,
            "open_for_writing": True,
            "at": 12.0,
        }
    ]
    settled = [
        (e["paths"], e["reason"], e["still_writing"], e["at"]) for e in rig.named("batch_settled")
    ]
    assert settled == [
        (["b.pb", "c.pb"], "max_wait", ["b.pb"], 40.0),
        (["b.pb"], "settled", [], 52.0),  # closed at 50, quiet at 52; no build while it was open
    ]
    finished = [
        (e["version"], e["added"], e["updated"], e["kept"]) for e in rig.named("build_finished")
    ]
    assert finished == [(1, ["a", "b"], [], []), (2, ["c"], [], ["b"]), (3, [], ["b"], [])]
    assert refusals == [["b.pb"], []]  # open for writing at 40, closed at 52
    assert served(rig, 2, "b") == sha256(old)  # the half-overwritten file was never built
    assert served(rig, 3, "b") == sha256(new)
    assert len(rig.workers.ran) == 3


def test_an_attribute_change_after_the_close_settles_a_quiet_period_later(rig: Rig) -> None:
    rig.workers.script(publishes, publishes)

    def scp_dash_p_sets_times_after_the_close() -> None:
        os.utime(rig.frozen / "b.pb", ns=(10**18, 10**18))
        os.chmod(rig.frozen / "b.pb", 0o640)
        rig.watchers.current.replay([Change("b.pb", "modified")])

    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(10.5, scp_dash_p_sets_times_after_the_close)
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    (settled,) = rig.named("batch_settled")
    assert (settled["reason"], settled["still_writing"], settled["at"]) == ("settled", [], 12.5)
    assert rig.named("batch_held") == []
    assert rig.versions() == [1, 2]


def test_a_file_the_build_found_changed_while_read_settles_again(rig: Rig) -> None:
    rig.workers.script(publishes, refuses_as_changed_while_read("b.pb"), publishes)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    settled = [(e["paths"], e["at"]) for e in rig.named("batch_settled")]
    assert settled == [(["b.pb"], 12.0), (["b.pb"], 14.0)]
    finished = [(e["outcome"], e["added"]) for e in rig.named("build_finished")]
    assert finished == [("published", ["a"]), ("unchanged", []), ("published", ["b"])]


# --- a watcher that never goes deaf -------------------------------------------------------------


def test_a_deaf_watcher_is_replaced_and_a_rescan_finds_what_it_missed(rig: Rig) -> None:
    rig.workers.script(publishes, publishes)

    def events_lost() -> None:
        (rig.frozen / "d.pb").write_bytes(b"graph d")  # its events were dropped
        (rig.frozen / ".d.pb.part").write_bytes(b"not an input")
        rig.watchers.current.deaf = "the kernel's inotify event queue overflowed"

    rig.timeline.at(9, events_lost)
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    (restarted,) = rig.named("watch_restarted")
    assert (restarted["reason"], restarted["at"]) == (
        "the kernel's inotify event queue overflowed",
        10.0,  # the next check: one every 2 s
    )
    (rescanned,) = rig.named("frozen_dir_rescanned")
    assert (rescanned["files"], rescanned["changed"], rescanned["deleted"]) == (2, ["d.pb"], [])
    (settled,) = rig.named("batch_settled")
    assert (settled["paths"], settled["at"]) == (["d.pb"], 12.0)
    assert rig.named("build_finished")[-1]["added"] == ["d"]
    first, second = rig.watchers.made
    assert (first.running, second.running) == (False, False)  # replaced, then stopped
    assert rig.versions() == [1, 2]


def test_frozen_dir_removed_and_made_again_is_watched_again(rig: Rig) -> None:
    rig.workers.script(publishes, publishes)

    def rm_rf_frozen() -> None:
        shutil.rmtree(rig.frozen)
        rig.watchers.current.deaf = "frozen_dir was removed"

    def mkdir_frozen_and_upload() -> None:
        rig.frozen.mkdir()
        (rig.frozen / "a.pb").write_bytes(b"graph a")
        (rig.frozen / "e.pb").write_bytes(b"graph e")

    rig.timeline.at(9, rm_rf_frozen)
    rig.timeline.at(15, mkdir_frozen_and_upload)
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    (lost,) = rig.named("watch_lost")
    assert (lost["at"], lost["folder"]) == (10.0, str(rig.frozen.resolve()))
    (restarted,) = rig.named("watch_restarted")
    assert (restarted["reason"], restarted["at"]) == ("frozen_dir can be watched again", 16.0)
    (rescanned,) = rig.named("frozen_dir_rescanned")
    assert rescanned["changed"] == ["a.pb", "e.pb"]  # a.pb is another file now (new inode)
    (settled,) = rig.named("batch_settled")
    assert (settled["paths"], settled["at"]) == (["a.pb", "e.pb"], 18.0)
    assert rig.named("build_finished")[-1]["added"] == ["e"]
    assert rig.watchers.current.running is False
    assert sorted(versions(rig.serving)) == [1, 2]
