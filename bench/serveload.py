"""TensorFlow Serving's side of a version: its load, and the first request of every signature.

Usage: ``python -m bench.serveload VERSION_DIR``, in a process of its own that never imports
TensorFlow's Python package (tests/capi.py, the tests' own client of the C API by ctypes).
The version is loaded by ``TF_LoadSessionFromSavedModel``, the C++ loader TensorFlow Serving
runs, under TensorFlow's default session options (Grappler on), as the server loads it.
Then every signature is run once, one request each, as the server's warmup replay (one
request per signature) and the first real request of each signature run it; last, every
signature again in one call, as a MultiInference request would. The last line on stdout is
JSON: the load's wall and CPU seconds, the resident memory after it and the peak (VmHWM),
and the seconds of the first requests and of the one call.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return -1


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(version: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import capi

    report: dict[str, Any] = {"rss_before": _status_kib("VmRSS") * 1024}
    with capi.SavedModel(version) as model:
        report["load_seconds"] = model.load_seconds
        report["load_cpu_seconds"] = model.load_cpu_seconds
        report["rss_loaded"] = _status_kib("VmRSS") * 1024
        report["signatures"] = len(model.signatures)
        feeds = {name: capi.zeros_for(sig) for name, sig in model.signatures.items()}
        started, cpu = time.perf_counter(), _cpu()
        for name, values in feeds.items():
            model.run(name, values)
        report["first_requests_seconds"] = time.perf_counter() - started
        report["first_requests_cpu_seconds"] = _cpu() - cpu
        started = time.perf_counter()
        model.run_together(feeds)
        report["one_call_seconds"] = time.perf_counter() - started
    report["peak_rss"] = _status_kib("VmHWM") * 1024
    # The same first requests with Grappler off: what of their cost is Grappler's.
    with capi.SavedModel(version, capi.config_proto(grappler=False)) as model:
        started, cpu = time.perf_counter(), _cpu()
        for name, values in feeds.items():
            model.run(name, values)
        report["first_requests_no_grappler_seconds"] = time.perf_counter() - started
        report["first_requests_no_grappler_cpu_seconds"] = _cpu() - cpu
    return report


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]))))
