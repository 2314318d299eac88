"""The daemon's loop in-process: a scripted watcher, scripted workers and a fake clock.

Nothing here sleeps, starts a process or imports TensorFlow. Time passes only when the daemon
waits: its wait jumps to the next scripted moment (an upload, a signal, a stop request) or to
the end of the wait, whichever comes first, and a build takes the time its script says. The
rest is real: files on tmp paths, the publish transaction, the state store, the retry policy,
the warm-worker runner, signal handlers, and the sd_notify protocol on a socket drained by a
reader thread.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import json
import math
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs
from structlog.typing import EventDict, WrappedLogger

from tfmerge import exitcodes, limits, progress, specs
from tfmerge.config import Config
from tfmerge.config import load as load_config
from tfmerge.daemon.debounce import Change
from tfmerge.daemon.notify import Notifier
from tfmerge.daemon.runner import Supervision, WorkerRunner
from tfmerge.daemon.service import Daemon, WritingProbe
from tfmerge.daemon.watch import OnChange
from tfmerge.daemon.worker import BuildAborted, BuildRequest, ModelFailed, WorkerError
from tfmerge.daemon.writers import LeaseProbe
from tfmerge.folders.publish import MANIFEST, STAGING_PREFIX, versions
from tfmerge.folders.state import Store
from tfmerge.models import AcceptedModel, BuildResult

pytestmark = pytest.mark.timeout(60)

START = 1000.0


class Timeline:
    """The daemon's clock and its wait for a wake-up, on scripted time."""

    def __init__(self) -> None:
        self.now = START
        #: Every timeout the daemon waited with (None: until woken).
        self.waits: list[float | None] = []
        self._moments: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    @property
    def elapsed(self) -> float:
        return self.now - START

    def at(self, seconds: float, action: Callable[[], None]) -> None:
        """Run ``action`` at ``seconds`` after the start."""
        heapq.heappush(self._moments, (START + seconds, next(self._order), action))

    def wait(self, timeout: float | None) -> None:
        """The daemon's wait: the next scripted moment wakes it, or the timeout ends it."""
        self.waits.append(timeout)
        assert len(self.waits) < 10_000, "the daemon spins without sleeping"
        end = math.inf if timeout is None else self.now + timeout
        if self._moments and self._moments[0][0] <= end:
            when, _, action = heapq.heappop(self._moments)
            self.now = max(self.now, when)
            action()
            return
        assert timeout is not None, "the daemon would sleep forever: the script ends unstopped"
        self.now = end

    def advance(self, seconds: float) -> None:
        """Time passing during a build: the scripted moments within it happen."""
        end = self.now + seconds
        while self._moments and self._moments[0][0] <= end:
            when, _, action = heapq.heappop(self._moments)
            self.now = max(self.now, when)
            action()
        self.now = end


class ScriptedWatcher:
    """Stands where FolderWatcher stands, and replays the batches of changes it is given.

    Like FolderWatcher, it cannot start on a missing folder; ``deaf`` makes its health check
    report a problem (as an overflow or a removed folder would)."""

    def __init__(self, root: Path, on_change: OnChange, *, also_watch: Sequence[Path] = ()) -> None:
        self.root = root
        self.also_watch = list(also_watch)
        self._on_change = on_change
        self.running = False
        self.deaf: str | None = None

    def start(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(2, f"cannot watch {self.root}: No such file or directory")
        self.running = True

    def stop(self) -> None:
        self.running = False

    def problem(self) -> str | None:
        return self.deaf

    def replay(self, batch: Sequence[Change]) -> None:
        assert self.running, "changes from a watcher that is not running"
        for change in batch:
            self._on_change(change)


class Watchers:
    """The watcher factory given to the daemon: remembers each watcher it made."""

    def __init__(self) -> None:
        self.made: list[ScriptedWatcher] = []

    def __call__(
        self, root: Path, on_change: OnChange, *, also_watch: Sequence[Path] = ()
    ) -> ScriptedWatcher:
        watcher = ScriptedWatcher(root, on_change, also_watch=also_watch)
        self.made.append(watcher)
        return watcher

    @property
    def current(self) -> ScriptedWatcher:
        return self.made[-1]


@dataclass
class Build:
    """One build, as a scripted worker plays it."""

    rig: Rig
    worker: ScriptedWorker
    request: BuildRequest
    should_abort: Callable[[], bool]
    on_wait: Callable[[], float | None]


Play = Callable[[Build], BuildResult]


class ScriptedWorker:
    """Stands where a worker process stands: each build plays the next scripted play."""

    def __init__(self, workers: Workers, number: int, started_at: float) -> None:
        self._workers = workers
        self.number = number
        self.started_at = started_at
        #: When it ran its build, and how many waits the daemon had made by then.
        self.ran_at: float | None = None
        self.waits_before = 0
        self.dead = False
        self.stopped = False
        self.reported: set[tuple[Any, ...]] = set()

    def alive(self) -> bool:
        return not (self.dead or self.stopped)

    def run(
        self,
        request: BuildRequest,
        *,
        timeout: float,
        wake_fd: int | None,
        should_abort: Callable[[], bool],
        on_wait: Callable[[], float | None],
        started: float | None = None,
    ) -> BuildResult:
        assert self.ran_at is None, "a worker serves exactly one build"
        assert self.alive(), "a build given to a worker that has ended"
        timeline = self._workers.rig.timeline
        self.ran_at, self.waits_before = timeline.elapsed, len(timeline.waits)
        if should_abort():
            raise BuildAborted("the daemon is stopping")
        assert self._workers.plays, "a build the script did not expect"
        play = self._workers.plays.popleft()
        return play(Build(self._workers.rig, self, request, should_abort, on_wait))

    def stop(self) -> None:
        self.stopped = True


class Workers:
    """How the runner starts a worker; the plays are used in order, one per build."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.plays: collections.deque[Play] = collections.deque()
        self.started: list[ScriptedWorker] = []

    def __call__(self, config: Config) -> ScriptedWorker:
        worker = ScriptedWorker(self, len(self.started) + 1, self.rig.timeline.elapsed)
        self.started.append(worker)
        return worker

    def script(self, *plays: Play) -> None:
        self.plays.extend(plays)

    @property
    def ran(self) -> list[ScriptedWorker]:
        return sorted((w for w in self.started if w.ran_at is not None), key=lambda w: w.number)


def publishes(build: Build) -> BuildResult:
    """What a worker's build returns for the files on disk: a version in staging, or
    ``unchanged`` or ``empty``, with the manifest a real build writes."""
    request = build.request
    config, resolution = request.config, request.resolution
    raw = request.raw_fingerprint or specs.raw_fingerprint(config, resolution)
    models = tuple(
        AcceptedModel(
            signature=spec.signature,
            relpath=spec.relpath,
            sha256=hashlib.sha256((config.frozen_dir / spec.relpath).read_bytes()).hexdigest(),
            size=(config.frozen_dir / spec.relpath).stat().st_size,
            inputs={"x": "x:0"},
            outputs={"y": "y:0"},
            origin=spec.origin,
        )
        for spec in resolution.specs
    )
    if not models:
        return BuildResult(request.build_id, "empty", None, None, raw_fingerprint=raw)
    if raw == request.newest_fingerprint:
        return BuildResult(request.build_id, "unchanged", None, raw, models, raw_fingerprint=raw)
    staging = Path(request.staging)
    (staging / MANIFEST).parent.mkdir(parents=True)
    (staging / "saved_model.pb").write_bytes(b"merged")
    manifest = {
        "fingerprint": raw,
        "raw_fingerprint": raw,
        "signatures": {m.signature: m.as_dict() for m in models},
        "sources": [{"file": m.relpath, "sha256": m.sha256} for m in models],
    }
    (staging / MANIFEST).write_text(json.dumps(manifest))
    return BuildResult(request.build_id, "built", str(staging), raw, models, raw_fingerprint=raw)


def crashes(build: Build) -> BuildResult:
    build.worker.dead = True
    raise WorkerError("crashed", "the worker was killed by SIGKILL", transient=True)


def disk_full(build: Build) -> BuildResult:
    raise WorkerError("os_error", "[Errno 28] No space left on device", transient=True)


def runs_until_stopped(build: Build) -> BuildResult:
    """A build half-way through writing staging when the daemon is asked to stop."""
    staging = Path(build.request.staging)
    (staging / "saved_model.pb").write_bytes(b"half")
    while not build.should_abort():
        build.rig.timeline.wait(build.on_wait())
    raise BuildAborted("the daemon is stopping")


def taking(seconds: float, then: Play) -> Play:
    def play(build: Build) -> BuildResult:
        build.rig.timeline.advance(seconds)
        return then(build)

    return play


class NotifyReceiver:
    """systemd's end of NOTIFY_SOCKET: a reader thread drains the socket as datagrams come."""

    _END = b"END-OF-TEST"

    def __init__(self) -> None:
        self.address = b"\0tfmerge-test-" + secrets.token_hex(8).encode()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.bind(self.address)
        self._messages: list[str] = []
        self._reader = threading.Thread(target=self._drain, name="notify-receiver")
        self._reader.start()

    def _drain(self) -> None:
        while (data := self._socket.recv(8192)) != self._END:
            self._messages.append(data.decode())

    def messages(self) -> list[str]:
        """Every datagram received, in order (the reader has read all that was sent)."""
        if self._reader.is_alive():
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                sender.sendto(self._END, self.address)
            self._reader.join()
            self._socket.close()
        return self._messages


class Rig:
    """A daemon on tmp paths, with its outside world scripted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.frozen = root / "frozen"
        self.serving = root / "serving"
        self.config_path = root / "tfmerge.toml"
        self.frozen.mkdir()
        self.configure()
        self.timeline = Timeline()
        self.watchers = Watchers()
        self.workers = Workers(self)
        self.notify = NotifyReceiver()
        self.watchdog_usec: int | None = None
        self.signals = False
        #: Makes the daemon's probe of files open for writing (None: the events alone tell).
        self.writers: Callable[[], WritingProbe | None] = LeaseProbe
        self.events: list[dict[str, Any]] = []
        self._daemon: Daemon | None = None

    def configure(self, *, warm: bool = False, retries: int = 3, extra: str = "") -> None:
        self.config_path.write_text(
            'frozen_dir = "frozen"\nserving_dir = "serving"\nstate_dir = "state"\n'
            + extra
            + "[watch]\nquiet_seconds = 2.0\nmax_wait_seconds = 30.0\n"
            + f"[worker]\nwarm = {str(warm).lower()}\nretries = {retries}\n"
            + '[log]\nformat = "json"\nlevel = "debug"\n'
        )

    def run(self) -> int:
        """Serve until the script stops the daemon; its log events land in ``events``."""
        with capture_logs(processors=[merge_contextvars, self._stamp]) as events:
            notifier = Notifier(self.notify.address, watchdog_usec=self.watchdog_usec)
            self._daemon = Daemon(
                load_config(self.config_path),
                notifier=notifier,
                runner=self._runner,
                watcher=self.watchers,
                writers=self.writers,
                clock=self.timeline.clock,
                wait=self.timeline.wait,
            )
            restore = self._daemon.install_signal_handlers() if self.signals else None
            try:
                code = self._daemon.serve()
            finally:
                if restore is not None:
                    restore()
                self._daemon.close()
        self.events = events
        return code

    def _runner(self, supervision: Supervision) -> WorkerRunner:
        return WorkerRunner(supervision, start_worker=self.workers)

    def _stamp(self, _logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
        event["at"] = self.timeline.elapsed
        return event

    # --- what happens on the timeline ------------------------------------------------------

    def upload(self, name: str, data: bytes = b"graph", *, close: bool = True) -> None:
        """scp: the file written in place, then closed (or still open, when not ``close``)."""
        (self.frozen / name).write_bytes(data)
        batch = [Change(name, "created"), Change(name, "modified")]
        self.watchers.current.replay([*batch, Change(name, "closed")] if close else batch)

    def edit_config(self, text: str) -> None:
        self.config_path.write_text(text)
        path = str(self.config_path)
        self.watchers.current.replay([Change(path, "modified"), Change(path, "closed")])

    def stop(self) -> None:
        assert self._daemon is not None
        self._daemon.request_stop()

    # --- what the run left -----------------------------------------------------------------

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def versions(self) -> list[int]:
        return sorted(versions(self.serving))


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


def at_times(events: list[dict[str, Any]]) -> list[float]:
    return [e["at"] for e in events]


# --- debounce and builds ------------------------------------------------------------------


def test_a_settled_upload_starts_one_build_after_the_quiet_period(rig: Rig) -> None:
    rig.workers.script(publishes, publishes)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    started = rig.named("build_started")
    assert [(e["trigger"], e["at"]) for e in started] == [("startup", 0.0), ("settled", 12.0)]
    (settled,) = rig.named("batch_settled")
    assert settled["paths"] == ["b.pb"]
    assert settled["reason"] == "settled"
    assert settled["settle_seconds"] == 2.0
    finished = rig.named("build_finished")
    assert [(e["outcome"], e["version"], e["added"]) for e in finished] == [
        ("published", 1, ["a"]),
        ("published", 2, ["b"]),
    ]
    assert started[1]["build_id"] == finished[1]["build_id"]
    assert rig.versions() == [1, 2]
    assert rig.named("daemon_stopped")[0]["at"] == 60.0


def test_without_the_kernel_a_file_never_closed_is_built_at_max_wait_as_still_writing(
    rig: Rig,
) -> None:
    rig.writers = lambda: None  # no lease to be had: the events alone tell
    rig.workers.script(publishes, publishes)
    rig.timeline.at(10, lambda: rig.upload("b.pb", close=False))
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    (settled,) = rig.named("batch_settled")
    assert (settled["reason"], settled["still_writing"], settled["at"]) == (
        "max_wait",
        ["b.pb"],
        40.0,
    )
    assert [e["trigger"] for e in rig.named("build_started")] == ["startup", "max_wait"]


def test_changes_during_a_build_make_exactly_one_follow_up_build(rig: Rig) -> None:
    rig.workers.script(publishes, taking(5, publishes), publishes)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    # The build of b.pb runs from 12 to 17; these arrive while it runs.
    rig.timeline.at(13, lambda: rig.upload("c.pb"))
    rig.timeline.at(14, lambda: rig.upload("d.pb"))
    rig.timeline.at(15, lambda: rig.upload("c.pb", b"graph c, second upload"))
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    settled = rig.named("batch_settled")
    assert [(e["paths"], e["at"]) for e in settled] == [(["b.pb"], 12.0), (["c.pb", "d.pb"], 19.0)]
    started = rig.named("build_started")
    assert [(e["trigger"], e["at"]) for e in started] == [
        ("startup", 0.0),
        ("settled", 12.0),
        ("settled", 19.0),
    ]
    assert rig.named("build_finished")[-1]["added"] == ["c", "d"]
    assert rig.versions() == [1, 2, 3]
    assert not rig.workers.plays


# --- configuration reloads ----------------------------------------------------------------


def test_an_edited_config_file_reloads_once_after_its_quiet_period(rig: Rig) -> None:
    rig.workers.script(publishes, publishes)
    edited = rig.config_path.read_text().replace("[watch]", 'default_signature = "a"\n[watch]')
    rig.timeline.at(10, lambda: rig.edit_config(edited))
    rig.timeline.at(10.5, lambda: rig.edit_config(edited + "# a second write of one save\n"))
    rig.timeline.at(60, rig.stop)
    assert rig.run() == exitcodes.OK

    assert at_times(rig.named("config_changed")) == [10.0]
    assert at_times(rig.named("config_reloaded")) == [12.5]
    started = rig.named("build_started")
    assert [(e["trigger"], e["at"]) for e in started] == [("startup", 0.0), ("reload", 12.5)]
    assert rig.named("batch_settled") == []
    assert rig.versions() == [1, 2]
    messages = rig.notify.messages()
    reloading = [i for i, m in enumerate(messages) if m.startswith("RELOADING=1")]
    assert len(reloading) == 1
    assert messages[reloading[0] + 1].startswith("READY=1\nSTATUS=idle: serving version 1")


def test_sighup_reloads_at_once_and_a_broken_file_keeps_the_configuration(rig: Rig) -> None:
    rig.signals = True
    handler_before = signal.getsignal(signal.SIGHUP)
    rig.workers.script(publishes, publishes)
    good = rig.config_path.read_text()
    rig.timeline.at(10, lambda: rig.edit_config(good + "this is not toml\n"))
    rig.timeline.at(10.25, lambda: signal.raise_signal(signal.SIGHUP))
    changed = good.replace("[watch]", 'default_signature = "a"\n[watch]')
    rig.timeline.at(20, lambda: rig.edit_config(changed))
    rig.timeline.at(20.25, lambda: signal.raise_signal(signal.SIGHUP))
    rig.timeline.at(40, lambda: signal.raise_signal(signal.SIGTERM))
    assert rig.run() == exitcodes.OK

    (failed,) = rig.named("config_reload_failed")
    assert (failed["at"], failed["path"]) == (10.25, str(rig.config_path))
    assert at_times(rig.named("config_reloaded")) == [20.25]
    # A reload answers the edit that came just before the signal: no second reload follows.
    assert at_times(rig.named("config_changed")) == [10.0, 20.0]
    started = rig.named("build_started")
    assert [(e["trigger"], e["at"]) for e in started] == [("startup", 0.0), ("reload", 20.25)]
    assert rig.named("daemon_stopping")[0]["at"] == 40.0
    assert signal.getsignal(signal.SIGHUP) == handler_before
    messages = rig.notify.messages()
    assert sum(m.startswith("RELOADING=1") for m in messages) == 2


# --- retries, stop and abort ---------------------------------------------------------------


def test_transient_failures_are_retried_with_growing_waits_then_given_up(rig: Rig) -> None:
    rig.workers.script(publishes, crashes, disk_full, crashes, crashes, publishes)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(40, lambda: rig.upload("c.pb"))
    rig.timeline.at(90, rig.stop)
    assert rig.run() == exitcodes.OK

    tries = rig.workers.ran[1:5]
    assert [w.ran_at for w in tries] == [12.0, 13.0, 15.0, 19.0]
    # Between the first and the last try the daemon waited exactly the backoff, nothing else.
    assert rig.timeline.waits[tries[0].waits_before : tries[-1].waits_before] == [1.0, 2.0, 4.0]
    retries = [(e["attempt"], e["wait_seconds"]) for e in rig.named("build_retry")]
    assert retries == [(1, 1.0), (2, 2.0), (3, 4.0)]
    assert rig.named("build_retry")[1] == {
        "attempt": 2,
        "wait_seconds": 2.0,
        "reason": "[Errno 28] No space left on device",
        "event": "build_retry",
        "log_level": "warning",
        "at": 13.0,
    }
    (gave_up,) = rig.named("worker_crashed")
    assert (gave_up["at"], gave_up["transient"]) == (19.0, True)
    outcomes = [e["outcome"] for e in rig.named("build_finished")]
    assert outcomes == ["published", "error", "error", "error", "error", "published"]
    # The daemon carries on: the next upload publishes what is there now.
    assert rig.named("build_finished")[-1]["added"] == ["b", "c"]
    assert rig.versions() == [1, 2]
    assert any(m.startswith("STATUS=last build failed: ") for m in rig.notify.messages())


def test_a_stop_request_cuts_a_backoff_short_and_ends_the_retries(rig: Rig) -> None:
    rig.workers.script(publishes, crashes, crashes)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(13.5, rig.stop)  # during the 2 s wait after the second try
    assert rig.run() == exitcodes.OK

    assert [w.ran_at for w in rig.workers.ran] == [0.0, 12.0, 13.0]
    assert rig.timeline.waits[rig.workers.ran[1].waits_before :] == [1.0, 2.0]
    assert rig.timeline.elapsed == 13.5
    assert [e["at"] for e in rig.named("build_aborted")] == [13.5]
    assert rig.named("worker_crashed") == []
    assert rig.named("daemon_stopped")
    assert all(w.stopped for w in rig.workers.started)


def test_a_stop_request_aborts_the_running_build_and_leaves_no_staging(rig: Rig) -> None:
    rig.workers.script(publishes, runs_until_stopped)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(20, rig.stop)
    assert rig.run() == exitcodes.OK

    aborted = rig.named("build_finished")[-1]
    assert (aborted["outcome"], aborted["log_level"], aborted["at"]) == ("aborted", "warning", 20.0)
    assert [e["at"] for e in rig.named("build_aborted")] == [20.0]
    assert rig.named("build_retry") == []
    assert rig.versions() == [1]
    assert not [p for p in rig.serving.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert all(w.stopped for w in rig.workers.started)
    assert rig.notify.messages()[-1] == "STOPPING=1\nSTATUS=stopping"


# --- the warm worker -----------------------------------------------------------------------


def test_the_warm_worker_is_replaced_after_a_build_and_after_a_crash(rig: Rig) -> None:
    rig.configure(warm=True)
    rig.workers.script(publishes, publishes, crashes, publishes)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(20, lambda: rig.upload("c.pb"))
    rig.timeline.at(40, rig.stop)
    assert rig.run() == exitcodes.OK

    # Worker 1 builds at start-up, cold; every later build and retry finds one started
    # ahead, and the last one started is stopped with the daemon, never used.
    workers = [(w.number, w.started_at, w.ran_at, w.stopped) for w in rig.workers.started]
    assert workers == [
        (1, 0.0, 0.0, True),
        (2, 0.0, 12.0, True),
        (3, 12.0, 22.0, True),
        (4, 22.0, 23.0, True),
        (5, 23.0, None, True),
    ]
    assert rig.versions() == [1, 2, 3]


def test_a_warm_worker_that_died_while_idle_is_replaced_for_the_build(rig: Rig) -> None:
    rig.configure(warm=True)
    rig.workers.script(publishes, publishes)

    def warm_worker_dies() -> None:
        rig.workers.started[-1].dead = True

    rig.timeline.at(5, warm_worker_dies)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(40, rig.stop)
    assert rig.run() == exitcodes.OK

    workers = [(w.number, w.started_at, w.ran_at, w.stopped) for w in rig.workers.started]
    assert workers == [
        (1, 0.0, 0.0, True),
        (2, 0.0, None, True),  # reaped, not used
        (3, 12.0, 12.0, True),
        (4, 12.0, None, True),
    ]
    assert rig.versions() == [1, 2]


def dies_on(signature: str, number: int, seen: list[BuildRequest]) -> Play:
    """The worker dies by signal number while it checks one model, staging half written."""

    def play(build: Build) -> BuildResult:
        seen.append(build.request)
        (Path(build.request.staging) / "saved_model.pb").write_bytes(b"half")
        build.worker.dead = True
        spec = next(s for s in build.request.resolution.specs if s.signature == signature)
        step = progress.Step(signature, spec.relpath, "probe", 120.0, "5" * 64)
        reason = f"the worker was killed by {signal.Signals(number).name}"
        raise ModelFailed(step, "crashed", reason, signal=number)

    return play


def recorded(seen: list[BuildRequest]) -> Play:
    def play(build: Build) -> BuildResult:
        seen.append(build.request)
        assert list(Path(build.request.staging).iterdir()) == []
        return publishes(build)

    return play


def test_a_worker_that_dies_on_a_model_is_replaced_and_the_build_goes_on_without_it(
    rig: Rig,
) -> None:
    (rig.frozen / "b.pb").write_bytes(b"graph b")
    seen: list[BuildRequest] = []
    rig.workers.script(dies_on("b", signal.SIGABRT, seen), recorded(seen))
    rig.timeline.at(10, rig.stop)
    assert rig.run() == exitcodes.OK

    (replaced,) = rig.named("worker_replaced")
    assert (replaced["signature"], replaced["step"], replaced["refused"]) == ("b", "probe", True)
    assert "SIGABRT" in replaced["reason"]
    (finished,) = rig.named("build_finished")
    assert (finished["outcome"], finished["added"]) == ("published", ["a"])
    assert rig.named("worker_crashed") == rig.named("build_retry") == []
    # One build: the same build_id and staging, handed to a fresh worker without "b".
    first, second = seen
    assert (second.build_id, second.staging) == (first.build_id, first.staging)
    assert [s.signature for s in second.resolution.specs] == ["a"]
    assert "b" in second.resolution.refused_signatures
    (refusal,) = second.resolution.rejections
    assert (refusal.code, refusal.file, refusal.signature) == ("probe_crashed", "b.pb", "b")
    # Remembered: the same bytes are not run again until the file changes.
    config = load_config(rig.config_path)
    spec = next(s for s in first.resolution.specs if s.signature == "b")
    verdict = Store(config.state_dir).verdict(limits.verdict_key(config, spec, "5" * 64))
    assert verdict is not None
    assert verdict["code"] == "probe_crashed"
    assert [w.stopped for w in rig.workers.started] == [True, True]


def test_a_sigkill_on_a_model_s_check_is_pinned_on_it_only_the_second_time(rig: Rig) -> None:
    (rig.frozen / "b.pb").write_bytes(b"graph b")
    seen: list[BuildRequest] = []
    rig.workers.script(
        dies_on("a", signal.SIGKILL, seen), dies_on("a", signal.SIGKILL, seen), recorded(seen)
    )
    rig.timeline.at(10, rig.stop)
    assert rig.run() == exitcodes.OK

    assert [e["refused"] for e in rig.named("worker_replaced")] == [False, True]
    assert [[s.signature for s in r.resolution.specs] for r in seen] == [
        ["a", "b"],
        ["a", "b"],
        ["b"],
    ]
    (finished,) = rig.named("build_finished")
    assert (finished["outcome"], finished["added"]) == ("published", ["b"])


# --- what systemd hears --------------------------------------------------------------------


def test_status_readiness_and_watchdog_reach_the_notify_socket(rig: Rig) -> None:
    rig.watchdog_usec = 10_000_000  # a ping at least every 5 s
    rig.workers.script(publishes, publishes)
    rig.timeline.at(10, lambda: rig.upload("b.pb"))
    rig.timeline.at(30, rig.stop)
    assert rig.run() == exitcodes.OK

    messages = rig.notify.messages()
    watching = f"watching {rig.frozen.resolve()}"
    assert [m for m in messages if m != "WATCHDOG=1"] == [
        "STATUS=building (startup)",
        f"STATUS=idle: serving version 1; {watching}",
        f"READY=1\nSTATUS=idle: serving version 1; {watching}",
        "STATUS=building (settled)",
        f"STATUS=idle: serving version 2; {watching}",
        "STOPPING=1\nSTATUS=stopping",
    ]
    # Idle, the daemon never sleeps past the next ping; 30 s take at least six pings.
    idle = [w for w in rig.timeline.waits if w != 0.0]
    assert idle
    assert all(w is not None and w <= 5.0 for w in idle)
    assert messages.count("WATCHDOG=1") >= 6
