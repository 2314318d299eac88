"""Suite-wide fixtures: every test must leave no thread and no child process behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run: a failure reproduces, a pass is no luck.
settings.register_profile("tfmerge", derandomize=True, database=None, deadline=None)
settings.load_profile("tfmerge")

REPO = Path(__file__).resolve().parent.parent
HYAUDIO = REPO.parent / "shared" / "fixtures" / "hyaudio" / "hyaudio.pb"

_GRACE_SECONDS = 5.0


def _child_pids() -> set[int]:
    me = os.getpid()
    children: set[int] = set()
    for task in Path(f"/proc/{me}/task").iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        children.update(int(pid) for pid in text.split())
    # Zombies already reaped by nobody still count: they are ours until waited for.
    return children


@pytest.fixture(autouse=True)
def no_leaked_threads_or_children() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = _child_pids()
    yield
    deadline = time.monotonic() + _GRACE_SECONDS
    while True:
        leaked_threads = [
            t for t in threading.enumerate() if t not in threads_before and t.is_alive()
        ]
        leaked_children = _child_pids() - children_before
        if not leaked_threads and not leaked_children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if leaked_threads:
        problems.append(f"threads left running: {[t.name for t in leaked_threads]}")
    if leaked_children:
        problems.append(f"child processes left running: {sorted(leaked_children)}")
    pytest.fail("; ".join(problems))


@pytest.fixture(scope="session")
def faultfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/faultfs.c built for LD_PRELOAD: writes that fail, folders that are read-only."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the fault-injection library")
    library = tmp_path_factory.mktemp("faultfs") / "faultfs.so"
    source = Path(__file__).resolve().parent / "faultfs.c"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
        check=True,
    )
    return library
