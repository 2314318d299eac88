"""The real daemon (``tfmerge run``) as a child process: time to live, warm worker, idle cost.

Time to live is measured from the moment the last uploaded file is closed to the timestamp of
the daemon's ``version_published`` event (written right after the rename, so it errs on the
long side); the quiet period is subtracted, since the daemon waits for it by design. Both
clocks are the host's wall clock (structlog stamps events in UTC ISO 8601 with microseconds).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.launch import QUIET_TF
from bench.sets import ROOT, ModelSet

if TYPE_CHECKING:
    from daemonlib import DaemonProcess

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET_SECONDS = 2.0
#: A warm worker has finished importing TensorFlow once its CPU time stops growing this long.
_SETTLED_CPU_SECONDS = 1.0


def event_time(event: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (bytes) and Threads from /proc/<pid>/status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
        elif key == "Threads":
            values[key] = int(rest)
    return values


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat(5), counted from the state field (3rd) after the command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def workers(pid: int) -> list[int]:
    """The daemon's build workers; its other child is multiprocessing's resource tracker."""
    return [child for child in children(pid) if "spawn_main" in _cmdline(child)]


def helpers(pid: int) -> list[int]:
    return [child for child in children(pid) if "spawn_main" not in _cmdline(child)]


def write_config(project: Path, *, warm: bool) -> Path:
    for name in ("frozen", "serving", "state"):
        (project / name).mkdir(parents=True, exist_ok=True)
    config = project / "tfmerge.toml"
    config.write_text(
        'frozen_dir = "frozen"\nserving_dir = "serving"\nstate_dir = "state"\n'
        "discover = true\n"
        f"[watch]\nquiet_seconds = {QUIET_SECONDS}\nmax_wait_seconds = 60.0\n"
        f"[worker]\nwarm = {'true' if warm else 'false'}\n"
        '[log]\nformat = "json"\nlevel = "info"\n'
    )
    return config


def start_daemon(config: Path) -> DaemonProcess:
    """``tfmerge run`` as a child, its events followed: the tests' own harness, quiet TF."""
    sys.path.insert(0, str(ROOT / "tests"))
    from daemonlib import DaemonProcess

    return DaemonProcess(config, env=QUIET_TF)


def _poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.05)


def wait_warm_worker(daemon: Any, timeout: float = 120.0) -> int:
    """The warm worker's pid, once it has imported TensorFlow and gone idle."""
    pid: int = _poll(
        lambda: next(iter(workers(daemon.process.pid)), None), timeout, "no warm worker"
    )
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    still_since = time.monotonic()
    while time.monotonic() - still_since < _SETTLED_CPU_SECONDS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the warm worker {pid} never went idle")
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now != last:
            last, still_since = now, time.monotonic()
    return pid


@dataclass(frozen=True)
class LiveRun:
    warm: bool
    ttl_seconds: float  # last close -> version_published
    settled_seconds: float  # last close -> batch_settled
    build_seconds: float  # batch_settled -> version_published
    durations: dict[str, float]
    supervisor_rss_before: int
    supervisor_rss_after: int
    worker_idle_rss: int | None
    published: str
    quiet_seconds: float = QUIET_SECONDS


def upload(model_set: ModelSet, frozen_dir: Path) -> float:
    """Copy every file of the set in place, one after the other; the time of the last close."""
    closed = 0.0
    for source in sorted(model_set.frozen_dir.glob("*.pb")):
        shutil.copyfile(source, frozen_dir / source.name)
        closed = time.time()
    return closed


def time_to_live(model_set: ModelSet, project: Path, *, warm: bool) -> LiveRun:
    shutil.rmtree(project, ignore_errors=True)
    config = write_config(project, warm=warm)
    daemon = start_daemon(config)
    try:
        daemon.wait_for("daemon_ready", timeout=300)
        worker = wait_warm_worker(daemon) if warm else None
        worker_rss = proc_status(worker)["VmRSS"] if worker is not None else None
        if not warm:
            _poll(lambda: not workers(daemon.process.pid), 60, "the start-up worker did not exit")
        before = proc_status(daemon.process.pid)["VmRSS"]
        mark = daemon.mark()
        closed = upload(model_set, project / "frozen")
        settled = daemon.wait_for("batch_settled", since=mark)
        published = daemon.wait_for("version_published", since=mark)
        finished = daemon.wait_for("build_finished", since=mark)
        after = proc_status(daemon.process.pid)["VmRSS"]
    finally:
        daemon.stop()
    return LiveRun(
        warm=warm,
        ttl_seconds=event_time(published) - closed,
        settled_seconds=event_time(settled) - closed,
        build_seconds=event_time(published) - event_time(settled),
        durations=dict(finished.get("durations", {})),
        supervisor_rss_before=before,
        supervisor_rss_after=after,
        worker_idle_rss=worker_rss,
        published=str(published["path"]),
    )


@dataclass(frozen=True)
class IdleSample:
    seconds: float
    rss_start: int
    rss_end: int
    rss_max: int
    hwm: int
    threads: int
    cpu_seconds: float
    #: multiprocessing's resource tracker, the supervisor's other child.
    helper_rss: int


def supervisor_idle(project: Path, seconds: float = 60.0) -> IdleSample:
    """The daemon alone (warm = false), idle after a start-up that finds nothing to build."""
    daemon = start_daemon(project / "tfmerge.toml")
    try:
        daemon.wait_for("daemon_ready", timeout=300)
        _poll(lambda: not workers(daemon.process.pid), 60, "a worker is still running")
        # Let start-up allocations settle before the clock starts.
        time.sleep(1.0)
        start = proc_status(daemon.process.pid)
        cpu_start = cpu_seconds(daemon.process.pid)
        began = time.monotonic()
        peak = start["VmRSS"]
        while (elapsed := time.monotonic() - began) < seconds:
            time.sleep(min(1.0, seconds - elapsed))
            peak = max(peak, proc_status(daemon.process.pid)["VmRSS"])
        end = proc_status(daemon.process.pid)
        cpu_end = cpu_seconds(daemon.process.pid)
        elapsed = time.monotonic() - began
        if workers(daemon.process.pid):
            raise RuntimeError("the idle daemon started a worker: it was not idle")
        helper_rss = sum(proc_status(pid)["VmRSS"] for pid in helpers(daemon.process.pid))
    finally:
        daemon.stop()
    return IdleSample(
        seconds=elapsed,
        rss_start=start["VmRSS"],
        rss_end=end["VmRSS"],
        rss_max=peak,
        hwm=end["VmHWM"],
        threads=end["Threads"],
        cpu_seconds=cpu_end - cpu_start,
        helper_rss=helper_rss,
    )


def time_to_live_replacing_one(
    model_set: ModelSet, project: Path, *, index: int, salt: int
) -> dict[str, Any]:
    """The daemon warm and serving every model of the set; one model's file is replaced.

    The replacement is written aside and renamed into place (as rsync does), so its last
    close is the rename; the version that serves it must be published within the quiet
    period plus the build.
    """
    from bench import manyset

    shutil.rmtree(project, ignore_errors=True)
    config = write_config(project, warm=True)
    frozen = project / "frozen"
    for source in sorted(model_set.frozen_dir.glob("*.pb")):
        os.link(source, frozen / source.name)
    daemon = start_daemon(config)
    try:
        daemon.wait_for("daemon_ready", timeout=600)
        daemon.wait_for("version_published", timeout=1200)
        wait_warm_worker(daemon)
        mark = daemon.mark()
        manyset.change_one(frozen, index, salt)
        closed = time.time()
        settled = daemon.wait_for("batch_settled", since=mark, timeout=300)
        published = daemon.wait_for("version_published", since=mark, timeout=300)
        finished = daemon.wait_for("build_finished", since=mark, timeout=300)
    finally:
        daemon.stop()
    ttl = event_time(published) - closed
    return {
        "models": len(list(frozen.glob("*.pb"))),
        "ttl_seconds": ttl,
        "settled_seconds": event_time(settled) - closed,
        "beyond_quiet": ttl - QUIET_SECONDS,
        "build_seconds": event_time(published) - event_time(settled),
        "durations": dict(finished.get("durations", {})),
        "load": os.getloadavg()[0],
    }
