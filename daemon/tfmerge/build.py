"""One build: read and check every model, merge, verify, write the manifest. Worker side.

Runs inside the worker process of the daemon, or in-process for ``tfmerge build``. It never
touches an integer-named folder: its output is a staging folder that the caller publishes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge import __version__, graphs, merge, tfcore, verify, warmup
from tfmerge.config import Config
from tfmerge.graphs import ModelRejected, TensorSig
from tfmerge.logs import get_logger
from tfmerge.publish import MANIFEST
from tfmerge.results import BuildResult
from tfmerge.specs import ModelSpec, Rejection, Resolution, fingerprint, spec_key
from tfmerge.specs import raw_fingerprint as raw_fingerprint_of
from tfmerge.store import AcceptedModel, Store
from tfmerge.writer import Writer

# TensorFlow's millions of module-level objects never die: keep them out of every garbage
# collection this process runs (a full collection otherwise takes about 0.2 s).
gc.freeze()


@dataclass
class _Checked:
    model: AcceptedModel
    #: The checked graph, its large constants as placeholders (graphs.split_large_constants).
    graph_def: Any
    init_nodes: list[str]
    inputs: dict[str, TensorSig]
    outputs: dict[str, TensorSig]
    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def check_model(
    spec: ModelSpec,
    path: Path,
    config: Config,
    *,
    kept: bool,
    log: Any,
    writer: Writer | None = None,
    sha256: str | None = None,
) -> _Checked:
    """Everything a model must pass before it may be merged; raises ModelRejected.

    With a writer, the input is checked from its copy in the state folder (unless it is a
    kept copy already), which is kept once it passes, its large constants going into the
    version being built. With a sha256, the file must have those very bytes (a kept copy).
    """
    if writer is None:
        read = graphs.read_graph(path, spec.relpath, config.max_model_bytes)
    else:
        read = writer.read(path, spec.relpath, config.max_model_bytes, kept=kept)
    try:
        return _check_parsed(spec, read, config, log=log, kept=kept, writer=writer, sha256=sha256)
    except BaseException:
        if writer is not None:
            writer.reject(read)
        raise


def _check_parsed(
    spec: ModelSpec,
    read: graphs.GraphRead,
    config: Config,
    *,
    log: Any,
    kept: bool,
    writer: Writer | None,
    sha256: str | None,
) -> _Checked:
    if sha256 is not None and read.sha256 != sha256:
        raise ModelRejected("damaged", "the kept copy in the state folder is damaged")
    sha256, size = read.sha256, len(read.data)
    graphs.check_ops(read.graph_def, config.allow_ops)
    light, large = graphs.split_large_constants(read.graph_def, read.payloads, read.offsets)
    # From here on only the light graph and the constants' arrays (views of read.data) remain.
    read.graph_def = None
    init_nodes = graphs.initializer_nodes(light)
    constant_names = [c.name for c in large]
    graph = graphs.import_graph(light)
    inputs, outputs = spec.inputs, spec.outputs
    if inputs is None or outputs is None:
        inputs, outputs = graphs.infer_signature(graph, constant_names)
        log.info(
            "model_inferred",
            signature=spec.signature,
            file=spec.relpath,
            inputs=inputs,
            outputs=outputs,
        )
    input_sigs = {key: graphs.tensor_sig(graph, name) for key, name in inputs.items()}
    output_sigs = {key: graphs.tensor_sig(graph, name) for key, name in outputs.items()}
    for key, sig in input_sigs.items():
        if graph.get_tensor_by_name(sig.name).op.type not in (
            "Placeholder",
            "PlaceholderWithDefault",
        ):
            log.debug("input_not_placeholder", signature=spec.signature, input=key, tensor=sig.name)
    feeds = graphs.probe_inputs(spec.signature, input_sigs, spec.sample)
    try:
        expected = graphs.run_graph(
            graph,
            init_nodes,
            {input_sigs[k].name: v for k, v in feeds.items()}
            | {f"{c.name}:0": c.value for c in large},
            {k: s.name for k, s in output_sigs.items()},
        )
    except Exception as exc:  # any kernel error on the probe input, whatever its type
        raise ModelRejected(
            "source_failed",
            f"the source graph fails on the probe input ({type(exc).__name__}: "
            f"{getattr(exc, 'message', exc)}); add a `sample` to its declaration",
        ) from exc
    del graph
    if writer is not None:
        writer.accept(read, large)
    del large
    model = AcceptedModel(
        signature=spec.signature,
        relpath=spec.relpath,
        sha256=sha256,
        size=size,
        inputs=dict(inputs),
        outputs=dict(outputs),
        sample=spec.sample,
        origin=spec.origin,
        kept=kept,
        tensors={
            "inputs": {k: s.as_dict() for k, s in input_sigs.items()},
            "outputs": {k: s.as_dict() for k, s in output_sigs.items()},
        },
    )
    return _Checked(model, light, init_nodes, input_sigs, output_sigs, feeds, expected)


def _release_memory() -> None:
    """Hand freed heap back to the kernel between models.

    glibc keeps freed blocks of a large graph in its arenas, so the peak of one model's check
    would otherwise be carried into the next one and into the merge. (No gc.collect: with
    TensorFlow loaded a full collection takes about 0.2 s, and refcounting frees the graphs.)
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _fallback(
    signature: str, store: Store, config: Config, log: Any, writer: Writer
) -> _Checked | None:
    """The last accepted input of a signature whose current input was refused."""
    previous = store.accepted().get(signature)
    if previous is None:
        return None
    blob = store.blob_path(previous.sha256, previous.suffix)
    try:
        checked = check_model(
            spec_of(previous),
            blob,
            config,
            kept=True,
            log=log,
            writer=writer,
            sha256=previous.sha256,
        )
    except ModelRejected as exc:
        log.error("model_dropped", signature=signature, file=previous.relpath, reason=exc.reason)
        return None
    log.warning("model_kept", signature=signature, file=previous.relpath, sha256=previous.sha256)
    return checked


def run_build(
    config: Config,
    resolution: Resolution,
    staging: Path,
    build_id: str,
    *,
    newest_fingerprint: str | None = None,
    raw_fingerprint: str | None = None,
) -> BuildResult:
    writer = Writer(staging, Store(config.state_dir))
    # Copied into the state folder by the writer's thread while the ones before are checked.
    writer.prefetch(
        [config.frozen_dir / spec.relpath for spec in resolution.specs], config.max_model_bytes
    )
    try:
        return _run_build(
            config,
            resolution,
            staging,
            build_id,
            writer,
            newest_fingerprint=newest_fingerprint,
            raw_fingerprint=raw_fingerprint,
        )
    finally:
        writer.close()


def _run_build(
    config: Config,
    resolution: Resolution,
    staging: Path,
    build_id: str,
    writer: Writer,
    *,
    newest_fingerprint: str | None,
    raw_fingerprint: str | None,
) -> BuildResult:
    log = get_logger(build_id=build_id)
    store = Store(config.state_dir)
    started = time.monotonic()
    rejections = list(resolution.rejections)
    for rejection in resolution.rejections:
        log.error("model_rejected", **rejection.as_dict())
    checked: list[_Checked] = []
    fallbacks = set(resolution.refused_signatures)
    current = {spec.signature for spec in resolution.specs}
    fallbacks.update(
        name
        for name, model in store.accepted().items()
        if model.relpath in resolution.refused_files and name not in current
    )
    for spec in resolution.specs:
        try:
            checked.append(
                check_model(
                    spec,
                    config.frozen_dir / spec.relpath,
                    config,
                    kept=False,
                    log=log,
                    writer=writer,
                )
            )
        except ModelRejected as exc:
            rejection = Rejection(exc.code, exc.reason, spec.relpath, spec.signature)
            rejections.append(rejection)
            log.error("model_rejected", **rejection.as_dict())
            fallbacks.add(spec.signature)
        _release_memory()
    for signature in sorted(fallbacks):
        kept = _fallback(signature, store, config, log, writer)
        if kept is not None:
            checked.append(kept)
    writer.finish()
    checked.sort(key=lambda c: c.model.signature)
    if raw_fingerprint is None:
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
        )
    digest = fingerprint(
        ({**spec_key(spec_of(c.model)), "sha256": c.model.sha256} for c in checked), config
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
        )

    merge_started = time.monotonic()
    units = _units(checked, writer)
    feeds = {c.model.signature: c.feeds for c in checked}
    expected = {c.model.signature: c.expected for c in checked}
    aliases = _aliases(config, models, log)
    for alias, target in aliases.items():
        feeds[alias] = feeds[target]
        expected[alias] = expected[target]
    stats = merge.merge(units, staging, aliases=aliases)
    del units
    _release_memory()
    timings["merge"] = round(time.monotonic() - merge_started, 4)

    verify_started = time.monotonic()
    mismatches = verify.verify(staging, feeds, expected)
    timings["verify"] = round(time.monotonic() - verify_started, 4)
    if mismatches:
        for mismatch in mismatches:
            log.error("verify_failed", signature=mismatch.signature, reason=mismatch.reason)
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
        )
    warmup_records = warmup.write(staging, config.serving.model_name, feeds, aliases, log)
    stats_record = {
        **asdict(stats),
        "warmup_requests": warmup_records,
        "aliases": aliases,
        # Inputs that are their constants' data files, hard-linked from state_dir or copied.
        "data_shards": writer.shards,
        "inputs_linked": writer.shards_linked,
        "inputs_copied": writer.shards_copied,
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
    )


def _aliases(config: Config, models: Sequence[AcceptedModel], log: Any) -> dict[str, str]:
    """``serving_default`` -> the signature clients that name none are given, when configured."""
    names = {m.signature for m in models}
    if config.default_signature is None or "serving_default" in names:
        return {}
    if config.default_signature not in names:
        log.warning(
            "default_signature_missing",
            signature=config.default_signature,
            reason="default_signature names no signature of this build; no serving_default",
        )
        return {}
    return {"serving_default": config.default_signature}


def spec_of(model: AcceptedModel) -> ModelSpec:
    """The declaration an accepted model was checked under, to check its kept copy again."""
    return ModelSpec(
        signature=model.signature,
        relpath=model.relpath,
        inputs=model.inputs,
        outputs=model.outputs,
        sample=model.sample,
        origin=model.origin,
    )


def _units(checked: Sequence[_Checked], writer: Writer) -> list[merge.GraphUnit]:
    """One unit per distinct graph content: a graph several signatures use is stored once."""
    units: dict[str, merge.GraphUnit] = {}
    for item in checked:
        spec = merge.SignatureSpec(item.model.signature, item.inputs, item.outputs)
        unit = units.get(item.model.sha256)
        if unit is None:
            units[item.model.sha256] = merge.GraphUnit(
                sha256=item.model.sha256,
                graph_def=item.graph_def,
                constants=writer.entries(item.model.sha256),
                relpath=item.model.relpath,
                scope=merge.scope_for(item.model.signature),
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


def check_all(config: Config) -> list[Rejection]:
    """``tfmerge check``: every check a build makes, without merging or publishing anything."""
    from tfmerge.specs import resolve

    log = get_logger(command="check")
    resolution = resolve(config)
    rejections = list(resolution.rejections)
    for rejection in resolution.rejections:
        log.error("model_rejected", **rejection.as_dict())
    accepted = []
    for spec in resolution.specs:
        try:
            checked = check_model(
                spec, config.frozen_dir / spec.relpath, config, kept=False, log=log
            )
        except ModelRejected as exc:
            rejection = Rejection(exc.code, exc.reason, spec.relpath, spec.signature)
            rejections.append(rejection)
            log.error("model_rejected", **rejection.as_dict())
            continue
        accepted.append(checked.model.signature)
        log.info(
            "model_accepted",
            signature=spec.signature,
            file=spec.relpath,
            sha256=checked.model.sha256,
        )
    (log.warning if rejections else log.info)(
        "check_finished", accepted=accepted, rejected=[r.as_dict() for r in rejections]
    )
    return rejections
