"""Real architectures with random weights, and what publishing them costs in bytes and load time.

``write_set(folder)`` writes the set ``real`` of tests/fieldgraphs.py: MobileNetV2, ResNet50,
EfficientNetB0 and DenseNet121 at 224 x 224, a text model (strings -> lookup table ->
embedding -> LSTM in a functional While), a Transformer block and a TF1 graph with a
``dynamic_rnn`` GRU (v1 loops); about 170 MB, the same bytes on every run. The folder has the
layout of bench/sets.py's sets: ``frozen/*.pb`` and ``models.json``.

``measure(version, frozen_dir)`` gives the bytes of a published version and of its inputs,
and the time TensorFlow's C++ SavedModel loader (the one TensorFlow Serving runs, through
tests/capi.py) takes to load it, in fresh processes, with the files in the page cache.

Usage: python -m bench.fieldset write DIR
       python -m bench.fieldset build DIR PROJECT [--tfmerge PATH]
       python -m bench.fieldset measure VERSION DIR [--loads 5]
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
from bench.launch import environment
from bench.sets import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import capi
import fieldgraphs


def write_set(folder: Path) -> list[dict[str, Any]]:
    """The set's declarations; its files are generated (in a child process) if missing."""
    return fieldgraphs.write_set(folder, "real")


def build(folder: Path, project: Path, tfmerge: str | None = None) -> Path:
    """``tfmerge build`` of every model of the set into project/serving; the version's path."""
    config = write_tfmerge_config(folder, project)
    command = [tfmerge or str(Path(sys.executable).with_name("tfmerge")), "build", "-c"]
    done = subprocess.run(
        [*command, str(config)],
        cwd=project,
        env=environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    versions = sorted((p for p in (project / "serving").iterdir() if p.name.isdigit()), key=_num)
    if done.returncode != 0 or not versions:
        raise RuntimeError(f"tfmerge build failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return versions[-1]


def _num(path: Path) -> int:
    return int(path.name)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(version: Path, frozen_dir: Path, loads: int = 5) -> dict[str, Any]:
    """Sizes, and the median load time of ``loads`` fresh processes after one to warm up."""
    inputs = sum(p.stat().st_size for p in frozen_dir.glob("*.pb"))
    size = _tree_bytes(version)
    seconds = []
    for _ in range(loads + 1):
        answer = capi.run_in_child(capi.Request(str(version)))
        seconds.append(answer[0]["load_seconds"])
    return {
        "version_bytes": size,
        "inputs_bytes": inputs,
        "overhead": round(size / inputs - 1, 4),
        "files": {
            str(p.relative_to(version)): p.stat().st_size
            for p in sorted(version.rglob("*"))
            if p.is_file()
        },
        "load_seconds": [round(s, 3) for s in seconds[1:]],
        "load_seconds_median": round(statistics.median(seconds[1:]), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write")
    write.add_argument("folder", type=Path)
    built = commands.add_parser("build")
    built.add_argument("folder", type=Path)
    built.add_argument("project", type=Path)
    built.add_argument("--tfmerge", help="the tfmerge executable (default: this venv's)")
    measured = commands.add_parser("measure")
    measured.add_argument("version", type=Path)
    measured.add_argument("folder", type=Path)
    measured.add_argument("--loads", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "write":
        models = write_set(args.folder)
        print(json.dumps({m["signature"]: m["bytes"] for m in models}, indent=1))
    elif args.command == "build":
        print(build(args.folder, args.project, args.tfmerge))
    else:
        print(json.dumps(measure(args.version, args.folder / "frozen", args.loads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
