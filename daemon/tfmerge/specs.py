"""Which models a build serves: config entries, sidecar files and discovered graphs.

Resolution only looks at names, sizes and declarations; reading and checking the graphs
themselves is the worker's job. No TensorFlow here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tfmerge.config import Config, ModelDecl, Problem, parse_models
from tfmerge.inputs import MODEL_SUFFIXES as _SUFFIXES
from tfmerge.inputs import SIDECAR_SUFFIX, is_input_path, size_problem
from tfmerge.models import ModelSpec, Rejection

#: Binary first: NAME.pb wins over NAME.pbtxt when a sidecar could mean either.
MODEL_SUFFIXES = tuple(sorted(_SUFFIXES))
#: Bumped when the layout of a merged SavedModel changes, so old versions are rebuilt.
#: 2: device pins cleared, v1 loop frames scoped, constants lifted out of function bodies, and
#: the small constants of inputs that are their own data shard restored from it.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Resolution:
    specs: tuple[ModelSpec, ...]
    rejections: tuple[Rejection, ...] = ()
    #: Signatures whose declaration was refused: their last good input keeps serving.
    refused_signatures: frozenset[str] = field(default_factory=frozenset)
    #: Graph files whose sidecar was refused: whatever they served keeps its last good input.
    refused_files: frozenset[str] = field(default_factory=frozenset)


def input_files(frozen_dir: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX paths of the graph files and of the sidecars under frozen_dir, in one
    walk; upload leftovers excluded."""
    graphs, sidecars = [], []
    for dirpath, dirnames, filenames in os.walk(frozen_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            rel = Path(dirpath, name).relative_to(frozen_dir).as_posix()
            if not is_input_path(rel):
                continue
            if rel.endswith(SIDECAR_SUFFIX):
                sidecars.append(rel)
            elif rel.endswith(MODEL_SUFFIXES):
                graphs.append(rel)
    return sorted(graphs), sorted(sidecars)


def discovered_signature(relpath: str) -> str:
    """A discovered graph's signature: its path without the suffix (``a/kws.pb``: ``a/kws``)."""
    for suffix in MODEL_SUFFIXES:
        if relpath.endswith(suffix):
            return relpath[: -len(suffix)]
    return relpath


def check_path(frozen_dir: Path, relpath: str) -> Rejection | None:
    """Refuse a path that leaves frozen_dir, directly or through a symlink, or is not a file."""
    root = frozen_dir.resolve()
    candidate = root / relpath
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        return Rejection("missing_file", "no such file in frozen_dir", file=relpath)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        return Rejection("unreadable", f"cannot resolve path: {exc}", file=relpath)
    if not resolved.is_relative_to(root):
        return Rejection(
            "path_escapes", f"resolves to {resolved}, outside frozen_dir {root}", file=relpath
        )
    if not resolved.is_file():
        return Rejection("not_a_file", "is not a regular file", file=relpath)
    return None


def _normalise(relpath: str) -> str:
    return Path(os.path.normpath(relpath)).as_posix()


def sidecar_graph(frozen_dir: Path, rel: str) -> str | None:
    """The graph a sidecar declares: NAME.pb (or NAME.pbtxt) beside NAME.toml, if present."""
    stem = rel[: -len(".toml")]
    return next((stem + s for s in MODEL_SUFFIXES if (frozen_dir / (stem + s)).exists()), None)


def _sidecar_models(frozen_dir: Path, rel: str) -> tuple[list[ModelDecl], list[Rejection]]:
    graph = sidecar_graph(frozen_dir, rel)
    if graph is None:
        # A sidecar may arrive before its graph; it only declares, so wait for the graph.
        return [], []
    try:
        data = tomllib.loads((frozen_dir / rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [], [Rejection("bad_sidecar", f"not valid TOML: {exc}", file=rel)]
    problems: list[Problem] = []
    extra = sorted(set(data) - {"models"})
    problems.extend(Problem(key, "unknown key (a sidecar holds only [[models]])") for key in extra)
    decls = parse_models(data.get("models"), "models", f"sidecar {rel}", problems)
    parent = Path(rel).parent
    resolved = []
    for decl in decls:
        target = _normalise((parent / decl.frozen).as_posix()) if decl.frozen else graph
        if target != graph:
            problems.append(
                Problem(
                    decl.origin, f"a sidecar declares only its own graph {graph!r}, not {target!r}"
                )
            )
            continue
        resolved.append(ModelDecl(**{**asdict(decl), "frozen": graph}))
    if problems:
        reason = "; ".join(str(p) for p in problems)
        return [], [Rejection("bad_sidecar", reason, file=rel)]
    return resolved, []


def resolve(config: Config) -> Resolution:
    """The models of the next build, and the declarations refused before reading any graph."""
    rejections: list[Rejection] = []
    decls: list[ModelDecl] = list(config.models)
    frozen_dir = config.frozen_dir
    if not frozen_dir.is_dir():
        return Resolution(
            (), (Rejection("missing_dir", "frozen_dir does not exist", file=str(frozen_dir)),)
        )
    broken: set[str] = set()
    graph_files, sidecars = input_files(frozen_dir)
    for rel in sidecars:
        models, problems = _sidecar_models(frozen_dir, rel)
        decls.extend(models)
        rejections.extend(problems)
        graph = sidecar_graph(frozen_dir, rel)
        if problems and graph is not None:
            # The graph is meant to be declared: neither discover it under its file name nor
            # drop what it served before.
            broken.add(graph)

    by_signature: dict[str, list[ModelDecl]] = {}
    for decl in decls:
        by_signature.setdefault(decl.signature, []).append(decl)
    declared_files = {_normalise(d.frozen) for d in decls} | broken
    if config.discover:
        for rel in graph_files:
            if rel in declared_files:
                continue
            by_signature.setdefault(discovered_signature(rel), []).append(
                ModelDecl(discovered_signature(rel), rel, {}, {}, origin="discovered")
            )

    specs: list[ModelSpec] = []
    refused: set[str] = set()
    for signature in sorted(by_signature):
        claims = by_signature[signature]
        if len(claims) > 1:
            origins = ", ".join(f"{c.origin} ({c.frozen})" for c in claims)
            rejections.append(
                Rejection(
                    "duplicate_signature",
                    f"signature declared {len(claims)} times: {origins}",
                    file=claims[0].frozen,
                    signature=signature,
                )
            )
            refused.add(signature)
            continue
        decl = claims[0]
        relpath = _normalise(decl.frozen)
        problem = check_path(frozen_dir, relpath)
        if problem is None:
            problem = _check_size(frozen_dir / relpath, relpath, config.max_model_bytes)
        if problem is not None:
            rejections.append(Rejection(problem.code, problem.reason, relpath, signature))
            refused.add(signature)
            continue
        discovered = decl.origin == "discovered"
        specs.append(
            ModelSpec(
                signature=signature,
                relpath=relpath,
                inputs=None if discovered else dict(decl.inputs),
                outputs=None if discovered else dict(decl.outputs),
                sample=decl.sample,
                origin=decl.origin,
                keep_devices=(
                    config.keep_devices if decl.keep_devices is None else decl.keep_devices
                ),
            )
        )
    return Resolution(tuple(specs), tuple(rejections), frozenset(refused), frozenset(broken))


def _check_size(path: Path, relpath: str, limit: int) -> Rejection | None:
    problem = size_problem(path.stat().st_size, limit)
    return None if problem is None else Rejection(*problem, file=relpath)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def spec_key(spec: ModelSpec) -> dict[str, Any]:
    return {
        "signature": spec.signature,
        "file": spec.relpath,
        "inputs": dict(sorted(spec.inputs.items())) if spec.inputs is not None else None,
        "outputs": dict(sorted(spec.outputs.items())) if spec.outputs is not None else None,
        "sample": spec.sample,
        "keep_devices": spec.keep_devices,
    }


def fingerprint(entries: Iterable[Mapping[str, Any]], config: Config) -> str:
    """A digest of everything a merged version depends on, so equal inputs are built once."""
    payload = {
        "format": FORMAT_VERSION,
        "allow_ops": list(config.allow_ops),
        "default_signature": config.default_signature,
        "models": sorted((dict(e) for e in entries), key=lambda e: str(e["signature"])),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def raw_fingerprint(
    config: Config, resolution: Resolution, digests: Mapping[str, str] | None = None
) -> str:
    """The fingerprint of what is on disk now, computed without TensorFlow.

    ``digests`` (relpath -> sha256) are files already hashed; every other file is hashed here.
    """
    entries = []
    known = digests or {}
    for spec in resolution.specs:
        try:
            digest = known.get(spec.relpath) or file_sha256(config.frozen_dir / spec.relpath)
        except OSError as exc:
            digest = f"unreadable:{exc.errno}"
        entries.append({**spec_key(spec), "sha256": digest})
    entries.extend(
        {"signature": f"!{r.signature or r.file}", "code": r.code, "file": r.file}
        for r in resolution.rejections
    )
    return fingerprint(entries, config)
