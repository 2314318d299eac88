"""The settle/debounce rules, driven by scripted uploads on a fake clock and a fake stat."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfmerge.daemon.debounce import Change, ChangeKind, Debouncer, Flush, Held, StatKey
from tfmerge.inputs import is_input_path

QUIET = 2.0
MAX_WAIT = 30.0
KINDS: list[ChangeKind] = ["created", "modified", "closed", "moved_in", "moved_out", "deleted"]


class FakeFiles:
    """A folder as ``stat`` sees it: every write bumps size and mtime, a link or rename
    brings a new inode."""

    def __init__(self) -> None:
        self._files: dict[str, StatKey] = {}
        self._ticks = itertools.count(1)

    def stat(self, path: str) -> StatKey | None:
        return self._files.get(path)

    def write(self, path: str, nbytes: int = 1) -> None:
        old = self._files.get(path)
        if old is None:
            self._files[path] = StatKey(
                size=nbytes, mtime_ns=next(self._ticks), ino=next(self._ticks)
            )
        else:
            self._files[path] = StatKey(old.size + nbytes, next(self._ticks), old.ino)

    def create_empty(self, path: str) -> None:
        if path not in self._files:
            self._files[path] = StatKey(size=0, mtime_ns=next(self._ticks), ino=next(self._ticks))

    def appear(self, path: str, size: int = 100) -> None:
        """A whole file arrives under ``path`` at once (rename or hard link)."""
        self._files[path] = StatKey(size=size, mtime_ns=next(self._ticks), ino=next(self._ticks))

    def remove(self, path: str) -> None:
        self._files.pop(path, None)

    def chmod(self, path: str) -> None:
        """An attribute change: nothing stat's key holds changes."""


class FakeKernel:
    """Who has which file open for writing, as a read lease would tell; ``blind`` files are
    ones the kernel cannot tell about (no lease there)."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.blind: set[str] = set()
        self.asked: list[str] = []

    def writing(self, path: str) -> bool | None:
        self.asked.append(path)
        return None if path in self.blind else path in self.open


@dataclass
class Harness:
    """Plays the daemon's loop: poll at every next_deadline() before the clock passes it."""

    quiet: float = QUIET
    max_wait: float = MAX_WAIT
    files: FakeFiles = field(default_factory=FakeFiles)
    now: float = 0.0
    flushes: list[tuple[float, Flush]] = field(default_factory=list)
    #: With a kernel, the debouncer asks it whether a file is open for writing.
    kernel: FakeKernel | None = None
    #: The files open for writing at each flush.
    open_at_flush: list[frozenset[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        writing = None if self.kernel is None else self.kernel.writing
        self.debouncer = Debouncer(self.quiet, self.max_wait, writing=writing)

    def run_until(self, until: float) -> None:
        for _ in range(10_000):
            deadline = self.debouncer.next_deadline()
            if deadline is None or deadline > until or deadline == math.inf:
                self.now = max(self.now, until)
                return
            self.poll_at(max(self.now, deadline))
        pytest.fail("next_deadline() did not move forward after a poll")

    def run_out(self) -> None:
        """Poll at each deadline until nothing is pending."""
        self.run_until(float("inf"))

    def poll_at(self, when: float) -> Flush | None:
        self.now = when
        flush = self.debouncer.poll(when, self.files.stat)
        if flush is not None:
            self.flushes.append((when, flush))
            self.open_at_flush.append(frozenset(self.kernel.open if self.kernel else ()))
        return flush

    def event(self, at: float, path: str, kind: ChangeKind) -> None:
        """The file system changes as ``kind`` says, then the event reaches the debouncer."""
        self.run_until(at)
        if kind == "created":
            self.files.create_empty(path)
        elif kind == "modified":
            self.files.write(path)
        elif kind == "moved_in":
            self.files.appear(path)
        elif kind in {"deleted", "moved_out"}:
            self.files.remove(path)
        self.debouncer.add(Change(path, kind), at)

    def scp(self, start: float, path: str, chunks: int, gap: float) -> float:
        """Chunked write in place then close; returns the time of the close."""
        self.open_for_writing(start, path)
        at = start
        for _ in range(chunks):
            at += gap
            self.event(at, path, "modified")
        at += gap
        self.close(at, path)
        return at

    def open_for_writing(self, at: float, path: str) -> None:
        """A writer opens (creates) the file; inotify reports the creation only."""
        self.run_until(at)
        if self.kernel is not None:
            self.kernel.open.add(path)
        self.event(at, path, "created")

    def close(self, at: float, path: str) -> None:
        """The writer closes the file (or dies, and the kernel closes it)."""
        self.run_until(at)
        if self.kernel is not None:
            self.kernel.open.discard(path)
        self.event(at, path, "closed")

    def chmod(self, at: float, path: str) -> None:
        """An attribute change on the path (chmod, the times scp -O -p sets after the close):
        watchdog reports it as a modification."""
        self.run_until(at)
        self.files.chmod(path)
        self.debouncer.add(Change(path, "modified"), at)


# --- which paths are inputs -------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["model.pb", "model.pbtxt", "model.toml", "team/a/model.pb", "v1.2.pb", "a b (c).pb"],
)
def test_inputs_are_models_and_sidecars(path: str) -> None:
    assert is_input_path(path)


@pytest.mark.parametrize(
    "path",
    [
        ".model.pb",  # dotfile
        ".model.pb.Xy12Zq",  # rsync temporary
        "team/.model.pb.Xy12Zq",
        ".hidden/model.pb",  # hidden folder
        "a/.cache/model.pb",
        "model.pb.part",
        "model.pb.filepart",
        "model.pb.tmp",
        ".model.pb.swp",  # vim swap file
        "model.pb.swp",
        "model.pb~",
        "model.toml~",
        "README.md",
        "model.PB",  # globs are case-sensitive here
        "model",
        "pb",
        ".pb",
        "",
        "/etc/tfmerge/tfmerge.toml",  # not relative to the root
        "a//model.pb",
        "sub/",
        "../model.pb",
        "./model.pb",
    ],
)
def test_leftovers_and_other_files_are_not_inputs(path: str) -> None:
    assert not is_input_path(path)


def test_leftover_events_never_start_a_batch() -> None:
    h = Harness()
    for path, kind in itertools.product(
        [".m.pb.a1B2c3", "m.pb.part", "m.pb.filepart", "m.pb.tmp", ".m.pb.swp", "m.pb~", "x.txt"],
        KINDS,
    ):
        h.files.write(path)
        h.debouncer.add(Change(path, kind), 1.0)
    assert not h.debouncer.pending
    assert h.debouncer.next_deadline() is None
    assert h.debouncer.poll(100.0, h.files.stat) is None


def test_rejects_impossible_timings() -> None:
    with pytest.raises(ValueError, match="quiet_seconds"):
        Debouncer(quiet_seconds=5.0, max_wait_seconds=1.0)
    with pytest.raises(ValueError, match="quiet_seconds"):
        Debouncer(quiet_seconds=-1.0, max_wait_seconds=1.0)
    with pytest.raises(ValueError, match="max_wait_seconds"):
        Debouncer(quiet_seconds=1.0, max_wait_seconds=float("inf"))


# --- how uploads land -------------------------------------------------------------------


def test_scp_flushes_once_quiet_after_the_close() -> None:
    h = Harness()
    closed_at = h.scp(0.0, "m.pb", chunks=20, gap=0.25)
    h.run_out()
    assert h.flushes == [
        (closed_at + QUIET, Flush(frozenset({"m.pb"}), "settled", 0.0, closed_at)),
    ]


def test_scp_pausing_between_chunks_longer_than_quiet_is_still_writing() -> None:
    h = Harness()
    h.event(0.0, "m.pb", "created")
    h.event(0.1, "m.pb", "modified")
    h.event(5.0, "m.pb", "modified")  # 4.9 s without an event: longer than QUIET
    h.event(9.0, "m.pb", "modified")
    assert h.flushes == []
    h.event(12.0, "m.pb", "closed")
    h.run_out()
    assert h.flushes == [(14.0, Flush(frozenset({"m.pb"}), "settled", 0.0, 12.0))]


def test_rsync_temporary_is_filtered_and_the_rename_settles() -> None:
    h = Harness()
    tmp = ".m.pb.Gx81kQ"
    h.scp(0.0, tmp, chunks=10, gap=0.5)
    assert not h.debouncer.pending
    h.files.remove(tmp)
    h.event(6.0, "m.pb", "moved_in")
    h.run_out()
    assert h.flushes == [(8.0, Flush(frozenset({"m.pb"}), "settled", 6.0, 6.0))]


def test_sftp_hard_link_is_a_complete_file() -> None:
    h = Harness()
    tmp = "m.pb.filepart"
    h.scp(0.0, tmp, chunks=10, gap=0.5)
    h.files.appear("m.pb")
    h.debouncer.add(Change("m.pb", "created"), 6.0)  # the link: no modify, no close after it
    h.event(6.1, tmp, "deleted")
    h.run_out()
    assert h.flushes == [(8.0, Flush(frozenset({"m.pb"}), "settled", 6.0, 6.0))]


def test_stalled_upload_waits_for_max_wait_then_the_close_starts_a_new_batch() -> None:
    h = Harness()
    h.event(0.0, "m.pb", "created")
    h.event(0.5, "m.pb", "modified")
    h.event(1.0, "m.pb", "modified")  # the connection hangs here: no close
    h.run_until(MAX_WAIT - 0.001)
    assert h.flushes == []
    assert h.debouncer.next_deadline() == MAX_WAIT
    h.run_until(MAX_WAIT)
    assert h.flushes == [
        (
            MAX_WAIT,
            Flush(frozenset({"m.pb"}), "max_wait", 0.0, 1.0, still_writing=frozenset({"m.pb"})),
        )
    ]
    assert not h.debouncer.pending
    h.event(100.0, "m.pb", "closed")  # the writer finally dies; the kernel closes its file
    h.run_out()
    assert h.flushes[1:] == [(102.0, Flush(frozenset({"m.pb"}), "settled", 100.0, 100.0))]


def test_upload_cut_short_with_a_close_settles_like_any_other() -> None:
    # The debouncer cannot tell a short file from a small one; the build refuses it.
    h = Harness()
    closed_at = h.scp(0.0, "m.pb", chunks=2, gap=0.1)
    h.run_out()
    assert [(t, f.reason) for t, f in h.flushes] == [(closed_at + QUIET, "settled")]


def test_folder_that_never_stops_changing_is_flushed_every_max_wait() -> None:
    h = Harness()
    for second in range(100):
        h.event(float(second), "busy.pb", "moved_in")  # a new version every second
    h.run_out()
    assert [(t, f.reason, f.first_change) for t, f in h.flushes] == [
        (30.0, "max_wait", 0.0),
        (60.0, "max_wait", 30.0),  # the change at 30.0 came after the flush at 30.0
        (90.0, "max_wait", 60.0),
        (101.0, "settled", 90.0),
    ]
    assert all(f.still_writing == frozenset() for _, f in h.flushes)


def test_event_at_the_max_wait_instant_goes_to_the_next_batch() -> None:
    h = Harness()
    h.event(0.0, "a.pb", "created")
    h.event(0.0, "a.pb", "modified")
    h.event(MAX_WAIT, "b.pb", "moved_in")
    h.run_out()
    assert [(t, f.paths) for t, f in h.flushes] == [
        (MAX_WAIT, frozenset({"a.pb"})),
        (MAX_WAIT + QUIET, frozenset({"b.pb"})),
    ]


# --- what stat sees ---------------------------------------------------------------------


def test_write_without_event_restarts_the_quiet_period() -> None:
    h = Harness()
    h.event(0.0, "m.pb", "moved_in")
    assert h.debouncer.next_deadline() == 0.0  # a baseline stat is wanted right away
    h.run_until(1.0)
    assert h.debouncer.next_deadline() == QUIET
    h.files.write("m.pb")  # e.g. a writer on another host of a network file system
    h.run_out()
    # Seen at 2.0, so the file is quiet from 2.0 on.
    assert h.flushes == [(4.0, Flush(frozenset({"m.pb"}), "settled", 0.0, 2.0))]


def test_replacement_with_same_size_and_mtime_is_seen_by_inode() -> None:
    h = Harness()
    h.event(0.0, "m.pb", "moved_in")
    h.run_until(1.0)
    old = h.files.stat("m.pb")
    assert old is not None
    h.files._files["m.pb"] = StatKey(old.size, old.mtime_ns, old.ino + 1)
    h.run_out()
    assert [(t, f.last_change) for t, f in h.flushes] == [(4.0, 2.0)]


def test_first_stat_after_an_event_is_the_baseline_not_a_change() -> None:
    h = Harness()
    h.event(0.0, "m.pb", "moved_in")
    # The daemon was busy and polls late: the event was the change, not this first look.
    assert h.poll_at(QUIET) == Flush(frozenset({"m.pb"}), "settled", 0.0, 0.0)


def test_deleted_file_settles() -> None:
    h = Harness()
    h.files.appear("old.pb")
    h.event(0.0, "old.pb", "deleted")
    h.run_out()
    assert h.flushes == [(QUIET, Flush(frozenset({"old.pb"}), "settled", 0.0, 0.0))]


def test_file_deleted_while_being_written_settles() -> None:
    h = Harness()
    h.event(0.0, "m.pb", "created")
    h.event(0.5, "m.pb", "modified")
    h.event(1.0, "m.pb", "deleted")
    h.run_out()
    assert h.flushes == [(3.0, Flush(frozenset({"m.pb"}), "settled", 0.0, 1.0))]


def test_writing_file_that_stat_finds_gone_counts_as_settled() -> None:
    h = Harness()
    h.event(0.0, "m.pb", "created")
    h.event(0.5, "m.pb", "modified")
    assert h.poll_at(1.0) is None
    assert h.debouncer.next_deadline() == QUIET  # writing: only the report of the hold is due
    h.files.remove("m.pb")  # its deleted event has not arrived yet
    assert h.poll_at(1.5) is None  # gone is a change: quiet restarts from here
    assert h.debouncer.next_deadline() == 3.5
    assert h.poll_at(3.5) == Flush(frozenset({"m.pb"}), "settled", 0.0, 1.5)


def test_moved_out_file_settles_like_a_deleted_one() -> None:
    h = Harness()
    h.files.appear("m.pb")
    h.event(0.0, "m.pb", "moved_out")
    h.run_out()
    assert [(t, f.paths, f.reason) for t, f in h.flushes] == [
        (QUIET, frozenset({"m.pb"}), "settled")
    ]


# --- batches ----------------------------------------------------------------------------


def test_several_uploads_make_one_flush() -> None:
    h = Harness()
    h.scp(0.0, "a.pb", chunks=8, gap=0.5)  # closes at 4.5
    h.event(1.0, ".b.pb.k2Jd9a", "created")
    h.files.appear("b.pb")
    h.event(3.0, "b.pb", "moved_in")
    h.event(3.5, "team/c.pbtxt", "moved_in")
    h.event(4.0, "team/c.toml", "moved_in")
    h.event(4.2, "gone.pb", "deleted")
    h.run_out()
    assert h.flushes == [
        (
            6.5,
            Flush(
                frozenset({"a.pb", "b.pb", "team/c.pbtxt", "team/c.toml", "gone.pb"}),
                "settled",
                0.0,
                4.5,
            ),
        )
    ]


def test_one_writing_file_holds_back_the_whole_batch() -> None:
    h = Harness()
    h.event(0.0, "done.pb", "moved_in")
    h.event(0.5, "slow.pb", "created")
    h.event(1.0, "slow.pb", "modified")
    h.run_until(10.0)
    assert h.poll_at(10.0) is None  # done.pb is settled, slow.pb is not
    h.run_until(20.0)
    assert h.flushes == []
    h.event(20.0, "slow.pb", "closed")
    h.run_out()
    assert [(t, f.paths) for t, f in h.flushes] == [(22.0, frozenset({"done.pb", "slow.pb"}))]


def test_changes_during_a_build_cause_exactly_one_follow_up() -> None:
    h = Harness()
    h.event(0.0, "a.pb", "moved_in")
    h.run_until(QUIET)
    assert [t for t, _ in h.flushes] == [QUIET]
    # A build runs from 2.0 to 40.0; the daemon does not poll while it runs.
    for at, path in [(3.0, "a.pb"), (5.0, "b.pb"), (9.0, "a.pb"), (39.0, "c.pb")]:
        h.files.appear(path)
        h.debouncer.add(Change(path, "moved_in"), at)
    h.now = 40.0
    h.run_out()
    assert [(t, f.reason, f.paths) for t, f in h.flushes[1:]] == [
        (40.0, "max_wait", frozenset({"a.pb", "b.pb", "c.pb"}))  # 3.0 + MAX_WAIT < 40.0
    ]
    assert h.debouncer.next_deadline() is None


def test_next_deadline_follows_the_batch() -> None:
    h = Harness()
    assert h.debouncer.next_deadline() is None
    h.event(10.0, "a.pb", "created")
    assert h.debouncer.next_deadline() == 10.0  # baseline stat wanted now
    h.event(10.5, "a.pb", "modified")
    # Writing: only max_wait can flush; a quiet period in, the hold is reported.
    assert h.debouncer.next_deadline() == 10.0 + QUIET
    assert h.poll_at(11.5) is None
    assert h.debouncer.take_held() == []
    assert h.poll_at(10.0 + QUIET) is None
    assert h.debouncer.take_held() == [Held("a.pb", 1, 10.0, None)]
    assert h.debouncer.next_deadline() == 10.0 + MAX_WAIT
    h.event(13.0, "a.pb", "closed")
    assert h.debouncer.next_deadline() == 13.0
    h.run_until(13.0)
    assert h.debouncer.next_deadline() == 13.0 + QUIET
    assert h.poll_at(14.9) is None
    assert h.debouncer.next_deadline() == 13.0 + QUIET
    h.run_out()
    assert h.debouncer.next_deadline() is None
    assert not h.debouncer.pending
    assert h.debouncer.take_held() == []  # once per file and batch


# --- what the kernel says: is the file open for writing? ------------------------------


def test_an_attribute_change_after_the_close_delays_by_one_quiet_period_with_the_kernel() -> None:
    h = Harness(kernel=FakeKernel())
    closed_at = h.scp(0.0, "m.pb", chunks=4, gap=0.25)
    h.chmod(closed_at + 0.01, "m.pb")  # scp -O -p sets the times after its close
    h.run_out()
    assert h.flushes == [
        (closed_at + 0.01 + QUIET, Flush(frozenset({"m.pb"}), "settled", 0.0, closed_at + 0.01))
    ]


def test_without_the_kernel_an_attribute_change_after_the_close_holds_until_max_wait() -> None:
    h = Harness()
    closed_at = h.scp(0.0, "m.pb", chunks=4, gap=0.25)
    h.chmod(closed_at + 0.01, "m.pb")
    h.run_out()
    assert [(t, f.reason, f.still_writing) for t, f in h.flushes] == [
        (MAX_WAIT, "max_wait", frozenset({"m.pb"}))
    ]


def test_a_kernel_that_cannot_tell_leaves_it_to_the_events() -> None:
    kernel = FakeKernel()
    kernel.blind.add("m.pb")  # NFS, or another user's file without CAP_LEASE
    h = Harness(kernel=kernel)
    closed_at = h.scp(0.0, "m.pb", chunks=4, gap=0.25)
    h.chmod(closed_at + 0.01, "m.pb")
    h.run_out()
    assert [(t, f.reason, f.still_writing) for t, f in h.flushes] == [
        (MAX_WAIT, "max_wait", frozenset({"m.pb"}))
    ]


def test_a_writer_that_has_not_written_yet_holds_its_batch() -> None:
    """A created file whose writer stalls before its first write: no modify, no close."""
    h = Harness(kernel=FakeKernel())
    h.open_for_writing(0.0, "m.pb")
    h.run_until(20.0)
    assert h.flushes == []
    h.close(25.0, "m.pb")
    h.run_out()
    assert h.flushes == [(27.0, Flush(frozenset({"m.pb"}), "settled", 0.0, 25.0))]


def test_past_max_wait_the_rest_flushes_and_a_file_open_for_writing_stays_pending() -> None:
    h = Harness(kernel=FakeKernel())
    h.open_for_writing(0.0, "slow.pb")
    h.event(1.0, "slow.pb", "modified")
    h.event(2.0, "other.pb", "moved_in")  # slow.pb alone held the batch: other.pb's wait
    h.run_until(2.0 + MAX_WAIT)
    assert h.flushes == [
        (
            2.0 + MAX_WAIT,
            Flush(
                frozenset({"slow.pb", "other.pb"}),
                "max_wait",
                0.0,
                2.0,
                still_writing=frozenset({"slow.pb"}),
                kept=frozenset({"slow.pb"}),
            ),
        )
    ]
    assert h.debouncer.pending
    # Only a file open for writing is left: no build, no poll until an event.
    assert h.debouncer.next_deadline() == math.inf
    h.run_until(3 * MAX_WAIT)
    assert len(h.flushes) == 1
    h.close(100.0, "slow.pb")
    h.run_out()
    assert [(t, f.reason, f.paths, f.first_change) for t, f in h.flushes[1:]] == [
        (102.0, "settled", frozenset({"slow.pb"}), 0.0)  # its batch began with its upload
    ]


def test_the_kernel_is_asked_only_when_its_answer_matters() -> None:
    kernel = FakeKernel()
    h = Harness(kernel=kernel)
    closed_at = h.scp(0.0, "m.pb", chunks=1000, gap=0.001)
    assert kernel.asked == []  # a stream of writes: the batch cannot settle, nothing to ask
    h.run_out()
    assert kernel.asked == ["m.pb"]  # once, when it could settle
    assert h.flushes == [(closed_at + QUIET, Flush(frozenset({"m.pb"}), "settled", 0.0, closed_at))]


def test_a_held_file_is_reported_once_with_its_size_so_far() -> None:
    kernel = FakeKernel()
    h = Harness(kernel=kernel)
    h.open_for_writing(0.0, "slow.pb")
    h.event(0.5, "done.pb", "moved_in")
    for second in range(1, 8):
        h.event(float(second), "slow.pb", "modified")  # one byte a second
    # Seen a quiet period after its creation, before the write of that second.
    assert h.debouncer.take_held() == [Held("slow.pb", 1, 0.0, open_for_writing=True)]
    h.close(9.0, "slow.pb")
    h.run_out()
    assert h.debouncer.take_held() == []
    assert [f.paths for _, f in h.flushes] == [frozenset({"slow.pb", "done.pb"})]


def test_a_requeued_file_settles_again() -> None:
    """The build found it not at rest: a writer came after the batch settled."""
    kernel = FakeKernel()
    h = Harness(kernel=kernel)
    h.event(0.0, "m.pb", "moved_in")
    h.run_until(QUIET)
    assert len(h.flushes) == 1
    kernel.open.add("m.pb")  # opened for writing, not written yet: no event
    h.debouncer.requeue(["m.pb"], 10.0)
    h.run_until(60.0)
    assert len(h.flushes) == 1
    h.close(61.0, "m.pb")
    h.run_out()
    assert [(t, f.paths) for t, f in h.flushes[1:]] == [(63.0, frozenset({"m.pb"}))]


# --- properties -------------------------------------------------------------------------

# (path, is it an input) - the answer is written out rather than computed, so the
# properties do not lean on the function under test.
PATHS = [
    ("a.pb", True),
    ("b.pbtxt", True),
    ("a.toml", True),
    ("sub/c.pb", True),
    (".a.pb.Xq3z9w", False),
    ("a.pb.part", False),
    ("notes.txt", False),
]


@dataclass(frozen=True)
class Event:
    dt: float
    path: str
    relevant: bool
    kind: ChangeKind


@dataclass(frozen=True)
class SilentWrite:
    """The file changes and no event says so."""

    dt: float
    path: str


@dataclass(frozen=True)
class EarlyPoll:
    """Poll somewhere between now and next_deadline()."""

    fraction: float


Step = Event | SilentWrite | EarlyPoll

times = st.one_of(
    st.sampled_from([0.0, 0.3, 1.0, 2.0, 7.5, 30.0]),
    st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
)
paths = st.sampled_from(PATHS)
steps: st.SearchStrategy[Step] = st.one_of(
    st.builds(
        lambda dt, p, kind: Event(dt, p[0], p[1], kind), times, paths, st.sampled_from(KINDS)
    ),
    st.builds(lambda dt, p: SilentWrite(dt, p[0]), times, paths),
    st.builds(EarlyPoll, st.floats(min_value=0.0, max_value=0.999)),
)


@dataclass
class Batch:
    """What the test itself expects the debouncer to hold."""

    first: float = 0.0
    last: float = 0.0
    paths: set[str] = field(default_factory=set)
    writing: set[str] = field(default_factory=set)
    #: Indexes (in the script) of the events in this batch.
    events: list[int] = field(default_factory=list)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(
    quiet=st.sampled_from([0.0, 0.3, 2.0, 7.5]),
    extra_wait=st.sampled_from([0.0, 1.0, 10.0, 30.0]),
    script=st.lists(steps, max_size=60),
)
def test_properties_of_any_event_sequence(
    quiet: float, extra_wait: float, script: list[Step]
) -> None:
    max_wait = quiet + extra_wait
    h = Harness(quiet=quiet, max_wait=max_wait)
    batch = Batch()
    flushed_batches: list[Batch] = []

    def check_pending() -> None:
        # (d) a deadline exactly when something is pending
        assert h.debouncer.pending == bool(batch.paths)
        assert (h.debouncer.next_deadline() is None) == (not batch.paths)

    def check_new_flushes(seen: int) -> int:
        nonlocal batch
        for at, flush in h.flushes[seen:]:
            assert batch.paths, "flushed with no change pending"
            assert flush.paths == frozenset(batch.paths)
            assert flush.first_change == batch.first
            assert flush.last_change >= batch.last  # later when stat saw a silent write
            # (a) never before quiet after the last change, unless max_wait elapsed
            assert at >= batch.last + quiet or (
                flush.reason == "max_wait" and at >= batch.first + max_wait
            )
            if flush.reason == "settled":
                assert at >= flush.last_change + quiet
                assert not batch.writing
                assert not flush.still_writing
            else:
                assert flush.still_writing == frozenset(batch.writing)
            # (b) polled at next_deadline(), never later than max_wait after the first change
            assert at <= batch.first + max_wait
            flushed_batches.append(batch)
            batch = Batch()
        return len(h.flushes)

    seen = 0
    for index, step in enumerate(script):
        match step:
            case Event(dt, path, relevant, kind):
                at = h.now + dt
                h.run_until(at)
                seen = check_new_flushes(seen)
                h.event(at, path, kind)
                if relevant:
                    if not batch.paths:
                        batch.first = at
                    batch.last = at
                    batch.paths.add(path)
                    batch.events.append(index)
                    if kind == "modified":
                        batch.writing.add(path)
                    else:
                        batch.writing.discard(path)
            case SilentWrite(dt, path):
                h.run_until(h.now + dt)
                seen = check_new_flushes(seen)
                h.files.write(path)
            case EarlyPoll(fraction):
                deadline = h.debouncer.next_deadline()
                if deadline is not None and deadline > h.now:
                    # next_deadline() is exact: a poll before it never flushes
                    assert h.poll_at(h.now + fraction * (deadline - h.now)) is None
        check_pending()

    h.run_out()
    check_new_flushes(seen)
    check_pending()
    # (c) every relevant change is in exactly one flush (the one that closed its batch),
    # and nothing else is in any flush
    relevant_events = [i for i, s in enumerate(script) if isinstance(s, Event) and s.relevant]
    assert sorted(i for b in flushed_batches for i in b.events) == relevant_events
    inputs = {path for path, relevant in PATHS if relevant}
    assert all(flush.paths <= inputs for _, flush in h.flushes)


@dataclass(frozen=True)
class Writer:
    """A writer opens the file (``created``) or closes it (``closed``)."""

    dt: float
    path: str
    opens: bool


@dataclass(frozen=True)
class Chmod:
    dt: float
    path: str


KernelStep = Event | SilentWrite | EarlyPoll | Writer | Chmod
input_paths = st.sampled_from([p for p, relevant in PATHS if relevant])
kernel_steps: st.SearchStrategy[KernelStep] = st.one_of(
    steps,
    st.builds(Writer, times, input_paths, st.booleans()),
    st.builds(Chmod, times, input_paths),
)


def play(h: Harness, kernel: FakeKernel, step: KernelStep) -> str | None:
    """Play one step; the path of the event it sent, if it sent one."""
    match step:
        case Event(dt, path, _, kind):
            h.event(h.now + dt, path, kind)
            if kind in ("deleted", "moved_out", "moved_in"):
                kernel.open.discard(path)  # the writer's file is no longer at this path
            return path
        case Writer(dt, path, opens=True):
            h.open_for_writing(h.now + dt, path)
            return path
        case Writer(dt, path, opens=False):
            if path not in kernel.open:
                return None  # a close with no writer would be no event at all
            h.close(h.now + dt, path)
            return path
        case Chmod(dt, path):
            h.chmod(h.now + dt, path)
            return path
        case SilentWrite(dt, path):
            h.run_until(h.now + dt)
            h.files.write(path)
        case EarlyPoll(fraction):
            deadline = h.debouncer.next_deadline()
            if deadline == math.inf:  # only files open for writing: nothing until an event
                assert h.poll_at(h.now + fraction * 100.0) is None
            elif deadline is not None and deadline > h.now:
                assert h.poll_at(h.now + fraction * (deadline - h.now)) is None
    return None


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    quiet=st.sampled_from([0.0, 0.3, 2.0, 7.5]),
    extra_wait=st.sampled_from([0.0, 1.0, 10.0, 30.0]),
    script=st.lists(kernel_steps, max_size=60),
)
def test_properties_with_the_kernel_telling_writers(
    quiet: float, extra_wait: float, script: list[KernelStep]
) -> None:
    max_wait = quiet + extra_wait
    kernel = FakeKernel()
    h = Harness(quiet=quiet, max_wait=max_wait, kernel=kernel)
    last_event: dict[str, float] = {}
    seen = 0

    def check_new_flushes() -> None:
        nonlocal seen
        for (at, flush), open_then in zip(h.flushes[seen:], h.open_at_flush[seen:], strict=True):
            open_now = open_then & flush.paths
            if flush.reason == "settled":
                # Never built while a writer has it open, whatever the events said.
                assert not open_now
                assert at >= flush.last_change + quiet
            else:
                assert at >= flush.first_change + max_wait
                assert flush.kept == open_now
                assert flush.kept <= flush.still_writing
                assert flush.paths - flush.kept, "a max_wait flush of files open for writing only"
        seen = len(h.flushes)

    for step in script:
        path = play(h, kernel, step)
        if path is not None and is_input_path(path):
            last_event[path] = h.now
        check_new_flushes()
        assert h.debouncer.pending == (h.debouncer.next_deadline() is not None)

    for path in sorted(kernel.open):
        h.close(h.now + 1.0, path)
    h.run_out()
    check_new_flushes()
    assert not h.debouncer.pending
    # Every change is built: a flush at or after the last change of each path holds it.
    for path, at in last_event.items():
        assert any(path in f.paths and t >= at for t, f in h.flushes), path
