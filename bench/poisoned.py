"""Each poisoned graph next to a good one, under the real daemon with its default limits.

    python -m bench.poisoned [--only NAME,...] [--json PATH]
    python -m bench.poisoned --from-json PATH     # write docs/benchmarks-poisoned.md again

For each graph of tests/poisongraphs.py: a daemon is started on an empty frozen_dir and left
to warm its worker; then the poisoned graph and a good model (a small dense classifier) are
renamed into frozen_dir together. Measured: the time from that moment to the daemon's
``version_published`` for the good model (the 2 s quiet period included), the build's own
time (``build_started`` to ``version_published``), the peak resident memory (VmHWM) of every
worker of that build, sampled every 20 ms, and how the poisoned graph was refused. The
baseline is the good model alone. [check] is left at its defaults (60 s, 4 GiB, 1 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.daemon import event_time, proc_status, start_daemon, wait_warm_worker, workers
from bench.sets import ROOT, WORK, human_bytes

sys.path.insert(0, str(ROOT / "tests"))

import graphgen
import poisongraphs as pg

OUT = WORK / "poisoned"


def _poisons(root: Path) -> dict[str, Callable[[Path], Any]]:
    fifo = root / "never-written"
    if not fifo.exists():
        os.mkfifo(fifo)
    return {
        "huge_placeholder": pg.huge_placeholder,
        "big_placeholder": pg.big_placeholder,
        "recursion": pg.recursion,
        "recursion_stateful": lambda p: pg.recursion(p, "StatefulPartitionedCall"),
        "recursion_by_name": lambda p: pg.recursion(p, "direct"),
        "deep_calls": lambda p: pg.deep_calls(p, 5000),
        "while_true_v1": lambda p: pg.while_true(p, v2=False),
        "while_true_v2": lambda p: pg.while_true(p, v2=True),
        "splat_constant": pg.splat_constant,
        "fill": pg.fill,
        "fill_dynamic": pg.fill_dynamic,
        "list_growth": pg.list_growth,
        "abort": pg.abort,
        "fifo_reader": lambda p: pg.fifo_reader(p, fifo),
    }


class PeakWatch:
    """Samples VmHWM of the daemon's workers until stopped; keeps each one's last value."""

    def __init__(self, daemon_pid: int) -> None:
        self._pid = daemon_pid
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in workers(self._pid):
                try:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), proc_status(pid)["VmHWM"])
                except (OSError, KeyError):
                    continue
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(name: str, write: Callable[[Path], Any] | None, good: Path) -> dict[str, Any]:
    project = OUT / name
    shutil.rmtree(project, ignore_errors=True)
    for folder in ("frozen", "serving", "state", "incoming"):
        (project / folder).mkdir(parents=True)
    config = project / "tfmerge.toml"
    config.write_text(
        'frozen_dir = "frozen"\nserving_dir = "serving"\nstate_dir = "state"\n'
        'allow_ops = ["Abort", "ReadFile"]\n'
        '[watch]\nquiet_seconds = 2.0\n[worker]\nwarm = true\n[log]\nformat = "json"\n'
    )
    files = {"good.pb": good}
    if write is not None:
        written = write(project / "incoming" / f"{name}.pb")
        files[f"{name}.pb"] = written if isinstance(written, Path) else written.path
    with start_daemon(config) as daemon:
        daemon.wait_ready()
        wait_warm_worker(daemon)
        watch = PeakWatch(daemon.process.pid)
        mark = daemon.mark()
        dropped = time.time()
        for target, source in files.items():
            staged = project / "frozen" / f".{target}.upload"
            shutil.copyfile(source, staged)
            staged.rename(project / "frozen" / target)
        published = daemon.wait_for("version_published", since=mark, timeout=900)
        watch.stop()  # before the next warm worker starts
        finished = daemon.wait_for("build_finished", since=mark, timeout=900)
        events = daemon.events[mark:]
    started = next(e for e in events if e.get("event") == "build_started")
    refused = [e for e in events if e.get("event") == "model_rejected"]
    return {
        "graph": name,
        "size": files.get(f"{name}.pb", good).stat().st_size if write else None,
        "published": published["signatures"],
        "to_version_seconds": round(event_time(published) - dropped, 2),
        "build_seconds": round(event_time(published) - event_time(started), 2),
        "workers": len(watch.peaks),
        "worker_peak_bytes": max(watch.peaks.values(), default=0),
        "refused": [(e.get("file"), e.get("code")) for e in refused],
        "replaced": [e.get("reason") for e in events if e.get("event") == "worker_replaced"],
        "outcome": finished["outcome"],
        "host": _host(),
    }


def _host() -> dict[str, Any]:
    memory = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


#: What each graph is, for the page.
_WHAT = {
    "baseline": "the good model alone",
    "huge_placeholder": "an input of float32 [1e6, 1e6, 1000]",
    "big_placeholder": "an input of float32 [30000, 30000]",
    "recursion": "a function calling itself (PartitionedCall)",
    "recursion_stateful": "the same through StatefulPartitionedCall",
    "recursion_by_name": "the same, called by name",
    "deep_calls": "5000 functions, each calling the next",
    "while_true_v1": "while True (TF1 loop)",
    "while_true_v2": "while True (TF2 StatelessWhile)",
    "splat_constant": "a 12 GB constant written as one float",
    "fill": "Fill of 6 GB, constant dimensions",
    "fill_dynamic": "Fill of 6 GB, dimensions known at run time",
    "list_growth": "a TensorList growing 1 MiB a step, forever",
    "abort": "an Abort op (allow_ops): SIGABRT",
    "fifo_reader": "ReadFile of a pipe no one writes (allow_ops)",
}


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        refused = ", ".join(f"`{code}`" for _file, code in r["refused"]) or "none"
        size = "" if r["size"] is None else f"{r['size']:,}"
        rows.append(
            f"| `{r['graph']}` | {_WHAT.get(r['graph'], '')} | {size} | {refused} | "
            f"{r['to_version_seconds']:.2f} | {r['build_seconds']:.2f} | {r['workers']} | "
            f"{human_bytes(r['worker_peak_bytes'])} |"
        )
    table = "\n".join(rows)
    by_name = {r["graph"]: r for r in results}
    idle = by_name.get("baseline", {}).get("worker_peak_bytes", 0)
    aborted = by_name.get("abort", {}).get("build_seconds", 0.0)
    replacement = max(0.0, aborted - by_name.get("baseline", {}).get("build_seconds", 0.0))
    host = results[0].get("host", {})
    measured = (
        f"Measured on {host.get('date')} on a host of {host.get('cpus')} cores and "
        f"{human_bytes(host.get('memory_bytes', 0))}, TensorFlow 2.21 on the CPU."
    )
    return f"""# Poisoned graphs: what one costs the others

Each graph of `tests/poisongraphs.py` was dropped into `frozen_dir` together with a good
model (a small dense classifier), under a running `tfmerge run` with a warm worker and the
default [`[check]`](config.md#check) limits (60 s, 4 GiB, 1 GiB). In every case the good
model was published in that same build, and the poisoned graph refused with the code shown.
{measured}

- **to version**: from the rename of both files into `frozen_dir` to `version_published`,
  the 2 s quiet period included.
- **build**: `build_started` to `version_published`.
- **workers**: the workers seen during the build, the next warm one included; 3 means one
  was replaced (`worker_replaced`) and a fresh one finished the build.
- **peak**: the largest VmHWM (peak resident memory) of those workers, sampled every 20 ms.
  A worker that checks only the good model peaks at {human_bytes(idle)} (`baseline`).

| graph | what it is | bytes | refused as | to version (s) | build (s) | workers | peak |
|---|---|---:|---|---:|---:|---:|---:|
{table}

The static refusals (`probe_too_large`, `recursive_function`, `tensor_too_large`) cost the
build a fraction of a second and no memory. The two loops that never end cost the model's
`seconds` (60 s by default), after which the probe run fails with `DeadlineExceeded`; a
model's `limits.seconds` shortens or lengthens that. `fill_dynamic` fails at once under the
memory window; `list_growth` grows to the window (4 GiB above what the worker held) and then
fails with `ResourceExhausted`, where the kernel's out-of-memory killer would otherwise
have ended the worker. `abort` costs a worker: its SIGABRT is pinned on it and a fresh
worker (its start and TensorFlow's import: the build took {replacement:.1f} s longer
than `baseline`) finishes the build. `fifo_reader` is one kernel
that ignores the run's deadline, so the daemon ends the worker once the step has taken one
and a half times the model's `seconds` and 2 s more (92 s), then goes on in a fresh one.
Each of these refusals is remembered: the next build refuses the same bytes without
running them.

Regenerate with `python -m bench.poisoned` (about 5 minutes: the two loops and the pipe
each take their full time), then `python -m bench.poisoned --from-json
bench/.work/poisoned/results.json`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated graph names")
    parser.add_argument("--json", type=Path, default=OUT / "results.json")
    parser.add_argument("--from-json", type=Path, help="render the page from a saved run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-poisoned.md")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        args.out.write_text(render(json.loads(args.from_json.read_text())))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    good = graphgen.write_dense(OUT / "good.pb", seed=90, in_dim=6).path
    poisons = _poisons(OUT)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or ["baseline", *poisons]
    results = []
    for name in chosen:
        result = measure(name, poisons.get(name), good)
        results.append(result)
        print(
            f"{name:20} {result['to_version_seconds']:7.2f} s to the version, build "
            f"{result['build_seconds']:7.2f} s, {result['workers']} worker(s), peak "
            f"{human_bytes(result['worker_peak_bytes'])}, {result['refused']}",
            flush=True,
        )
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
