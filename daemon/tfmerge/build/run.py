"""One build: read and check every model, merge, verify, write the manifest. Worker side.

Runs inside the worker process of the daemon, or in-process for ``tfmerge build``. It never
touches an integer-named folder: its output is a staging folder that the caller publishes.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tfmerge import __version__, snapshot
from tfmerge.build import merge, scopes, tfcore, verify, warmup
from tfmerge.build.check import Checked, check_kept, check_specs, log_rejection, release_memory
from tfmerge.build.verdicts import Verdicts
from tfmerge.build.writer import Writer
from tfmerge.config import Config
from tfmerge.folders.fs import fsync_file, naming
from tfmerge.folders.publish import MANIFEST
from tfmerge.folders.state import Store
from tfmerge.logs import bound_context, get_logger
from tfmerge.models import AcceptedModel, BuildResult, Rejection
from tfmerge.specs import Resolution, fingerprint, spec_key
from tfmerge.specs import raw_fingerprint as raw_fingerprint_of

# TensorFlow's millions of module-level objects never die: keep them out of every garbage
# collection this process runs (a full collection otherwise takes about 0.2 s).
gc.freeze()


def run_build(
    config: Config,
    resolution: Resolution,
    staging: Path,
    build_id: str,
    *,
    newest_fingerprint: str | None = None,
    raw_fingerprint: str | None = None,
) -> BuildResult:
    # Inputs are copied under read leases by the writer's thread; only the main thread can keep
    # a lease break's SIGIO from ending the process (the worker did so already at its start).
    snapshot.ignore_lease_breaks()
    store = Store(config.state_dir)
    writer = Writer(staging, store, config.frozen_dir)
    verdicts = Verdicts(store.checks, config)
    # Copied into the state folder by the writer's thread while the ones before are checked.
    writer.prefetch([spec.relpath for spec in resolution.specs], config.max_model_bytes)
    # Syncs started early, so that publishing finds the bytes on disk already; leaving the
    # block waits for them.
    aside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfmerge-fsync")
    try:
        with aside, bound_context(build_id=build_id):
            return _run_build(
                config,
                resolution,
                staging,
                build_id,
                writer,
                verdicts,
                aside,
                newest_fingerprint=newest_fingerprint,
                raw_fingerprint=raw_fingerprint,
            )
    except OSError as exc:
        # Reads name their file; a write that names none is one into the version being built.
        naming(exc, staging)
        raise
    finally:
        writer.close()


def _run_build(
    config: Config,
    resolution: Resolution,
    staging: Path,
    build_id: str,
    writer: Writer,
    verdicts: Verdicts,
    aside: ThreadPoolExecutor,
    *,
    newest_fingerprint: str | None,
    raw_fingerprint: str | None,
) -> BuildResult:
    log = get_logger()
    started = time.monotonic()
    checked, rejections = _check_inputs(config, resolution, writer, verdicts)
    writer.finish()
    verdicts.flush()
    checked.sort(key=lambda c: c.model.signature)
    unsettled = tuple(sorted({r.file for r in rejections if r.unsettled and r.file}))
    if unsettled:
        # What is on disk now is not what was built: no start-up check may take it as built.
        raw_fingerprint = None
    elif raw_fingerprint is None:
        digests = {c.model.relpath: c.model.sha256 for c in checked if not c.model.kept}
        raw_fingerprint = raw_fingerprint_of(config, resolution, digests)
    check_seconds = time.monotonic() - started
    timings: dict[str, float] = {"check": round(check_seconds, 4)}
    models = tuple(c.model for c in checked)
    if not checked:
        return BuildResult(
            build_id,
            "empty",
            None,
            None,
            models,
            tuple(rejections),
            timings=timings,
            raw_fingerprint=raw_fingerprint,
            unsettled=unsettled,
        )
    digest = fingerprint(
        ({**spec_key(c.model.spec()), "sha256": c.model.sha256} for c in checked), config
    )
    if digest == newest_fingerprint:
        return BuildResult(
            build_id,
            "unchanged",
            None,
            digest,
            models,
            tuple(rejections),
            timings=timings,
            raw_fingerprint=raw_fingerprint,
            unsettled=unsettled,
        )

    merge_started = time.monotonic()
    units = _units(checked, writer)
    feeds = {c.model.signature: c.feeds for c in checked}
    expected = {c.model.signature: c.expected for c in checked}
    aliases = _aliases(config, models)
    for alias, target in aliases.items():
        feeds[alias] = feeds[target]
        expected[alias] = expected[target]
    stats = merge.merge(units, staging, aliases=aliases)
    # Written unsynced by the merge: on disk by the time verification is done.
    aside.submit(fsync_file, staging / "saved_model.pb")
    del units
    release_memory()
    timings["merge"] = round(time.monotonic() - merge_started, 4)

    verify_started = time.monotonic()
    sizes = {c.model.signature: c.model.size for c in checked}
    sizes.update({alias: sizes[target] for alias, target in aliases.items()})
    mismatches = verify.verify(staging, feeds, expected, sizes)
    timings["verify"] = round(time.monotonic() - verify_started, 4)
    if mismatches:
        failed = {aliases.get(m.signature, m.signature) for m in mismatches}
        recheck = set(verdicts.forget(failed))
        for mismatch in mismatches:
            signature = aliases.get(mismatch.signature, mismatch.signature)
            log.error(
                "verify_failed",
                signature=mismatch.signature,
                reason=mismatch.reason,
                reused_check=signature in recheck,
            )
        return BuildResult(
            build_id,
            "failed",
            str(staging),
            digest,
            models,
            tuple(rejections),
            tuple((m.signature, m.reason) for m in mismatches),
            timings,
            raw_fingerprint=raw_fingerprint,
            unsettled=unsettled,
        )
    warmup_records = warmup.write(staging, config.serving.model_name, feeds, aliases)
    stats_record = {
        **asdict(stats),
        "warmup_requests": warmup_records,
        "aliases": aliases,
        # Inputs that are their constants' data files, hard-linked from state_dir or copied.
        "data_shards": writer.shards,
        "inputs_linked": writer.shards_linked,
        "inputs_copied": writer.shards_copied,
        # Checks whose verdict an earlier build had found for the same bytes and declaration.
        "checks_reused": verdicts.reused,
    }
    _write_manifest(staging, build_id, digest, raw_fingerprint, models, timings, stats_record)
    return BuildResult(
        build_id,
        "built",
        str(staging),
        digest,
        models,
        tuple(rejections),
        (),
        timings,
        asdict(stats),
        raw_fingerprint=raw_fingerprint,
        unsettled=unsettled,
    )


def _check_inputs(
    config: Config, resolution: Resolution, writer: Writer, verdicts: Verdicts
) -> tuple[list[Checked], list[Rejection]]:
    """Every model checked, and for each one refused, its last accepted input in its place."""
    store = Store(config.state_dir)
    rejections = list(resolution.rejections)
    for rejection in resolution.rejections:
        log_rejection(rejection)
    checked: list[Checked] = []
    # Each signature that falls back, with the refusal that made it (None: not known here).
    causes: dict[str, Rejection | None] = {
        r.signature: r for r in resolution.rejections if r.signature is not None
    }
    causes.update((name, None) for name in resolution.refused_signatures if name not in causes)
    current = {spec.signature for spec in resolution.specs}
    for name, model in store.accepted().items():
        if model.relpath in resolution.refused_files and name not in current:
            causes[name] = _file_refusal(model.relpath, resolution.rejections)
    for item in check_specs(resolution.specs, config, writer=writer, verdicts=verdicts):
        if isinstance(item, Checked):
            checked.append(item)
            continue
        rejections.append(item)
        if item.signature is not None:
            causes[item.signature] = item
    for signature in sorted(causes.keys() - resolution.unkept):
        kept = check_kept(signature, store, config, writer, causes[signature], verdicts)
        if kept is not None:
            checked.append(kept)
    return checked, rejections


def _file_refusal(graph: str, rejections: Sequence[Rejection]) -> Rejection | None:
    """The refusal of the sidecar that declared graph (NAME.toml beside NAME.pb)."""
    stem = graph.rsplit(".", 1)[0]
    return next((r for r in rejections if r.file == f"{stem}.toml"), None)


def _aliases(config: Config, models: Sequence[AcceptedModel]) -> dict[str, str]:
    """``serving_default`` -> the signature clients that name none are given, when configured."""
    names = {m.signature for m in models}
    if config.default_signature is None or "serving_default" in names:
        return {}
    if config.default_signature not in names:
        get_logger().warning(
            "default_signature_missing",
            signature=config.default_signature,
            reason="default_signature names no signature of this build; no serving_default",
        )
        return {}
    return {"serving_default": config.default_signature}


def _units(checked: Sequence[Checked], writer: Writer) -> list[merge.GraphUnit]:
    """One unit per distinct graph content: a graph several signatures use is stored once."""
    units: dict[str, merge.GraphUnit] = {}
    scope_of = scopes.assign(item.model.signature for item in checked)
    for item in checked:
        spec = merge.SignatureSpec(item.model.signature, item.inputs, item.outputs)
        unit = units.get(item.model.sha256)
        if unit is None:
            units[item.model.sha256] = merge.GraphUnit(
                sha256=item.model.sha256,
                graph_def=item.graph_def,
                constants=writer.entries(item.model.sha256),
                relpath=item.model.relpath,
                scope=scope_of[item.model.signature],
                init_nodes=item.init_nodes,
                signatures=[spec],
            )
        else:
            list.append(unit.signatures, spec)  # type: ignore[arg-type]
    return list(units.values())


def _write_manifest(
    staging: Path,
    build_id: str,
    digest: str,
    raw_fingerprint: str | None,
    models: Sequence[AcceptedModel],
    timings: Mapping[str, float],
    stats: Mapping[str, Any],
) -> None:
    manifest = {
        "tool": "tfmerge",
        "tool_version": __version__,
        "tensorflow_version": tfcore.VERSION,
        "build_id": build_id,
        "fingerprint": digest,
        "raw_fingerprint": raw_fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "signatures": {m.signature: m.as_dict() for m in models},
        "sources": _sources(models),
        "timings": dict(timings),
        "stats": dict(stats),
    }
    path = staging / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _sources(models: Sequence[AcceptedModel]) -> list[dict[str, Any]]:
    """One entry per input file (two files with the same bytes are two entries)."""
    by_file: dict[tuple[str, str], dict[str, Any]] = {}
    for model in models:
        entry = by_file.setdefault(
            (model.relpath, model.sha256),
            {"file": model.relpath, "sha256": model.sha256, "size": model.size, "signatures": []},
        )
        entry["signatures"].append(model.signature)
    return sorted(by_file.values(), key=lambda e: (e["file"], e["sha256"]))
