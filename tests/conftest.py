"""Suite-wide fixtures: graphs shared by the whole run, and no thread or child process left
behind by any test."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import graphgen
from graphgen import FrozenModel

#: The repository root, for tests that read its files (README, docs, config).
REPO = Path(__file__).resolve().parent.parent

# Property tests draw the same examples on every run: a failure reproduces, a pass is no luck.
settings.register_profile("tfmerge", derandomize=True, database=None, deadline=None)
settings.load_profile("tfmerge")


_GRACE_SECONDS = 5.0


def _run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test run that every pytest-xdist worker sees (each has its own
    basetemp inside it), or the basetemp itself without workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tf2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[FrozenModel, FrozenModel]:
    """The two TF2 graphs whose function names collide, frozen once per run: each freeze is a
    fresh process importing TensorFlow, and the files are the same bytes every time."""
    folder = _run_folder(tmp_path_factory) / "tf2-pair"
    with _locked(folder.with_suffix(".lock")):
        done = folder / "frozen"
        if done.exists():
            return graphgen.tf2_models(folder)
        pair = graphgen.tf2_pair(folder)
        done.touch()
        return pair


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
