"""The state-folder lock against real processes: refusal, a killed holder, children, reuse."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tfmerge
from tfmerge import exitcodes
from tfmerge.folders.fs import LOCK_FILE_NAME, AlreadyRunning, InstanceLock

PACKAGE_ROOT = Path(tfmerge.__file__).resolve().parent.parent
CHILD_TIMEOUT = 60.0

# Takes the lock, says so, and holds it until its stdin closes.
HOLDER_SCRIPT = """
import sys
from pathlib import Path
from tfmerge.folders.fs import InstanceLock

lock = InstanceLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""

# Tries the lock once and reports what happened as JSON, exiting as the daemon would.
PROBE_SCRIPT = """
import json
import sys
from pathlib import Path
from tfmerge import exitcodes
from tfmerge.folders.fs import AlreadyRunning, InstanceLock

lock = InstanceLock(Path(sys.argv[1]))
try:
    lock.acquire()
except AlreadyRunning as exc:
    print(json.dumps(
        {"holder_pid": exc.holder_pid, "lock_path": str(exc.lock_path), "message": str(exc)}
    ))
    sys.exit(exitcodes.LOCKED)
print(json.dumps({"acquired": True}))
lock.release()
"""

# Holds nothing; says it has started (so exec is behind it) and waits for its stdin to close.
IDLE_SCRIPT = """
import sys
print("started", flush=True)
sys.stdin.read()
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
    )
    return env


def _probe(state_dir: Path) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE_SCRIPT, str(state_dir)],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert result.stderr == ""
    report: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, report


class Children:
    """Long-running children of one test; whatever is still running at the end is killed."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[str]] = []

    def start(self, script: str, *args: str, close_fds: bool = True) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env=_child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            close_fds=close_fds,
        )
        self.running.append(child)
        return child

    @staticmethod
    def read_line(child: subprocess.Popen[str]) -> str:
        assert child.stdout is not None
        readable, _, _ = select.select([child.stdout], [], [], CHILD_TIMEOUT)
        if not readable:
            pytest.fail(f"child {child.pid} wrote nothing within {CHILD_TIMEOUT} s")
        return child.stdout.readline().rstrip("\n")

    def kill_all(self) -> None:
        for child in self.running:
            if child.poll() is None:
                child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def children() -> Iterator[Children]:
    started = Children()
    yield started
    started.kill_all()


def _open_paths(pid: int | str) -> set[Path]:
    paths = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            paths.add(entry.readlink())
        except FileNotFoundError:  # the descriptor listing itself, closed while we looked
            continue
    return paths


def test_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with InstanceLock(state_dir) as lock:
        assert lock.held
        assert lock.lock_path.read_text() == f"{os.getpid()}\n"
        returncode, report = _probe(state_dir)
    assert returncode == exitcodes.LOCKED
    assert report["holder_pid"] == os.getpid()
    assert report["lock_path"] == str(state_dir / LOCK_FILE_NAME)
    assert report["message"] == (
        f"another tfmerge daemon (pid {os.getpid()}) already uses this state folder: "
        f"{state_dir / LOCK_FILE_NAME} is locked"
    )
    # Released: the same probe now gets the lock.
    assert _probe(state_dir) == (exitcodes.OK, {"acquired": True})


def test_lock_of_a_killed_holder_can_be_taken(tmp_path: Path, children: Children) -> None:
    state_dir = tmp_path / "state"
    holder = children.start(HOLDER_SCRIPT, str(state_dir))
    assert children.read_line(holder) == "locked"

    lock = InstanceLock(state_dir)
    with pytest.raises(AlreadyRunning) as refused:
        lock.acquire()
    assert refused.value.holder_pid == holder.pid
    assert refused.value.lock_path == state_dir / LOCK_FILE_NAME
    assert not lock.held

    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=CHILD_TIMEOUT) == -signal.SIGKILL
    # The dead holder's file is still there, naming it; only the kernel's lock went away.
    assert lock.lock_path.read_text() == f"{holder.pid}\n"

    lock.acquire()
    try:
        assert lock.held
        assert lock.lock_path.read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_children_do_not_inherit_the_lock(tmp_path: Path, children: Children) -> None:
    state_dir = tmp_path / "state"
    lock = InstanceLock(state_dir)
    lock.acquire()
    try:
        lock_path = lock.lock_path.resolve()
        assert lock_path in _open_paths("self")
        # close_fds=False hands every inheritable descriptor to the child: only O_CLOEXEC
        # keeps the lock out of it.
        child = children.start(IDLE_SCRIPT, close_fds=False)
        assert children.read_line(child) == "started"
        assert lock_path not in _open_paths(child.pid)
    finally:
        lock.release()

    # The child outlives our hold, and the folder is free for the next daemon all the same.
    assert child.poll() is None
    assert _probe(state_dir) == (exitcodes.OK, {"acquired": True})

    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(timeout=CHILD_TIMEOUT) == 0


def test_release_then_reacquire_in_process(tmp_path: Path) -> None:
    lock = InstanceLock(tmp_path)
    lock.acquire()
    lock.release()
    assert not lock.held
    # Emptied before unlocking: the file names no holder once nobody holds it.
    assert lock.lock_path.read_text() == ""
    lock.release()  # releasing twice is harmless

    lock.acquire()
    try:
        assert lock.held
        assert lock.lock_path.read_text() == f"{os.getpid()}\n"
        # flock locks belong to open files, not processes: a second lock in this process is
        # refused like any other.
        with pytest.raises(AlreadyRunning) as refused:
            InstanceLock(tmp_path).acquire()
        assert refused.value.holder_pid == os.getpid()
        with pytest.raises(RuntimeError, match="already held"):
            lock.acquire()
    finally:
        lock.release()

    with InstanceLock(tmp_path) as again:
        assert again.held
    assert not again.held


def test_creates_a_missing_state_folder_with_its_mode(tmp_path: Path) -> None:
    state_dir = tmp_path / "var" / "lib" / "tfmerge"
    umask = os.umask(0)
    os.umask(umask)
    with InstanceLock(state_dir):
        assert state_dir.is_dir()
        assert state_dir.stat().st_mode & 0o777 == 0o750 & ~umask


def test_stale_longer_pid_is_overwritten_completely(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE_NAME).write_text("4194303999\n")
    with InstanceLock(tmp_path) as lock:
        assert lock.lock_path.read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("content", ["", "not a pid\n", "-3\n", "\xff\xfe"])
def test_unreadable_holder_pid_is_reported_as_unknown(tmp_path: Path, content: str) -> None:
    with InstanceLock(tmp_path) as holder:
        # As seen between the holder's flock and its write, or after someone edited the file.
        holder.lock_path.write_bytes(content.encode("latin-1"))
        with pytest.raises(AlreadyRunning, match="a process of unknown pid") as refused:
            InstanceLock(tmp_path).acquire()
    assert refused.value.holder_pid is None


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / LOCK_FILE_NAME).symlink_to(target)
    lock = InstanceLock(tmp_path)
    with pytest.raises(OSError, match="Too many levels of symbolic links") as refused:
        lock.acquire()
    assert refused.value.errno == errno.ELOOP
    assert not target.exists()
    assert not lock.held
