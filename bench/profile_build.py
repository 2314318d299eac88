"""Where ``tfmerge build`` spends its time and memory, step by step, in one process.

Usage: ``python -m bench.profile_build SET_DIR WORK_DIR [--cprofile FILE]``.
Runs the same build as ``tfmerge build`` (``pipeline.run_once`` with ``run.run_build``) with
its steps wrapped from the outside: wall time, the process's peak resident memory during the
step (VmHWM, reset on entry through /proc/self/clear_refs) and the peak of Python's own heap
(tracemalloc; protobuf and TensorFlow allocate outside it). Steps nest; every number is
inclusive of the steps inside it. The last line on stdout is JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CLEAR_REFS_RESET_PEAK = "5"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text(_CLEAR_REFS_RESET_PEAK)


@dataclass
class _Frame:
    step: str
    peak_rss: int = 0
    py_peak: int = 0


@dataclass
class Step:
    name: str
    depth: int
    calls: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    py_peak: int = 0
    rss_before: int = 0


@dataclass
class Recorder:
    steps: dict[str, Step] = field(default_factory=dict)
    stack: list[_Frame] = field(default_factory=list)

    def _fold_into_outer(self) -> None:
        """Before a nested step resets the peaks, the enclosing step keeps what it saw."""
        if self.stack:
            outer = self.stack[-1]
            outer.peak_rss = max(outer.peak_rss, _status("VmHWM"))
            outer.py_peak = max(outer.py_peak, tracemalloc.get_traced_memory()[1])

    def _timed_in_background(
        self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """A step in another thread overlaps the main thread's steps: only its time is its own.

        Resetting the process's peaks from here would corrupt the main thread's numbers.
        """
        step = self.steps.setdefault(name, Step(f"{name} (background thread)", 1))
        step.peak_rss = step.py_peak = step.rss_before = -1
        started = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            step.seconds += time.monotonic() - started
            step.calls += 1

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return self._timed_in_background(name, function, *args, **kwargs)
            self._fold_into_outer()
            step = self.steps.setdefault(name, Step(name, len(self.stack)))
            # A step reached at several depths is shown at the shallowest.
            step.depth = min(step.depth, len(self.stack))
            if step.calls == 0:
                step.rss_before = _status("VmRSS")
            frame = _Frame(name)
            self.stack.append(frame)
            _reset_peak_rss()
            tracemalloc.reset_peak()
            started = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                step.seconds += time.monotonic() - started
                step.calls += 1
                self.stack.pop()
                frame.peak_rss = max(frame.peak_rss, _status("VmHWM"))
                frame.py_peak = max(frame.py_peak, tracemalloc.get_traced_memory()[1])
                step.peak_rss = max(step.peak_rss, frame.peak_rss)
                step.py_peak = max(step.py_peak, frame.py_peak)
                if self.stack:
                    outer = self.stack[-1]
                    outer.peak_rss = max(outer.peak_rss, frame.peak_rss)
                    outer.py_peak = max(outer.py_peak, frame.py_peak)

        return wrapper


#: (module, attribute, step name), outermost first. A step the engine no longer has is skipped
#: and reported as such: the engine changes faster than this list.
_STEPS = (
    ("tfmerge.specs", "raw_fingerprint", "fingerprint the input files (sha256)"),
    ("tfmerge.build.run", "run_build", "worker side (check + merge + verify)"),
    ("tfmerge.build.writer", "Writer._copy_in", "check: copy an input into state_dir"),
    ("tfmerge.build.writer", "Writer.read", "check: wait for the copy, map, sha256, parse"),
    ("tfmerge.build.reading", "_Digest.join", "read: wait for the sha256"),
    ("tfmerge.build.reading", "_aligned", "read: align the constants for feeding"),
    ("tfmerge.folders.fs", "PendingFile.seal", "sync a file: kept copies, state records"),
    ("tfmerge.oppolicy", "check_ops", "check: op policy"),
    ("tfmerge.build.constants", "split_large_constants", "check: set large constants aside"),
    ("tfmerge.build.staticcheck", "check_library", "check: recursion in the function library"),
    ("tfmerge.build.verdicts", "Verdicts.get", "check: look up an earlier verdict"),
    ("tfmerge.build.signatures", "import_graph", "check: import into a graph (C API)"),
    ("tfmerge.build.probe", "run_graph", "check: run the source on the probe"),
    ("tfmerge.build.budget", "probe_run", "check: static sizes, then the probe in its budget"),
    ("tfmerge.build.quirks", "prepare", "check: clear devices, lift and set aside constants"),
    ("tfmerge.build.bundle", "DataWriter.append", "check: write a constant into variables/"),
    ("tfmerge.build.writer", "Writer.accept", "check: checksum or write the constants"),
    ("tfmerge.build.writer", "Writer._keep", "check: link an input into variables/"),
    ("tfmerge.build.writer", "Writer.finish", "wait for the writer thread"),
    ("tfmerge.build.verdicts", "Verdicts.flush", "write the new verdicts"),
    ("tfmerge.build.check", "release_memory", "check: release memory (gc, malloc_trim)"),
    ("tfmerge.build.merge", "merge", "merge: whole"),
    ("tfmerge.build.merge", "_merge_unit", "merge: rename, serialise one graph"),
    ("tfmerge.build.merge", "_externalise", "merge: constants to variable reads"),
    ("tfmerge.build.bundle", "write_index", "merge: write the variables index"),
    ("tfmerge.build.merge", "_write_chunks", "merge: write saved_model.pb"),
    ("tfmerge.build.verify", "verify", "verify: load and run every signature"),
    ("tfmerge.build.loader", "load_saved_model", "verify: the C++ SavedModel loader"),
    ("tfmerge.build.verify", "_run_group", "verify: one shared session call"),
    ("tfmerge.build.warmup", "write", "write the warmup requests"),
    ("tfmerge.build.run", "_write_manifest", "write the manifest"),
    ("tfmerge.build.writer", "Writer.close", "wait for the variables data on disk"),
    ("tfmerge.folders.publish", "publish", "publish: fsync and rename"),
)


def _instrument(recorder: Recorder) -> list[str]:
    """Wrap every step; returns the steps not found."""
    import importlib

    missing = []
    for module_name, attribute, name in _STEPS:
        owner: Any = importlib.import_module(module_name)
        *path, leaf = attribute.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        function = getattr(owner, leaf, None) if owner is not None else None
        if function is None:
            missing.append(f"{module_name}.{attribute}")
            continue
        setattr(owner, leaf, recorder.wrap(name, function))
    return missing


def _write_config(set_dir: Path, work: Path) -> Path:
    from bench.compare import write_tfmerge_config

    return write_tfmerge_config(set_dir, work)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("set_dir", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--cprofile", type=Path)
    args = parser.parse_args()
    from tfmerge import logs
    from tfmerge.config import load
    from tfmerge.daemon import pipeline

    started = time.monotonic()
    from tfmerge.build import run  # imports TensorFlow

    import_seconds = time.monotonic() - started
    config = load(_write_config(args.set_dir, args.work))
    logs.configure(fmt="json", level="warning", stream=io.StringIO())
    recorder = Recorder()
    missing = _instrument(recorder)
    tracemalloc.start()
    profiler = cProfile.Profile() if args.cprofile else None
    began = time.monotonic()
    if profiler is not None:
        profiler.enable()
    outcome = pipeline.run_once(config, run.run_build, trigger="profile")
    if profiler is not None:
        profiler.disable()
    total = time.monotonic() - began
    tracemalloc.stop()
    top: list[str] = []
    if profiler is not None and args.cprofile is not None:
        profiler.dump_stats(args.cprofile)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        top = text.getvalue().splitlines()
    report = {
        "outcome": outcome.outcome,
        "import_seconds": round(import_seconds, 3),
        "total_seconds": round(total, 3),
        # Each step reset VmHWM on entry: the run's peak is the largest a step saw.
        "peak_rss": max([_status("VmHWM"), *(s.peak_rss for s in recorder.steps.values())]),
        "steps": [vars(step) for step in recorder.steps.values()],
        "missing_steps": missing,
        "cprofile_top": top,
    }
    print(json.dumps(report))
    return 0 if outcome.outcome == "published" else 1


if __name__ == "__main__":
    raise SystemExit(main())
