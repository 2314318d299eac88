"""How far float outputs move between TensorFlow session settings: the numeric contract's basis.

Freezes real architectures (``bench/numeric_models.py``) and runs every frozen graph on a
fixed input under ten settings, each in a fresh process: tfmerge's own check
(``check_session_config``: Grappler and the classic optimiser off) and TensorFlow's defaults
(as TensorFlow Serving runs), each with oneDNN on and off, with oneDNN held to AVX2 or SSE4.1,
with 1 or 8 threads. Then every pair of settings is compared, per model and output:

- the largest absolute difference, the largest relative difference ``|a - b| / |b|`` and the
  largest difference in ulps;
- the worst ratio ``|a - b| / (atol + rtol |b|)`` under tfmerge's tolerance for the dtype
  (``tfmerge.tolerance``; at most 1 means the contract holds, its inverse is the margin) and
  under a few candidate tolerances;
- the ``rtol`` each ``atol`` would need.

Usage: ``python -m bench.numeric [--work DIR] [--models a,b] [--settings a,b] [--rerun]
[--refreeze] [--json FILE]``. The first run takes about 7 minutes on 2 cores, 3 of them
freezing; the frozen graphs and the outputs are kept under WORK (default
``bench/.work/numeric``), so a second run only compares (seconds). ``--rerun`` runs the
settings again on the kept graphs; ``--refreeze`` freezes them again too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.launch import environment
from bench.numeric_models import MODELS, SETTINGS, freeze, run_setting
from bench.sets import ROOT, WORK
from tfmerge.tolerance import DEFAULT_TOLERANCES

#: Candidate (rtol, atol) per dtype, next to tfmerge's own.
CANDIDATES = {
    "float16": [(1e-3, 1e-3), (1e-2, 1e-2), (2e-2, 2e-2), (1e-2, 5e-2)],
    "bfloat16": [(1e-2, 1e-2), (2e-2, 2e-2), (5e-2, 5e-2)],
    "float32": [(1e-5, 1e-5), (1e-4, 1e-4), (1e-3, 1e-4), (1e-4, 1e-3)],
    "float64": [(1e-12, 1e-14), (1e-11, 1e-13), (1e-10, 1e-12)],
}
ATOLS = {
    "float16": [0.0, 1e-4, 1e-3, 1e-2, 3e-2],
    "bfloat16": [0.0, 1e-3, 1e-2, 1e-1],
    "float32": [0.0, 1e-6, 1e-5, 1e-4, 1e-3],
    "float64": [0.0, 1e-15, 1e-14, 1e-13, 1e-12],
}
_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}
_UINT = {16: np.uint16, 32: np.uint32, 64: np.uint64}
_CHILD_ENV = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _child(work: Path, stage: str, names: list[str], env: dict[str, str]) -> float:
    """Run one stage in a fresh process with exactly env's oneDNN variables; its seconds."""
    clean = {k: v for k, v in environment().items() if k not in _CHILD_ENV}
    command = [sys.executable, "-m", "bench.numeric", "--work", str(work)]
    command += ["--models", ",".join(names), "--stage", stage]
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, env={**clean, **env}, check=True)
    return time.monotonic() - started


def _cached(work: Path, setting: str, names: list[str]) -> bool:
    report = work / "runs" / setting / "report.json"
    return report.exists() and set(names) <= set(json.loads(report.read_text())["models"])


# --------------------------------------------------------------------------- comparison


def _load(path: Path, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """An output's values (floats widened to float64) and its raw bits."""
    raw = np.load(path, allow_pickle=False)
    if dtype == "bfloat16":
        bits = raw.astype(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64), bits
    if raw.dtype.kind == "f":
        return raw.astype(np.float64), raw.view(_UINT[raw.dtype.itemsize * 8])
    return raw, raw


def _ulps(a_bits: np.ndarray, b_bits: np.ndarray, width: int) -> np.ndarray:
    """Distance in representable values between floats given by their bits (+0 equals -0)."""
    a, b = a_bits.astype(np.uint64), b_bits.astype(np.uint64)
    sign = np.uint64(1) << np.uint64(width - 1)
    magnitude = sign - np.uint64(1)
    a_mag, b_mag = a & magnitude, b & magnitude
    same_sign = (a & sign) == (b & sign)
    apart = np.where(a_mag >= b_mag, a_mag - b_mag, b_mag - a_mag)
    return np.where(same_sign, apart, a_mag + b_mag)


def compare(
    other: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray], dtype: str
) -> dict[str, Any]:
    """How far other is from reference, the ``expected`` side of the contract."""
    (a, a_bits), (b, b_bits) = other, reference
    if dtype not in _BITS:
        return {"exact": bool(np.array_equal(a, b))}
    smallest = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).tiny)
    gap = np.abs(a - b)
    size = np.abs(b)
    contract = DEFAULT_TOLERANCES[dtype]
    candidates = [(contract.rtol, contract.atol), *CANDIDATES[dtype]]
    return {
        "exact": bool(np.array_equal(a_bits, b_bits)),
        "max_abs": float(gap.max()),
        "max_rel": float((gap / np.maximum(size, smallest)).max()),
        "max_ulp": int(_ulps(a_bits, b_bits, _BITS[dtype]).max()),
        "ratio": {f"{r:g}/{t:g}": float((gap / (t + r * size)).max()) for r, t in candidates},
        "rtol_needed": {
            f"{t:g}": float((np.maximum(gap - t, 0.0) / np.maximum(size, smallest)).max())
            for t in ATOLS[dtype]
        },
    }


def analyse(work: Path, names: list[str], settings: list[str]) -> list[dict[str, Any]]:
    """One row per model, output and pair of settings."""
    reports = {
        s: json.loads((work / "runs" / s / "report.json").read_text())["models"] for s in settings
    }
    rows = []
    for name in names:
        ran = [s for s in settings if "error" not in reports[s][name]]
        for setting in settings:
            entry = reports[setting][name]
            if "error" in entry:
                print(f"  {name} [{setting}]: {entry['error'][:160]}")
            elif not entry.get("rerun_identical", True):
                print(f"  {name} [{setting}]: a second run in the same session differed")
        if not ran:
            continue
        for output, dtype in sorted(reports[ran[0]][name]["dtypes"].items()):
            loaded = {s: _load(work / "runs" / s / f"{name}.{output}.npy", dtype) for s in ran}
            for reference, other in itertools.combinations(ran, 2):
                row = {"model": name, "output": output, "dtype": dtype}
                row |= {"reference": reference, "other": other}
                rows.append(row | compare(loaded[other], loaded[reference], dtype))
    return rows


# --------------------------------------------------------------------------- report


def _worst(rows: Iterable[dict[str, Any]], key: Any) -> dict[str, Any]:
    return max(rows, key=key)


def _pair(row: dict[str, Any]) -> str:
    return f"{row['model']}.{row['output']}, {row['reference']} vs {row['other']}"


def print_report(rows: list[dict[str, Any]], settings: list[str]) -> None:
    print("\n== Pairs of settings whose outputs differ at all ==")
    differing: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        if not row["exact"]:
            pair = (row["reference"], row["other"])
            differing.setdefault(pair, set()).add(f"{row['model']}.{row['output']}")
    for pair in itertools.combinations(settings, 2):
        found = differing.get(pair)
        print(f"  {pair[0]:>14} vs {pair[1]:<14}: {f'{len(found)} outputs' if found else 'same'}")

    print("\n== Each float output: its worst pair ==")
    print(f"  {'model.output':30} {'dtype':9} {'max abs':>9} {'max rel':>9} {'ulps':>8}  pair")
    outputs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        outputs.setdefault((row["model"], row["output"]), []).append(row)
    for (model, output), group in outputs.items():
        if "max_abs" not in group[0]:
            verdict = "exact" if all(r["exact"] for r in group) else "DIFFERS"
            print(f"  {model + '.' + output:30} {group[0]['dtype']:9} {verdict:>9}")
            continue
        worst = _worst(group, lambda r: r["max_abs"])
        print(
            f"  {model + '.' + output:30} {group[0]['dtype']:9} {worst['max_abs']:9.3g}"
            f" {max(r['max_rel'] for r in group):9.3g} {max(r['max_ulp'] for r in group):8d}"
            f"  {worst['reference']} vs {worst['other']}"
        )

    print("\n== Each float dtype over every model, output and pair ==")
    for dtype in _BITS:
        group = [r for r in rows if r["dtype"] == dtype and "max_abs" in r]
        if not group:
            continue
        contract = DEFAULT_TOLERANCES[dtype]
        print(
            f"  {dtype}: max abs {max(r['max_abs'] for r in group):.3g},"
            f" max rel {max(r['max_rel'] for r in group):.3g},"
            f" max ulps {max(r['max_ulp'] for r in group)};"
            f" tfmerge's tolerance rtol {contract.rtol:g}, atol {contract.atol:g}"
        )
        for atol in group[0]["rtol_needed"]:
            worst = _worst(group, lambda r, t=atol: r["rtol_needed"][t])
            needed = worst["rtol_needed"][atol]
            print(f"    atol {atol:>6}: rtol needed {needed:.3g}  ({_pair(worst)})")
        for candidate in group[0]["ratio"]:
            worst = _worst(group, lambda r, c=candidate: r["ratio"][c])
            ratio = worst["ratio"][candidate]
            verdict = "holds" if ratio <= 1 else "FAILS"
            margin = f"margin x{1 / ratio:.3g}" if ratio else "never reached"
            mark = " (tfmerge)" if candidate == f"{contract.rtol:g}/{contract.atol:g}" else ""
            print(
                f"    rtol/atol {candidate:>12}{mark}: worst |a-b|/(atol+rtol|b|) {ratio:.3g},"
                f" {verdict}, {margin}  ({_pair(worst)})"
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.numeric", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--work", type=Path, default=WORK / "numeric")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rerun", action="store_true", help="run the settings again")
    parser.add_argument("--refreeze", action="store_true", help="freeze the graphs again")
    parser.add_argument("--json", type=Path, help="write every compared pair here")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # freeze or run:SETTING, in a child
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(names) - set(MODELS)) + sorted(set(settings) - set(SETTINGS))
    if unknown:
        print(f"unknown models or settings: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.stage == "freeze":
        freeze(args.work, names)
        return 0
    if args.stage is not None:
        run_setting(args.work, args.stage.removeprefix("run:"), names)
        return 0

    started = time.monotonic()
    if args.refreeze:
        for name in names:
            for suffix in (".json", ".pb", ".input.npy"):
                (args.work / "build" / f"{name}{suffix}").unlink(missing_ok=True)
    seconds = _child(args.work, "freeze", names, {"TF_ENABLE_ONEDNN_OPTS": "0"})
    print(f"graphs in {args.work / 'build'} ({seconds:.0f} s)", flush=True)
    for setting in settings:
        if args.rerun or args.refreeze or not _cached(args.work, setting, names):
            seconds = _child(args.work, f"run:{setting}", names, SETTINGS[setting][1])
            print(f"setting {setting:14} {json.dumps(SETTINGS[setting][1])}: {seconds:.0f} s")
    rows = analyse(args.work, names, settings)
    print_report(rows, settings)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
