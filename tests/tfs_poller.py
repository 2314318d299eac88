"""A stand-in for TensorFlow Serving's file system source and loader, run as a separate process.

Every ``--interval`` seconds it lists the base path, keeps only children whose whole name
parses as an integer, and when the highest changes it loads that version with the SavedModel
loader (tag ``serve``) and runs every signature once on zeros of the signature's dtypes and
shapes, exactly as a first request would. Any load or run failure is recorded. It writes its
progress to ``--report`` (JSON, replaced atomically) and stops when ``--stop`` exists.

Usage: python tests/tfs_poller.py BASE --report R.json --stop STOPFILE [--interval 0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

_INTEGER = re.compile(r"^[0-9]+$")


def highest(base: Path) -> int | None:
    numbers = [int(p.name) for p in base.iterdir() if _INTEGER.match(p.name)]
    return max(numbers) if numbers else None


def zeros_for(info: Any) -> np.ndarray:
    dtype = tf.dtypes.as_dtype(info.dtype)
    if info.tensor_shape.unknown_rank:
        shape: tuple[int, ...] = (1,)
    else:
        shape = tuple(1 if d.size < 0 else d.size for d in info.tensor_shape.dim)
    if dtype == tf.string:
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=dtype.as_numpy_dtype)


def load_and_run(version_dir: Path) -> int:
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(version_dir))
        ran = 0
        for name, signature in meta.signature_def.items():
            if name.startswith("__"):
                continue
            fetches = {k: v.name for k, v in signature.outputs.items()}
            feeds = {v.name: zeros_for(v) for v in signature.inputs.values()}
            session.run(fetches, feed_dict=feeds)
            ran += 1
    return ran


def write_report(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base", type=Path)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--stop", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    report: dict[str, Any] = {"loaded": [], "failures": [], "signatures_run": 0, "ready": True}
    write_report(args.report, report)
    current = None
    while not args.stop.exists():
        try:
            number = highest(args.base)
        except FileNotFoundError:
            number = None
        if number is not None and number != current:
            current = number
            try:
                report["signatures_run"] += load_and_run(args.base / str(number))
                report["loaded"].append(number)
            except Exception as exc:  # noqa: BLE001 - any failure to load or run is what we count
                report["failures"].append(
                    {"version": number, "error": f"{type(exc).__name__}: {exc}"}
                )
            write_report(args.report, report)
        time.sleep(args.interval)
    write_report(args.report, report)


if __name__ == "__main__":
    main()
