"""Many models and real architectures: full build, one-model rebuild, load, time to live.

``python -m bench.scale`` from the repository root measures, on the many-models sets (N10 ...
N1000, bench/manyset.py) and on the real-architecture set (REAL, bench/fieldset.py):

- the full build of ``tfmerge build`` (fresh state) and of the naive merge, whole command and
  build step, alternating which goes first from run to run;
- tfmerge's rebuild after one model changed (the state of the full build kept); the naive
  merge has no such thing and merges everything again, so its full build is its rebuild;
- the load of each tool's version as TensorFlow Serving loads it (bench/serveload.py: the C++
  loader, TensorFlow's default session options), its memory, and the first request of every
  signature;
- with ``--live``, the daemon's time to live on N500: warm, 500 models served, one replaced.

Results go to ``bench/.work/scale-<time>.json``; ``--out`` writes the section of
docs/benchmarks.md between its ``scale`` markers and the plot beside it
(bench/scalereport.py). ``--from-json`` renders a saved run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import compare, daemon, machine, manyset, scalereport
from bench.launch import measure
from bench.sets import ROOT, SETS, WORK, ModelSet, ensure

MANY = ("N10", "N50", "N100", "N500", "N1000")
_TIMEOUT_SECONDS = 3600.0


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _project(model_set: ModelSet, project: Path) -> Path:
    """A tfmerge project on its own copy of the set's frozen folder (hard links: one model
    can be replaced without touching the set), every model declared."""
    config = compare.write_tfmerge_config(model_set.root, project)
    frozen = project / "frozen"
    shutil.copytree(model_set.frozen_dir, frozen, copy_function=os.link)
    text = config.read_text().splitlines()
    text[0] = f"frozen_dir = {json.dumps(str(frozen))}"
    config.write_text("\n".join(text) + "\n")
    return config


def _tfmerge(config: Path) -> dict[str, Any]:
    tfmerge = Path(sys.executable).parent / "tfmerge"
    run = measure(
        [str(tfmerge), "build", "-c", str(config)],
        cwd=config.parent,
        check=False,
        timeout=_TIMEOUT_SECONDS,
    )
    events = compare._events(run.stdout, "build_finished")
    event = events[-1] if events else {}
    version = event.get("version")
    report: dict[str, Any] = {
        "command_seconds": run.wall_seconds,
        "cpu_seconds": run.cpu_seconds,
        "peak_rss": run.peak_rss_bytes,
        "ok": run.returncode == 0 and event.get("outcome") == "published",
        "durations": event.get("durations", {}),
        "build_seconds": event.get("durations", {}).get("total"),
        "version": None if version is None else str(config.parent / "serving" / str(version)),
    }
    if report["version"]:
        manifest = Path(report["version"]) / "assets.extra" / "tfmerge.json"
        report["stats"] = json.loads(manifest.read_text()).get("stats", {})
    if not report["ok"]:
        report["error"] = (run.stdout + run.stderr)[-1500:]
    return report


def _serve_load(version: str) -> dict[str, Any]:
    run = measure(
        [sys.executable, "-m", "bench.serveload", version],
        cwd=ROOT,
        check=False,
        timeout=_TIMEOUT_SECONDS,
    )
    answer = compare._last_json(run.stdout)
    if run.returncode != 0 or not answer:
        return {"error": (run.stderr or run.stdout)[-1500:]}
    return answer


def run_many(model_set: ModelSet, runs: int, loads: bool) -> dict[str, Any]:
    """Alternating runs of tfmerge (full build, then one model changed) and the naive merge."""
    work = WORK / "runs" / f"scale-{model_set.spec.name}"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "count": model_set.spec.count,
        "input_bytes": model_set.input_bytes(),
        "runs": [],
    }
    changed = model_set.spec.count // 2
    for index in range(runs):
        load = os.getloadavg()[0]
        order = ("tfmerge", "naive") if index % 2 == 0 else ("naive", "tfmerge")
        entry: dict[str, Any] = {"load": load}
        for tool in order:
            if tool == "naive":
                naive, export = compare.naive(model_set, work)
                entry["naive"] = dict(vars(naive))
                if loads and index == 0 and naive.ok:
                    entry["naive_load"] = _serve_load(str(export))
                shutil.rmtree(export, ignore_errors=True)
                continue
            project = work / "tfmerge"
            config = _project(model_set, project)
            entry["tfmerge"] = full = _tfmerge(config)
            if index == 0 and full["ok"] and model_set.spec.kind == "many":
                entry["checked"] = compare.check_published(model_set, Path(full["version"]))
            if loads and index == 0 and full["ok"]:
                entry["tfmerge_load"] = _serve_load(full["version"])
            if model_set.spec.kind == "many":
                manyset.change_one(project / "frozen", changed, salt=index)
                entry["rebuild"] = _tfmerge(config)
            shutil.rmtree(project, ignore_errors=True)
        result["runs"].append(entry)
        _log(f"  {model_set.spec.name} run {index + 1}/{runs}: " + _summary(entry))
    return result


def _summary(entry: dict[str, Any]) -> str:
    parts = []
    for key in ("tfmerge", "rebuild", "naive"):
        if key not in entry:
            continue
        run = entry[key]
        step = run.get("build_seconds")
        parts.append(
            f"{key} {run.get('command_seconds', 0):.2f} s"
            f" (step {step if step is None else round(step, 2)} s)"
            f"{'' if run.get('ok') else ' FAILED'}"
        )
    return "; ".join(parts)


def run_live(runs: int) -> list[dict[str, Any]]:
    model_set = ensure(SETS["N500"], 0)
    found = []
    for index in range(runs):
        project = WORK / "runs" / "scale-live"
        run = daemon.time_to_live_replacing_one(model_set, project, index=250, salt=index)
        found.append(run)
        _log(
            f"  N500 live run {index + 1}/{runs}: {run['ttl_seconds']:.2f} s after the last close"
            f" ({run['beyond_quiet']:.2f} s beyond the quiet period)"
        )
    return found


def measure_all(args: argparse.Namespace, saved: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "command": "python -m bench.scale " + " ".join(sys.argv[1:]),
        "runs": args.runs,
        "sets": {},
    }
    for name in args.sets:
        model_set = ensure(SETS[name], 0)
        _log(f"set {name}: {model_set.spec.count} models, {model_set.input_bytes():,} bytes")
        loads = name in args.loads
        results["sets"][name] = run_many(model_set, args.runs, loads)
        _save(results, saved)
    if args.live:
        _log("daemon: time to live on N500, one model replaced")
        results["live"] = run_live(args.runs)
    results["machine"]["load_end"] = os.getloadavg()
    _save(results, saved)
    return results


def _save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    partial.replace(path)


def _names(text: str) -> list[str]:
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*MANY, "REAL")]
    if unknown:
        raise argparse.ArgumentTypeError(f"sets are among {', '.join((*MANY, 'REAL'))}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--sets", type=_names, default=[*MANY, "REAL"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--loads",
        type=_names,
        default=["N50", "N100", "N500", "N1000"],
        help="sets whose versions are loaded as TensorFlow Serving loads them (first run only)",
    )
    parser.add_argument("--live", action="store_true", help="the daemon's time to live on N500")
    parser.add_argument("--out", type=Path, help="the page whose scale section to write")
    parser.add_argument("--from-json", type=Path, help="render a saved run; measure nothing")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        saved = WORK / f"scale-{time.strftime('%Y%m%dT%H%M%S')}.json"
        _log(f"raw results go to {saved.relative_to(ROOT)}")
        results = measure_all(args, saved)
    if args.out is not None:
        scalereport.write(results, args.out)
        _log(f"wrote the scale section of {args.out}")
    for name, value, ok in scalereport.targets(results):
        _log(f"{'met   ' if ok else 'MISSED' if ok is not None else '  -   '} {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
