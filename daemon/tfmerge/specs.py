"""Which models a build serves: config entries, sidecar files and discovered graphs.

Resolution looks at names, sizes and declarations: it reads sidecars and digest files (at most
``max_sidecar_bytes`` each, through tfmerge.snapshot), never a graph; reading and checking the
graphs themselves is the worker's job. No TensorFlow here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tfmerge import snapshot
from tfmerge.config import Config
from tfmerge.declarations import ModelDecl, parse_models, signature_problem
from tfmerge.digests import digest_file_of, graph_of, parse_digest_file
from tfmerge.inputs import DIGEST_SUFFIX, SIDECAR_SUFFIX, FrozenDir, is_input_path
from tfmerge.inputs import MODEL_SUFFIXES as _SUFFIXES
from tfmerge.models import ModelRejected, ModelSpec, Rejection
from tfmerge.tomltable import Problem

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
    #: Signatures whose last accepted input ended a worker in this build: not checked again.
    unkept: frozenset[str] = field(default_factory=frozenset)


def input_files(frozen_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """Relative POSIX paths of the graph files, the sidecars and the digest files under
    frozen_dir, in one walk; upload leftovers excluded."""
    graphs, sidecars, digest_files = [], [], []
    for dirpath, dirnames, filenames in os.walk(frozen_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            rel = Path(dirpath, name).relative_to(frozen_dir).as_posix()
            if not is_input_path(rel):
                continue
            if rel.endswith(SIDECAR_SUFFIX):
                sidecars.append(rel)
            elif rel.endswith(DIGEST_SUFFIX):
                digest_files.append(rel)
            elif rel.endswith(MODEL_SUFFIXES):
                graphs.append(rel)
    return sorted(graphs), sorted(sidecars), sorted(digest_files)


def discovered_signature(relpath: str) -> str:
    """A discovered graph's signature: its path without the suffix (``a/kws.pb``: ``a/kws``)."""
    for suffix in MODEL_SUFFIXES:
        if relpath.endswith(suffix):
            return relpath[: -len(suffix)]
    return relpath


def check_path(frozen_dir: Path, relpath: str, max_bytes: int | None = None) -> Rejection | None:
    """Refuse a path that leaves frozen_dir, is a link, or is not a regular file.

    The same rules as the read that follows (inputs.FrozenDir), which checks them again on
    what it opens: this is the early word, that one the last.
    """
    with FrozenDir(frozen_dir) as frozen:
        return _checked(frozen, relpath, max_bytes)


def _checked(frozen: FrozenDir, relpath: str, max_bytes: int | None) -> Rejection | None:
    try:
        frozen.check(relpath, max_bytes)
    except ModelRejected as exc:
        return Rejection(exc.code, exc.reason, file=relpath)
    return None


def _normalise(relpath: str) -> str:
    return Path(os.path.normpath(relpath)).as_posix()


def sidecar_graph(rel: str, graphs: Collection[str]) -> str | None:
    """The graph a sidecar declares: NAME.pb (or NAME.pbtxt) beside NAME.toml, if present."""
    stem = rel[: -len(".toml")]
    return next((stem + s for s in MODEL_SUFFIXES if stem + s in graphs), None)


def read_small(frozen: FrozenDir, rel: str, limit: int, code: str) -> bytes:
    """A sidecar's or a digest file's bytes, at most limit of them. Raises ModelRejected."""
    with frozen.open(rel, None) as opened:
        return snapshot.read_bounded(opened, limit, code, "max_sidecar_bytes")


def _refusal(exc: ModelRejected, rel: str, signature: str | None = None) -> Rejection:
    return Rejection(exc.code, exc.reason, rel, signature, tuple(exc.details.items()))


def _sidecar_models(
    frozen: FrozenDir, rel: str, graph: str, limit: int
) -> tuple[list[ModelDecl], list[Rejection]]:
    try:
        data = tomllib.loads(read_small(frozen, rel, limit, "bad_sidecar").decode("utf-8"))
    except ModelRejected as exc:
        return [], [_refusal(exc, rel)]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
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


def _declared_digests(
    frozen: FrozenDir, graphs: Collection[str], digest_files: Iterable[str], limit: int
) -> tuple[dict[str, tuple[str, str]], dict[str, ModelRejected]]:
    """graph -> (its digest file, the digest declared), and graph -> why its file is refused.

    A digest file whose graph has not arrived yet only declares: it waits for the graph.
    """
    declared: dict[str, tuple[str, str]] = {}
    refused: dict[str, ModelRejected] = {}
    for rel in digest_files:
        graph = graph_of(rel)
        if graph not in graphs:
            continue
        try:
            data = read_small(frozen, rel, limit, "bad_digest_file")
            declared[graph] = (rel, parse_digest_file(data, graph))
        except ModelRejected as exc:
            refused[graph] = exc
    return declared, refused


def resolve(config: Config) -> Resolution:
    """The models of the next build, and the declarations refused before reading any graph."""
    frozen_dir = config.frozen_dir
    if not frozen_dir.is_dir():
        return Resolution(
            (), (Rejection("missing_dir", "frozen_dir does not exist", file=str(frozen_dir)),)
        )
    with FrozenDir(frozen_dir) as frozen:
        return _resolve(config, frozen)


def _discovered(
    graph_files: list[str], declared_files: set[str], rejections: list[Rejection]
) -> list[ModelDecl]:
    """A declaration for each graph no entry declares, served under its path."""
    found = []
    for rel in graph_files:
        if rel in declared_files:
            continue
        signature = discovered_signature(rel)
        unlistable = signature_problem(signature)
        if unlistable is not None:
            rejections.append(
                Rejection(
                    "bad_name",
                    f"its signature would be its path without the suffix, {signature!r}, "
                    f"which {unlistable}: rename the file, or declare it under another name",
                    rel,
                )
            )
            continue
        found.append(ModelDecl(signature, rel, {}, {}, origin="discovered"))
    return found


def _resolve(config: Config, frozen: FrozenDir) -> Resolution:
    rejections: list[Rejection] = []
    decls: list[ModelDecl] = list(config.models)
    broken: set[str] = set()
    graph_files, sidecars, digest_files = input_files(config.frozen_dir)
    graph_set = set(graph_files)
    for rel in sidecars:
        graph = sidecar_graph(rel, graph_set)
        if graph is None:
            # A sidecar may arrive before its graph; it only declares, so wait for the graph.
            continue
        models, problems = _sidecar_models(frozen, rel, graph, config.max_sidecar_bytes)
        decls.extend(models)
        rejections.extend(problems)
        if problems:
            # The graph is meant to be declared: neither discover it under its file name nor
            # drop what it served before.
            broken.add(graph)
    declared, bad_digests = _declared_digests(
        frozen, graph_set, digest_files, config.max_sidecar_bytes
    )

    by_signature: dict[str, list[ModelDecl]] = {}
    for decl in decls:
        by_signature.setdefault(decl.signature, []).append(decl)
    declared_files = {_normalise(d.frozen) for d in decls} | broken
    if config.discover:
        for decl in _discovered(graph_files, declared_files, rejections):
            by_signature.setdefault(decl.signature, []).append(decl)

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
        problem = _checked(frozen, relpath, config.max_model_bytes)
        if problem is None and relpath in bad_digests:
            # Its digest cannot be known: the graph is not used, whatever its bytes.
            problem = _refusal(bad_digests[relpath], digest_file_of(relpath))
        if problem is not None:
            rejections.append(replace(problem, signature=signature))
            refused.add(signature)
            continue
        digests = [declared[relpath]] if relpath in declared else []
        if decl.sha256 is not None:
            digests.append((decl.origin, decl.sha256))
        discovered = decl.origin == "discovered"
        specs.append(
            ModelSpec(
                signature=signature,
                relpath=relpath,
                inputs=None if discovered else dict(decl.inputs),
                outputs=None if discovered else dict(decl.outputs),
                sample=decl.sample,
                origin=decl.origin,
                declared_sha256=tuple(digests),
                allow_interface_change=decl.allow_interface_change,
                keep_devices=(
                    config.keep_devices if decl.keep_devices is None else decl.keep_devices
                ),
            )
        )
    return Resolution(tuple(specs), tuple(rejections), frozenset(refused), frozenset(broken))


def input_sha256(frozen: FrozenDir, relpath: str) -> str:
    """The sha256 of an input as it is now, for a fingerprint (no lease: nothing is used)."""
    digest = hashlib.sha256()
    with frozen.open(relpath, None) as opened:
        while chunk := os.read(opened.fd, 1 << 20):
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
    Declared digests count: a digest file that changes is a change of the inputs.
    """
    entries = []
    known = dict(digests or {})
    with FrozenDir(config.frozen_dir) as frozen:
        for spec in resolution.specs:
            if spec.relpath not in known:
                try:
                    known[spec.relpath] = input_sha256(frozen, spec.relpath)
                except ModelRejected as exc:
                    known[spec.relpath] = f"unreadable:{exc.code}"
                except OSError as exc:
                    known[spec.relpath] = f"unreadable:{exc.errno}"
            entry = {**spec_key(spec), "sha256": known[spec.relpath]}
            if spec.declared_sha256:
                entry["declared_sha256"] = [list(pair) for pair in spec.declared_sha256]
            entries.append(entry)
    entries.extend(
        {"signature": f"!{r.signature or r.file}", "code": r.code, "file": r.file}
        for r in resolution.rejections
    )
    return fingerprint(entries, config)
