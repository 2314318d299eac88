"""What moving large constants into ``variables/`` costs TensorFlow Serving's load.

Builds one set twice with tfmerge: as it publishes (constants of 1 MiB or more in
``variables/``) and with every constant left inside ``saved_model.pb`` (possible below the
2 GiB cap only). Each version is then loaded the way TensorFlow Serving loads it, in a fresh
process: the SavedModel loader in a session with default options (Grappler on), then one run
of every signature, as a warmup replay would. Reported: wall time of load + first runs,
and the peak resident memory of the process.

Usage: python -m bench.load_cost SET_DIR [SET_DIR ...] --work WORK [--runs 3] [--out PAGE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.compare import write_tfmerge_config

_BUILD = """
import sys
from tfmerge.build import constants
from tfmerge.cli import main
if sys.argv[2] == "inline":
    constants.LARGE_CONSTANT_BYTES = 1 << 62
raise SystemExit(main(["build", "-c", sys.argv[1]]))
"""

_LOAD = """
import json, resource, sys, time, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
started = time.monotonic()
with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], sys.argv[1])
    loaded = time.monotonic()
    for name, signature in meta.signature_def.items():
        feeds = {}
        for info in signature.inputs.values():
            shape = [1 if d.size < 0 else d.size for d in info.tensor_shape.dim]
            feeds[info.name] = np.zeros(shape, tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
        session.run({k: v.name for k, v in signature.outputs.items()}, feed_dict=feeds)
    ran = time.monotonic()
print(json.dumps({"load": loaded - started, "first_runs": ran - loaded,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(set_dir: Path, project: Path, mode: str) -> Path:
    config = write_tfmerge_config(set_dir, project)
    subprocess.run(
        [sys.executable, "-c", _BUILD, str(config), mode],
        cwd=project,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return project / "serving" / "1"


def load(version: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, str(version)],
        check=True,
        capture_output=True,
        text=True,
    )
    value: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return value


def measure(set_dir: Path, work: Path, runs: int) -> dict[str, Any]:
    report: dict[str, Any] = {"set": set_dir.name}
    for mode in ("variables", "inline"):
        version = build(set_dir, work / mode, mode)
        pb = (version / "saved_model.pb").stat().st_size
        samples = [load(version) for _ in range(runs)]
        report[mode] = {
            "saved_model_bytes": pb,
            "load": statistics.median(s["load"] for s in samples),
            "first_runs": statistics.median(s["first_runs"] for s in samples),
            "peak_mib": statistics.median(s["peak_mib"] for s in samples),
        }
    return report


def _size(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB" if count >= 2**20 else f"{count / 2**10:,.1f} KiB"


def render(reports: list[dict[str, Any]], runs: int, command: str) -> str:
    lines = [
        "# What large constants in variables/ cost TensorFlow Serving's load",
        "",
        "tfmerge moves every numeric constant of 1 MiB or more out of `saved_model.pb` into the",
        "version's `variables/` (a TensorBundle the loader restores). Without that, a merged",
        "model past 2 GiB cannot be loaded at all; below it, this page measures what the move",
        "costs or saves. Each set is built twice by tfmerge, once as it publishes and once with",
        "every constant left in `saved_model.pb`, and each version is loaded in a fresh process",
        "as TensorFlow Serving loads it: the SavedModel loader in a session with default options",
        "(Grappler on), then one run of every signature, as the warmup replay does.",
        f"Medians of {runs} loads; peak RSS of the loading process.",
        "",
        (
            "| set | layout | saved_model.pb | load (s) | first run of every signature (s) "
            "| peak RSS (MiB) |"
        ),
        "|---|---|---:|---:|---:|---:|",
    ]
    for report in reports:
        for mode, label in (
            ("variables", "constants in variables/"),
            ("inline", "all in saved_model.pb"),
        ):
            row = report[mode]
            lines.append(
                f"| {report['set']} | {label} | {_size(row['saved_model_bytes'])} "
                f"| {row['load']:.2f} | {row['first_runs']:.2f} | {row['peak_mib']:,.0f} |"
            )
    lines += ["", "Regenerate with:", "", "```", command, "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("set_dirs", type=Path, nargs="+")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write this Markdown page")
    args = parser.parse_args()
    reports = [measure(d, args.work / d.name, args.runs) for d in args.set_dirs]
    print(json.dumps(reports, indent=2))
    if args.out is not None:
        command = "python -m bench.load_cost " + " ".join(sys.argv[1:])
        args.out.write_text(render(reports, args.runs, command))


if __name__ == "__main__":
    main()
