"""The generated input sets, cached under bench/.work/sets/<SET>-seed<SEED>/.

A set folder holds ``frozen/*.pb`` and ``models.json`` (the declaration of every model,
written last: a folder without it is incomplete and is generated again). The graphs come
from tests/graphgen.py's ``write_big_dense``; generating them imports TensorFlow, so it runs
in a child process (``python -m bench.sets DIR SET SEED``) and the harness stays light.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.launch import environment

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MANIFEST = "models.json"


@dataclass(frozen=True)
class SetSpec:
    name: str
    count: int
    model_bytes: int
    #: Part of a plain ``python -m bench``; XL is asked for by name only.
    default: bool = True

    @property
    def total_bytes(self) -> int:
        return self.count * self.model_bytes

    def describe(self) -> str:
        return f"{self.count} x {human_bytes(self.model_bytes)}"


SETS = {
    "S": SetSpec("S", 50, 200 * KiB),
    "M": SetSpec("M", 8, 25 * MiB),
    "L": SetSpec("L", 4, 100 * MiB),
    "XL": SetSpec("XL", 3, 1 * GiB, default=False),
}


def human_bytes(value: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


@dataclass(frozen=True)
class ModelSet:
    spec: SetSpec
    seed: int
    root: Path

    @property
    def frozen_dir(self) -> Path:
        return self.root / "frozen"

    def declarations(self) -> list[dict[str, Any]]:
        manifest = json.loads((self.root / MANIFEST).read_text())
        models: list[dict[str, Any]] = manifest["models"]
        return models

    def input_bytes(self) -> int:
        return sum(int(m["bytes"]) for m in self.declarations())


def set_dir(spec: SetSpec, seed: int) -> Path:
    return WORK / "sets" / f"{spec.name}-seed{seed}"


def _complete(root: Path) -> bool:
    manifest = root / MANIFEST
    if not manifest.exists():
        return False
    try:
        models = json.loads(manifest.read_text())["models"]
    except (OSError, ValueError, KeyError):
        return False
    for model in models:
        path = root / "frozen" / model["frozen"]
        if not path.exists() or path.stat().st_size != model["bytes"]:
            return False
    return True


def ensure(spec: SetSpec, seed: int) -> ModelSet:
    """The set's folder, generated (in a child process) when it is missing or incomplete."""
    root = set_dir(spec, seed)
    if not _complete(root):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        command = [sys.executable, "-m", "bench.sets", str(root), spec.name, str(seed)]
        done = subprocess.run(
            command, cwd=ROOT, env=environment(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"generating set {spec.name} failed:\n{done.stderr[-3000:]}")
    return ModelSet(spec, seed, root)


def _generate(root: Path, spec: SetSpec, seed: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import graphgen

    models = []
    for index in range(spec.count):
        signature = f"{spec.name.lower()}_{index:02d}"
        path = root / "frozen" / f"{signature}.pb"
        frozen = graphgen.write_big_dense(
            path, target_bytes=spec.model_bytes, seed=seed * 1000 + index
        )
        models.append(
            {
                "signature": signature,
                "frozen": path.name,
                "inputs": frozen.inputs,
                "outputs": frozen.outputs,
                "sample": frozen.sample,
                "bytes": path.stat().st_size,
            }
        )
    manifest = {"set": spec.name, "seed": seed, "models": models}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    _generate(Path(sys.argv[1]), SETS[sys.argv[2]], int(sys.argv[3]))
