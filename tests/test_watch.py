"""The watchdog adapter on real inotify: uploads as scp, rsync and sftp make them, and the
ways inotify goes deaf (a removed or replaced root, a folder moved in, a queue overflow)."""

from __future__ import annotations

import inspect
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from watchdog.observers import inotify_c

from tfmerge.daemon import overflow
from tfmerge.daemon.debounce import Change
from tfmerge.daemon.watch import FolderWatcher

# Only a missing event reaches this: inotify reports within milliseconds, even when busy.
WAIT_SECONDS = 60.0
BARRIER = "zz-barrier.pb"

StartWatcher = Callable[..., "queue.Queue[Change]"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "frozen"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder on the same file system, outside the watched tree."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.fixture
def start_watcher() -> Iterator[StartWatcher]:
    watchers: list[FolderWatcher] = []

    def start(folder: Path, also_watch: Sequence[Path] = ()) -> queue.Queue[Change]:
        changes: queue.Queue[Change] = queue.Queue()
        watcher = FolderWatcher(folder, changes.put, also_watch=also_watch)
        watchers.append(watcher)
        watcher.start()
        return changes

    yield start
    for watcher in watchers:
        watcher.stop()


def collect_until(
    changes: queue.Queue[Change], done: Callable[[list[Change]], bool]
) -> list[Change]:
    """Everything reported until ``done`` says the expected changes are in."""
    got: list[Change] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while not done(got):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"expected changes did not arrive in {WAIT_SECONDS} s; got {got}")
        try:
            got.append(changes.get(timeout=remaining))
        except queue.Empty:
            continue
    return got


def collect_until_barrier(changes: queue.Queue[Change], root: Path) -> list[Change]:
    """Everything reported before a marker file written now.

    inotify delivers one watch's events in order, so once the marker's close arrives
    every earlier event has been reported: this is how a test sees that nothing came.
    """
    (root / BARRIER).write_bytes(b"barrier")
    got = collect_until(changes, lambda got: Change(BARRIER, "closed") in got)
    return [change for change in got if change.path != BARRIER]


def test_scp_like_write_in_place_reports_created_modified_closed(
    root: Path, start_watcher: StartWatcher
) -> None:
    changes = start_watcher(root)
    with (root / "model.pb").open("wb", buffering=0) as upload:
        for _ in range(5):
            upload.write(b"x" * 4096)
    got = collect_until(changes, lambda got: Change("model.pb", "closed") in got)
    # inotify merges back-to-back modifications no one read yet: at least one remains.
    kinds = [change.kind for change in got]
    assert {change.path for change in got} == {"model.pb"}
    assert kinds[0] == "created"
    assert kinds[-1] == "closed"
    assert set(kinds[1:-1]) == {"modified"}


def test_rsync_like_rename_reports_moved_in_and_not_the_temporary(
    root: Path, start_watcher: StartWatcher
) -> None:
    (root / "model.pb").write_bytes(b"old version")
    changes = start_watcher(root)
    temporary = root / ".model.pb.Gx81kQ"
    temporary.write_bytes(b"new version")
    temporary.rename(root / "model.pb")
    assert collect_until_barrier(changes, root) == [Change("model.pb", "moved_in")]


def test_sftp_like_hard_link_reports_created_of_the_final_name(
    root: Path, start_watcher: StartWatcher
) -> None:
    changes = start_watcher(root)
    temporary = root / "model.pb.filepart"
    temporary.write_bytes(b"whole upload")
    os.link(temporary, root / "model.pb")
    temporary.unlink()
    assert collect_until_barrier(changes, root) == [Change("model.pb", "created")]


def test_upload_leftovers_report_nothing(root: Path, start_watcher: StartWatcher) -> None:
    changes = start_watcher(root)
    for name in ["model.pb.part", "model.pb.tmp", "model.pb.swp", ".model.pb.swp", "model.pb~"]:
        (root / name).write_bytes(b"partial")
    (root / ".model.pb").write_bytes(b"dotfile")
    (root / "notes.txt").write_bytes(b"not a model")
    (root / ".cache").mkdir()
    (root / ".cache" / "model.pb").write_bytes(b"in a hidden folder")
    (root / "model.pb.part").rename(root / "model.pb.tmp")
    (root / "model.pb.tmp").unlink()
    assert collect_until_barrier(changes, root) == []


def test_reading_an_input_reports_nothing(root: Path, start_watcher: StartWatcher) -> None:
    model = root / "model.pb"
    model.write_bytes(b"graph" * 1000)
    changes = start_watcher(root)
    for _ in range(3):
        assert model.read_bytes() == b"graph" * 1000
    model.stat()
    assert collect_until_barrier(changes, root) == []


def test_deleted_and_moved_out_inputs_are_reported(
    root: Path, outside: Path, start_watcher: StartWatcher
) -> None:
    (root / "gone.pb").write_bytes(b"1")
    (root / "away.pbtxt").write_bytes(b"2")
    (root / "old.pb").write_bytes(b"3")
    changes = start_watcher(root)
    (root / "gone.pb").unlink()
    (root / "away.pbtxt").rename(outside / "away.pbtxt")
    (root / "old.pb").rename(root / "old.pb.bak")
    got = collect_until_barrier(changes, root)
    assert sorted(got, key=lambda c: c.path) == [
        Change("away.pbtxt", "moved_out"),
        Change("gone.pb", "deleted"),
        Change("old.pb", "moved_out"),
    ]


def test_file_moved_in_from_outside_is_moved_in(
    root: Path, outside: Path, start_watcher: StartWatcher
) -> None:
    (outside / "model.pb").write_bytes(b"graph")
    changes = start_watcher(root)
    (outside / "model.pb").rename(root / "model.pb")
    assert collect_until_barrier(changes, root) == [Change("model.pb", "moved_in")]


def test_folder_moved_in_reports_the_inputs_inside(
    root: Path, outside: Path, start_watcher: StartWatcher
) -> None:
    pack = outside / "pack"
    (pack / "inner").mkdir(parents=True)
    (pack / "a.pb").write_bytes(b"1")
    (pack / "inner" / "b.pbtxt").write_bytes(b"2")
    (pack / "inner" / "b.toml").write_bytes(b"3")
    (pack / "inner" / ".b.pb.Xy12Zq").write_bytes(b"rsync leftover")
    (pack / "README.md").write_bytes(b"docs")
    changes = start_watcher(root)
    pack.rename(root / "pack")
    got = collect_until_barrier(changes, root)
    assert sorted(got, key=lambda c: c.path) == [
        Change("pack/a.pb", "created"),
        Change("pack/inner/b.pbtxt", "created"),
        Change("pack/inner/b.toml", "created"),
    ]


def test_folder_renamed_inside_the_tree_moves_its_inputs(
    root: Path, start_watcher: StartWatcher
) -> None:
    (root / "team").mkdir()
    (root / "team" / "m.pb").write_bytes(b"1")
    changes = start_watcher(root)
    (root / "team").rename(root / "team2")
    got = collect_until_barrier(changes, root)
    assert sorted(got, key=lambda c: c.path) == [
        Change("team/m.pb", "moved_out"),
        Change("team2/m.pb", "moved_in"),
    ]
    # The watch followed the folder to its new name.
    (root / "team2" / "n.pb").write_bytes(b"2")
    got = collect_until(changes, lambda got: Change("team2/n.pb", "closed") in got)
    assert got[0] == Change("team2/n.pb", "created")


def test_new_subfolder_is_watched(root: Path, start_watcher: StartWatcher) -> None:
    changes = start_watcher(root)
    (root / "new" / "deep").mkdir(parents=True)
    (root / "new" / "deep" / "z.pb").write_bytes(b"graph")
    # The file may be written before watchdog watches the new folder, then watchdog
    # reports what it finds there as created; either way the model is reported.
    got = collect_until(changes, bool)
    assert got[0] == Change("new/deep/z.pb", "created")


def test_config_file_replaced_by_rename_is_reported_by_absolute_path(
    root: Path, tmp_path: Path, start_watcher: StartWatcher
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "tfmerge.toml"
    config.write_bytes(b"version = 1\n")
    changes = start_watcher(root, also_watch=[config])
    # Neighbours of the config file are not reported, whatever their name.
    (etc / "other.toml").write_bytes(b"x = 1\n")
    replacement = etc / ".tfmerge.toml.swx"
    replacement.write_bytes(b"version = 2\n")
    replacement.rename(config)
    got = collect_until(changes, lambda got: Change(str(config), "moved_in") in got)
    assert got == [Change(str(config), "moved_in")]

    with config.open("ab") as editor:  # an editor that writes in place
        editor.write(b"# edited\n")
    got = collect_until(changes, lambda got: Change(str(config), "closed") in got)
    assert {change.path for change in got} == {str(config)}
    assert got[-1].kind == "closed"


def test_config_file_inside_the_tree_is_reported_both_ways(
    root: Path, start_watcher: StartWatcher
) -> None:
    config = root / "tfmerge.toml"
    config.write_bytes(b"version = 1\n")
    changes = start_watcher(root, also_watch=[config])
    (root / ".tfmerge.toml.new").write_bytes(b"version = 2\n")
    (root / ".tfmerge.toml.new").rename(config)
    expected = {Change(str(config), "moved_in"), Change("tfmerge.toml", "moved_in")}
    got = collect_until(changes, lambda got: expected <= set(got))
    assert sorted(got, key=lambda c: c.path) == sorted(expected, key=lambda c: c.path)


def test_missing_folder_fails_to_start_and_leaves_no_thread(tmp_path: Path) -> None:
    existing = tmp_path / "etc" / "tfmerge.toml"
    existing.parent.mkdir()
    watcher = FolderWatcher(tmp_path / "missing", lambda change: None, also_watch=[existing])
    with pytest.raises(FileNotFoundError, match=r"cannot watch .*missing"):
        watcher.start()
    watcher.stop()  # harmless after a failed start; the leak check runs after the test


def test_context_manager_stops_and_stop_is_idempotent(root: Path) -> None:
    changes: queue.Queue[Change] = queue.Queue()
    with FolderWatcher(root, changes.put) as watcher:
        (root / "model.pb").write_bytes(b"graph")
        collect_until(changes, lambda got: Change("model.pb", "closed") in got)
    watcher.stop()
    (root / "after.pb").write_bytes(b"graph")
    assert changes.empty()


# --- where inotify goes deaf: the watcher says so -----------------------------------------------


@pytest.fixture
def watched(root: Path) -> Iterator[tuple[FolderWatcher, queue.Queue[Change]]]:
    changes: queue.Queue[Change] = queue.Queue()
    with FolderWatcher(root, changes.put) as watcher:
        yield watcher, changes


def problem_within(watcher: FolderWatcher) -> str:
    """The watcher's problem, once the events that tell it have arrived."""
    deadline = time.monotonic() + WAIT_SECONDS
    while (problem := watcher.problem()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"no problem reported within {WAIT_SECONDS} s")
        time.sleep(0.02)
    return problem


def test_a_healthy_watcher_reports_no_problem(
    root: Path, watched: tuple[FolderWatcher, queue.Queue[Change]]
) -> None:
    watcher, changes = watched
    (root / "team").mkdir()
    (root / "team" / "m.pb").write_bytes(b"1")
    (root / "team").rename(root / "team2")  # a rename inside the tree is followed
    (root / "gone.pb").write_bytes(b"2")
    (root / "gone.pb").unlink()
    collect_until_barrier(changes, root)
    assert watcher.problem() is None


def test_frozen_dir_removed_and_made_again_is_a_problem_and_a_new_watcher_hears(
    root: Path, watched: tuple[FolderWatcher, queue.Queue[Change]]
) -> None:
    watcher, _ = watched
    (root / "old.pb").write_bytes(b"1")
    shutil.rmtree(root)  # rm -rf frozen && mkdir frozen
    root.mkdir()
    # Which one the watcher tells first depends on whether its thread has read the removal
    # before the folder is looked at again: each says the watch is lost.
    assert problem_within(watcher) in {
        "frozen_dir was removed",
        "the watcher's thread ended",
        "frozen_dir was replaced by another folder",
    }
    changes: queue.Queue[Change] = queue.Queue()
    with FolderWatcher(root, changes.put) as again:
        (root / "new.pb").write_bytes(b"2")
        collect_until(changes, lambda got: Change("new.pb", "closed") in got)
        assert again.problem() is None


def test_frozen_dir_renamed_away_and_made_again_is_a_problem(
    root: Path, watched: tuple[FolderWatcher, queue.Queue[Change]]
) -> None:
    watcher, _ = watched
    root.rename(root.with_name("frozen.old"))  # inotify follows the old folder
    root.mkdir()
    assert watcher.problem() == "frozen_dir was replaced by another folder"


def test_a_folder_moved_into_the_tree_is_a_problem(
    root: Path, outside: Path, watched: tuple[FolderWatcher, queue.Queue[Change]]
) -> None:
    watcher, _ = watched
    (outside / "pack").mkdir()
    (outside / "pack").rename(root / "pack")  # gets no watch of its own from watchdog
    assert problem_within(watcher) == "a folder was moved into or out of frozen_dir"


def test_watchdog_still_parses_events_where_the_overflow_counter_hooks_in(
    watched: tuple[FolderWatcher, queue.Queue[Change]],
) -> None:
    """watchdog drops IN_Q_OVERFLOW; tfmerge.daemon.overflow counts it in watchdog's parser.
    A watchdog that parses elsewhere, or stops dropping the record, must fail here."""
    watcher, _ = watched
    assert watcher.problem() is None
    read_events = inspect.getsource(inotify_c.Inotify.read_events)
    assert "Inotify._parse_event_buffer(event_buffer)" in read_events
    assert "if wd == -1:" in read_events
    record = struct.pack("iIII", -1, inotify_c.InotifyConstants.IN_Q_OVERFLOW, 0, 0)
    other = struct.pack("iIII", 1, inotify_c.InotifyConstants.IN_MODIFY, 0, 8) + b"a.pb\0\0\0\0"
    before = overflow.count()
    parsed = list(inotify_c.Inotify._parse_event_buffer(record + other))
    assert parsed == [(-1, 0x4000, 0, b""), (1, 0x2, 0, b"a.pb")]
    assert overflow.count() == before + 1
    assert watcher.problem() == "the kernel's inotify event queue overflowed"


_OVERFLOW_WATCHER = """
import sys, time
from pathlib import Path
from tfmerge.daemon.watch import FolderWatcher
with FolderWatcher(Path(sys.argv[1]), lambda change: None) as watcher:
    print("watching", flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + 60
    while watcher.problem() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    print(watcher.problem(), flush=True)
"""


@pytest.mark.skipif(
    int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) > 100_000,
    reason="fs.inotify.max_queued_events is raised too far to overflow cheaply",
)
def test_a_real_inotify_queue_overflow_is_a_problem(root: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    watcher = subprocess.Popen(
        [sys.executable, "-c", _OVERFLOW_WATCHER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "daemon")},
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdin is not None
        assert watcher.stdout.readline().strip() == "watching"
        watcher.send_signal(signal.SIGSTOP)  # its reading thread stops: the queue fills
        try:
            # Three events a file (created, modified, closed): past the kernel's queue.
            for number in range(limit // 3 + 500):
                (root / f"f{number:05d}.pb").write_bytes(b"x")
        finally:
            watcher.send_signal(signal.SIGCONT)
        watcher.stdin.write("go\n")
        watcher.stdin.flush()
        assert watcher.stdout.readline().strip() == "the kernel's inotify event queue overflowed"
        assert watcher.wait(timeout=60) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
        watcher.wait()
        for stream in (watcher.stdin, watcher.stdout):
            if stream is not None:
                stream.close()
