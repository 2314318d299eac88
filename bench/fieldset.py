"""Real architectures with random weights, and what publishing them costs in bytes and load time.

``write_set(folder)`` writes the set ``real`` of tests/fieldgraphs.py: MobileNetV2, ResNet50,
EfficientNetB0 and DenseNet121 at 224 x 224, a text model (strings -> lookup table ->
embedding -> LSTM in a functional While), a Transformer block and a TF1 graph with a
``dynamic_rnn`` GRU (v1 loops); 177 MB, the same bytes on every run. The folder has the
layout of bench/sets.py's sets: ``frozen/*.pb`` and ``models.json``.

``build(folder, project)`` publishes it with ``tfmerge build``; ``measure(versions, folder)``
gives each version's bytes against its inputs', and the time TensorFlow's C++ SavedModel
loader (the one TensorFlow Serving runs, through tests/capi.py) takes to load it, each load
in a fresh process with the files in the page cache, the versions taken in turn so that a
busy machine slows them all alike.

Usage: python -m bench.fieldset write DIR
       python -m bench.fieldset build DIR PROJECT [--tfmerge PATH] [--shard-constant-bytes N]
       python -m bench.fieldset measure DIR VERSION [VERSION ...] [--loads 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compare import write_tfmerge_config
from bench.launch import environment
from bench.sets import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import capi
import fieldgraphs

WARMUP = Path("assets.extra") / "tf_serving_warmup_requests"
# tfmerge build with another size from which an own-shard input's constants are restored.
_BUILD_WITH_FLOOR = """
import sys
from tfmerge.build import constants
from tfmerge.cli import main
constants.SHARD_CONSTANT_BYTES = int(sys.argv[2])
raise SystemExit(main(["build", "-c", sys.argv[1]]))
"""


def write_set(folder: Path) -> list[dict[str, Any]]:
    """The set's declarations; its files are generated (in a child process) if missing."""
    return fieldgraphs.write_set(folder, "real")


def build(
    folder: Path, project: Path, tfmerge: str | None = None, floor: int | None = None
) -> Path:
    """``tfmerge build`` of every model of the set into project/serving; the version's path.

    ``tfmerge``: another installation's executable (an older tfmerge); ``floor``: this
    checkout's tfmerge with SHARD_CONSTANT_BYTES set to it.
    """
    config = write_tfmerge_config(folder, project)
    if floor is not None:
        command = [sys.executable, "-c", _BUILD_WITH_FLOOR, str(config), str(floor)]
    else:
        executable = tfmerge or str(Path(sys.executable).with_name("tfmerge"))
        command = [executable, "build", "-c", str(config)]
    done = subprocess.run(
        command, cwd=project, env=environment(), capture_output=True, text=True, check=False
    )
    serving = project / "serving"
    versions = sorted((p for p in serving.iterdir() if p.name.isdigit()), key=_number)
    if done.returncode != 0 or not versions:
        raise RuntimeError(f"tfmerge build failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return versions[-1]


def _number(path: Path) -> int:
    return int(path.name)


def sizes(version: Path, frozen_dir: Path) -> dict[str, Any]:
    """The version's bytes (every file, hard-linked ones at full size) against its inputs'."""
    inputs = sum(p.stat().st_size for p in frozen_dir.glob("*.pb"))
    found = (p for p in version.rglob("*") if p.is_file())
    files = {str(p.relative_to(version)): p.stat().st_size for p in found}
    total = sum(files.values())
    warmup = files.get(str(WARMUP), 0)
    return {
        "version_bytes": total,
        "inputs_bytes": inputs,
        "overhead": round(total / inputs - 1, 4),
        "overhead_without_warmup": round((total - warmup) / inputs - 1, 4),
        "files": files,
    }


def measure(versions: Sequence[Path], folder: Path, loads: int = 8) -> list[dict[str, Any]]:
    """Sizes, and the median wall and CPU time of ``loads`` loads of each version (after one
    load of each to fill the page cache), the versions loaded in turn."""
    wall: dict[Path, list[float]] = {v: [] for v in versions}
    cpu: dict[Path, list[float]] = {v: [] for v in versions}
    for round_number in range(loads + 1):
        for version in versions:
            answer = capi.run_in_child(capi.Request(str(version)))[0]
            if round_number:
                wall[version].append(answer["load_seconds"])
                cpu[version].append(answer["load_cpu_seconds"])
    return [
        {
            "version": str(version),
            **sizes(version, folder / "frozen"),
            "load_seconds_median": round(statistics.median(wall[version]), 3),
            "load_cpu_seconds_median": round(statistics.median(cpu[version]), 3),
            "load_seconds": [round(s, 3) for s in wall[version]],
        }
        for version in versions
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write")
    write.add_argument("folder", type=Path)
    built = commands.add_parser("build")
    built.add_argument("folder", type=Path)
    built.add_argument("project", type=Path)
    built.add_argument("--tfmerge", help="the tfmerge executable (default: this checkout's)")
    built.add_argument("--shard-constant-bytes", type=int, dest="floor")
    measured = commands.add_parser("measure")
    measured.add_argument("folder", type=Path)
    measured.add_argument("versions", type=Path, nargs="+")
    measured.add_argument("--loads", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "write":
        models = write_set(args.folder)
        print(json.dumps({m["signature"]: m["bytes"] for m in models}, indent=1))
    elif args.command == "build":
        print(build(args.folder, args.project, args.tfmerge, args.floor))
    else:
        print(json.dumps(measure(args.versions, args.folder, args.loads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
