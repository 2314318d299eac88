"""``python -m bench``: measure, then write docs/benchmarks.md and its plot.

Run from the repository root. ``--from-json`` renders the page again from a saved run
without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import compare, daemon, machine, markdown, report, scalereport
from bench.launch import environment
from bench.sets import ROOT, SETS, WORK, ensure, human_bytes


def _parse_sets(text: str) -> list[str]:
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sets are among {', '.join(SETS)}; got {text!r}")
    return [n for n in SETS if n in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    default_sets = ",".join(n for n, s in SETS.items() if s.default)
    parser.add_argument(
        "--sets",
        type=_parse_sets,
        default=_parse_sets(default_sets),
        help=f"comma-separated, among {', '.join(SETS)} (default {default_sets}; XL is opt-in)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per set (default 3)")
    parser.add_argument(
        "--xl-runs", type=int, default=1, help="runs of XL, at most --runs (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated sets")
    parser.add_argument(
        "--out", type=Path, default=Path("docs/benchmarks.md"), help="the page to write"
    )
    parser.add_argument(
        "--no-live", action="store_true", help="skip the daemon's time to live and idle cost"
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the step profile of tfmerge build"
    )
    parser.add_argument("--from-json", type=Path, help="render a saved run; measure nothing")
    return parser


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _live(args: argparse.Namespace) -> dict[str, Any]:
    small = ensure(SETS["S"], args.seed)
    live: dict[str, Any] = {"quiet_seconds": daemon.QUIET_SECONDS, "cold": [], "warm": []}
    for index in range(args.runs):
        # Alternate the two settings so that neither always runs on a quieter machine.
        for mode, warm in (("cold", False), ("warm", True))[:: 1 if index % 2 == 0 else -1]:
            project = WORK / "runs" / f"live-{mode}"
            run = daemon.time_to_live(small, project, warm=warm)
            if index == 0:
                checked = compare.check_published(small, Path(run.published), discovered=True)
                live.setdefault("checked", {})[mode] = checked
            live[mode].append(asdict(run))
            _log(
                f"  S live warm={str(warm).lower()} run {index + 1}/{args.runs}: time to live"
                f" {run.ttl_seconds:.2f} s (settled {run.settled_seconds:.2f} s, build"
                f" {run.build_seconds:.2f} s)"
            )
    return live


def _profile(args: argparse.Namespace, name: str) -> dict[str, Any] | None:
    model_set = ensure(SETS[name], args.seed)
    work = WORK / "runs" / "profile"
    command = [sys.executable, "-m", "bench.profile_build", str(model_set.root), str(work)]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        _log(f"  profile failed: {done.stderr[-1000:]}")
        return None
    profile: dict[str, Any] = json.loads(lines[-1])
    profile["set"] = name
    return profile


def _save(results: dict[str, Any], path: Path) -> None:
    """Written after every part, so that a failure late in a long run keeps the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    partial.replace(path)


def measure_all(args: argparse.Namespace, saved: Path) -> dict[str, Any]:
    command = "python -m bench " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "python -m bench"
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "command": f".venv/bin/{command}",
        "runs": args.runs,
        "seed": args.seed,
        "sets": {},
    }
    for name in args.sets:
        spec = SETS[name]
        _log(f"set {name}: {spec.describe()} = {human_bytes(spec.total_bytes)}")
        model_set = ensure(spec, args.seed)
        count = min(args.runs, args.xl_runs) if name == "XL" else args.runs
        runs = compare.run_set(model_set, count, WORK / "runs" / name, log=_log)
        results["sets"][name] = asdict(runs)
        _save(results, saved)
    if not args.no_live:
        _log("daemon: time to live on S, warm = false and true")
        results["live"] = _live(args)
        _log(f"daemon: supervisor idle for {args.idle_seconds:g} s")
        results["idle"] = asdict(
            daemon.supervisor_idle(WORK / "runs" / "live-cold", args.idle_seconds)
        )
        _save(results, saved)
    # The smallest and the largest set: many small graphs and a few big ones cost differently.
    profiled = [n for n in args.sets if n != "XL"]
    results["profiles"] = []
    for name in sorted({profiled[0], profiled[-1]} if profiled and not args.no_profile else ()):
        _log(f"profile of tfmerge build on {name}")
        profile = _profile(args, name)
        if profile is not None:
            results["profiles"].append(profile)
    return results


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_path = out.with_suffix(".png")
    report.plot(results, plot_path)
    old = out.read_text() if out.exists() else ""
    # The section of python -m bench.scale stays as that command last wrote it.
    out.write_text(scalereport.keep_section(old, markdown.render(results, plot_path.name)))
    _log(f"wrote {out} and {plot_path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        started = time.monotonic()
        saved = WORK / f"results-{time.strftime('%Y%m%dT%H%M%S')}.json"
        _log(f"raw results go to {saved.relative_to(ROOT)}")
        results = measure_all(args, saved)
        results["elapsed_seconds"] = round(time.monotonic() - started, 1)
        results["machine"]["load_end"] = os.getloadavg()
        _save(results, saved)
    write(results, args.out)
    for name, value, ok in report.targets(results):
        _log(f"{'met   ' if ok else 'MISSED' if ok is not None else '  -   '} {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
