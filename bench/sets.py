"""The generated input sets, cached under bench/.work/sets/<SET>-seed<SEED>/.

A set folder holds ``frozen/*.pb`` and ``models.json`` (the declaration of every model,
written last: a folder without it is incomplete and is generated again). Generating a set
imports TensorFlow, so it runs in a child process and the harness stays light:

- S, M, L, XL: a few large classifiers, tests/graphgen.py's ``write_big_dense``
  (``python -m bench.sets DIR SET SEED``);
- N10 ... N1000: many small models of about 100 KiB (bench/manyset.py), the set of N being
  the first N models of the largest;
- REAL: real architectures with random weights (bench/fieldset.py: keras.applications
  image models, a text LSTM, a Transformer block, a TF1 GRU).
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
    #: "dense" (graphgen's write_big_dense), "many" (bench/manyset.py) or "real"
    #: (bench/fieldset.py); model_bytes is then an approximate size.
    kind: str = "dense"

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
    # Many small models and real architectures: bench/scale.py measures them.
    **{
        f"N{n}": SetSpec(f"N{n}", n, 110 * KiB, default=False, kind="many")
        for n in (10, 50, 100, 500, 1000)
    },
    "REAL": SetSpec("REAL", 7, 25 * MiB, default=False, kind="real"),
}
#: The largest many-models set, whose files the smaller ones link.
_LARGEST_MANY = max((s for s in SETS.values() if s.kind == "many"), key=lambda s: s.count)


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
        done = subprocess.run(
            _generator(spec, seed, root),
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"generating set {spec.name} failed:\n{done.stderr[-3000:]}")
    return ModelSet(spec, seed, root)


def _generator(spec: SetSpec, seed: int, root: Path) -> list[str]:
    if spec.kind == "many":
        command = [sys.executable, "-m", "bench.manyset", str(root), str(spec.count), str(seed)]
        largest = set_dir(_LARGEST_MANY, seed)
        if spec != _LARGEST_MANY:
            # The largest set first, so that this one links its files: the same bytes.
            ensure(_LARGEST_MANY, seed)
            command.append(str(largest))
        return command
    if spec.kind == "real":
        # One fixed set (its weights are seeded inside bench/fieldset.py).
        return [sys.executable, "-m", "bench.fieldset", "write", str(root)]
    return [sys.executable, "-m", "bench.sets", str(root), spec.name, str(seed)]


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
