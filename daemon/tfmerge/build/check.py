"""Check one model before it may be merged: read, parse, op policy, import, probe. Worker side.

Every refusal is a ModelRejected with a short code (docs/events.md) and a reason a person
can act on; ``check_specs`` turns them into ``model_rejected`` events, one loop for every
caller (a build, ``tfmerge check``).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge import oppolicy
from tfmerge.build import constants, probe, reading, signatures
from tfmerge.build.verdicts import Verdict, Verdicts
from tfmerge.build.writer import Writer
from tfmerge.config import Config
from tfmerge.folders.state import Store
from tfmerge.logs import get_logger
from tfmerge.models import (
    AcceptedModel,
    LargeConstant,
    ModelRejected,
    ModelSpec,
    Rejection,
    TensorSig,
)
from tfmerge.specs import resolve

#: Freed memory is handed back to the kernel after each model of at least this size.
_TRIM_AFTER_BYTES = 4 << 20
#: Graph files below this size whose graphs can share a session are probed together ...
_SHARED_PROBE_BYTES = 1 << 20
#: ... this many at a time (the graphs, their copies and their inputs stay in memory until then).
_SHARED_PROBES = 16


@dataclass
class Checked:
    """A model that passed its checks, with what the merge and the verification need."""

    model: AcceptedModel
    #: The checked graph, its large constants as placeholders (constants.split_large_constants).
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
    writer: Writer | None = None,
    sha256: str | None = None,
    verdicts: Verdicts | None = None,
) -> Checked:
    """Everything a model must pass before it may be merged; raises ModelRejected.

    With a writer, the input is checked from its copy in the state folder (unless it is a
    kept copy already), which is kept once it passes, its large constants going into the
    version being built. With a sha256, the file must have those very bytes (a kept copy).
    With verdicts, a check of these very bytes under this declaration is reused (verdicts.py).
    """
    started = _start(spec, path, config, kept=kept, writer=writer, sha256=sha256, verdicts=verdicts)
    if isinstance(started, Checked):
        return started
    return _finish(started, probe.run_alone(started.probe), writer, verdicts)


@dataclass
class _Probing:
    """A model whose checks passed up to the probe run, which it shares with other models."""

    spec: ModelSpec
    read: reading.GraphRead
    kept: bool
    light: Any
    large: list[LargeConstant]
    init_nodes: list[str]
    inputs: dict[str, str]
    outputs: dict[str, str]
    input_sigs: dict[str, TensorSig]
    output_sigs: dict[str, TensorSig]
    probe: probe.Probe


def _start(
    spec: ModelSpec,
    path: Path,
    config: Config,
    *,
    kept: bool,
    writer: Writer | None,
    sha256: str | None,
    verdicts: Verdicts | None,
) -> Checked | _Probing:
    """Read and check a model up to its probe run: a Checked when a verdict saves the run."""
    if writer is None:
        read = reading.read_graph(path, spec.relpath, config.max_model_bytes)
    else:
        read = writer.read(path, spec.relpath, config.max_model_bytes, kept=kept)
    try:
        _expect_bytes(read, sha256)
        verdict = verdicts.get(spec, read.sha256) if verdicts is not None else None
        if verdict is None:
            oppolicy.check_ops(read.graph_def, config.allow_ops)
        light, large = constants.split_large_constants(read.graph_def, read.payloads, read.offsets)
        # From here on only the light graph and the constants' arrays (views of read.data) remain.
        read.graph_def = None
        init_nodes = signatures.initializer_nodes(light)
        if verdict is not None:
            if spec.inputs is None or spec.outputs is None:
                _log_inferred(spec, verdict.inputs, verdict.outputs)
            return _accept(spec, read, kept, light, large, init_nodes, verdict, writer)
        return _prepare(spec, read, kept, light, large, init_nodes)
    except BaseException:
        if writer is not None:
            writer.reject(read)
        raise


def _expect_bytes(read: reading.GraphRead, sha256: str | None) -> None:
    if sha256 is not None and read.sha256 != sha256:
        raise ModelRejected("damaged", "the kept copy in the state folder is damaged")


def _prepare(
    spec: ModelSpec,
    read: reading.GraphRead,
    kept: bool,
    light: Any,
    large: list[LargeConstant],
    init_nodes: list[str],
) -> _Probing:
    """Import the graph, find its signature's tensors and make its probe input."""
    serialized = light.SerializeToString()
    graph = signatures.import_graph(serialized)
    try:
        inputs, outputs = spec.inputs, spec.outputs
        if inputs is None or outputs is None:
            inputs, outputs = signatures.infer_signature(graph, [c.name for c in large])
            _log_inferred(spec, inputs, outputs)
        input_sigs = {key: signatures.tensor_sig(graph, name) for key, name in inputs.items()}
        output_sigs = {key: signatures.tensor_sig(graph, name) for key, name in outputs.items()}
        for key, sig in input_sigs.items():
            if signatures.op_type(graph, sig.name) not in signatures.INPUT_OPS:
                get_logger().debug(
                    "input_not_placeholder", signature=spec.signature, input=key, tensor=sig.name
                )
    finally:
        graph.close()
    feeds = probe.probe_inputs(spec.signature, input_sigs, spec.sample)
    run = probe.Probe(
        serialized,
        init_nodes,
        {input_sigs[k].name: v for k, v in feeds.items()} | {f"{c.name}:0": c.value for c in large},
        {k: s.name for k, s in output_sigs.items()},
    )
    verdict_parts = (dict(inputs), dict(outputs), input_sigs, output_sigs)
    return _Probing(spec, read, kept, light, large, init_nodes, *verdict_parts, run)


def _finish(
    probing: _Probing,
    outcome: dict[str, np.ndarray] | Exception,
    writer: Writer | None,
    verdicts: Verdicts | None,
) -> Checked:
    """A model whose probe ran: accepted with what its source computed, or refused."""
    if isinstance(outcome, Exception):  # any kernel error on the probe input
        if writer is not None:
            writer.reject(probing.read)
        raise ModelRejected(
            "source_failed",
            f"the source graph fails on the probe input ({type(outcome).__name__}: "
            f"{getattr(outcome, 'message', outcome)}); add a `sample` to its declaration",
        ) from outcome
    try:
        feeds = {key: probing.probe.feeds[sig.name] for key, sig in probing.input_sigs.items()}
        verdict = Verdict(
            probing.inputs,
            probing.outputs,
            probing.input_sigs,
            probing.output_sigs,
            feeds,
            outcome,
        )
        if verdicts is not None:
            verdicts.put(probing.spec, probing.read.sha256, verdict)
        return _accept(
            probing.spec,
            probing.read,
            probing.kept,
            probing.light,
            probing.large,
            probing.init_nodes,
            verdict,
            writer,
        )
    except BaseException:
        if writer is not None:
            writer.reject(probing.read)
        raise


def _accept(
    spec: ModelSpec,
    read: reading.GraphRead,
    kept: bool,
    light: Any,
    large: list[LargeConstant],
    init_nodes: list[str],
    verdict: Verdict,
    writer: Writer | None,
) -> Checked:
    if writer is not None:
        writer.accept(read, large)
    model = AcceptedModel(
        signature=spec.signature,
        relpath=spec.relpath,
        sha256=read.sha256,
        size=len(read.data),
        inputs=dict(verdict.inputs),
        outputs=dict(verdict.outputs),
        sample=spec.sample,
        origin=spec.origin,
        kept=kept,
        tensors={
            "inputs": {k: s.as_dict() for k, s in verdict.input_sigs.items()},
            "outputs": {k: s.as_dict() for k, s in verdict.output_sigs.items()},
        },
    )
    return Checked(
        model,
        light,
        init_nodes,
        verdict.input_sigs,
        verdict.output_sigs,
        verdict.feeds,
        verdict.expected,
    )


def _log_inferred(spec: ModelSpec, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    get_logger().info(
        "model_inferred",
        signature=spec.signature,
        file=spec.relpath,
        inputs=dict(inputs),
        outputs=dict(outputs),
    )


def check_specs(
    specs: Iterable[ModelSpec],
    config: Config,
    *,
    writer: Writer | None = None,
    verdicts: Verdicts | None = None,
) -> Iterator[Checked | Rejection]:
    """Check each model from frozen_dir: what passed, or its logged refusal.

    Small graphs that can share a session are probed together, a batch at a time (their
    results come after the models checked alone); every other model is checked at once.
    """
    batch: list[_Probing] = []
    for spec in specs:
        size = None
        try:
            started = _start(
                spec,
                config.frozen_dir / spec.relpath,
                config,
                kept=False,
                writer=writer,
                sha256=None,
                verdicts=verdicts,
            )
            size = len(started.read.data) if isinstance(started, _Probing) else started.model.size
            if isinstance(started, _Probing):
                if size < _SHARED_PROBE_BYTES and probe.shareable(
                    started.light, started.init_nodes
                ):
                    batch.append(started)
                    if len(batch) == _SHARED_PROBES:
                        yield from _probe_batch(batch, writer, verdicts)
                        batch = []
                    continue
                started = _finish(started, probe.run_alone(started.probe), writer, verdicts)
            yield started
        except ModelRejected as exc:
            yield _rejected(spec, exc)
        finally:
            # A small model leaves little to hand back, and trimming costs about a millisecond.
            if size is None or size >= _TRIM_AFTER_BYTES:
                release_memory()
    yield from _probe_batch(batch, writer, verdicts)


def _probe_batch(
    batch: list[_Probing], writer: Writer | None, verdicts: Verdicts | None
) -> Iterator[Checked | Rejection]:
    if not batch:
        return
    outcomes = probe.run_shared([item.probe for item in batch])
    for item, outcome in zip(batch, outcomes, strict=True):
        try:
            yield _finish(item, outcome, writer, verdicts)
        except ModelRejected as exc:
            yield _rejected(item.spec, exc)


def _rejected(spec: ModelSpec, exc: ModelRejected) -> Rejection:
    rejection = Rejection(exc.code, exc.reason, spec.relpath, spec.signature)
    get_logger().error("model_rejected", **rejection.as_dict())
    return rejection


def release_memory() -> None:
    """Hand freed heap back to the kernel between models.

    glibc keeps freed blocks of a large graph in its arenas, so the peak of one model's check
    would otherwise be carried into the next one and into the merge. (No gc.collect: with
    TensorFlow loaded a full collection takes about 0.2 s, and refcounting frees the graphs.)
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def check_kept(
    signature: str,
    store: Store,
    config: Config,
    writer: Writer,
    verdicts: Verdicts | None = None,
) -> Checked | None:
    """The last accepted input of a signature whose current input was refused, checked again."""
    log = get_logger()
    previous = store.accepted().get(signature)
    if previous is None:
        return None
    blob = store.blob_path(previous.sha256, previous.suffix)
    try:
        checked = check_model(
            previous.spec(),
            blob,
            config,
            kept=True,
            writer=writer,
            sha256=previous.sha256,
            verdicts=verdicts,
        )
    except ModelRejected as exc:
        log.error("model_dropped", signature=signature, file=previous.relpath, reason=exc.reason)
        return None
    log.warning("model_kept", signature=signature, file=previous.relpath, sha256=previous.sha256)
    return checked


def check_all(config: Config) -> list[Rejection]:
    """``tfmerge check``: every check a build makes, without merging or publishing anything."""
    log = get_logger()
    resolution = resolve(config)
    for rejection in resolution.rejections:
        log.error("model_rejected", **rejection.as_dict())
    rejections = list(resolution.rejections)
    accepted = []
    for item in check_specs(resolution.specs, config):
        if isinstance(item, Rejection):
            rejections.append(item)
            continue
        accepted.append(item.model.signature)
        log.info(
            "model_accepted",
            signature=item.model.signature,
            file=item.model.relpath,
            sha256=item.model.sha256,
        )
    (log.warning if rejections else log.info)(
        "check_finished",
        accepted=accepted,
        rejected=[r.as_dict() for r in rejections],
    )
    return rejections
