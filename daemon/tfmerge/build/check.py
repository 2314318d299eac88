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
from tfmerge.build import attribution, budget, quirks, reading, signatures, staticcheck
from tfmerge.build.verdicts import Verdict, Verdicts
from tfmerge.build.writer import Writer
from tfmerge.config import Config
from tfmerge.folders.state import Store
from tfmerge.inputs import FrozenDir
from tfmerge.interface import check_interface
from tfmerge.logs import get_logger
from tfmerge.models import AcceptedModel, ModelRejected, ModelSpec, Rejection, TensorSig
from tfmerge.specs import resolve

#: Freed memory is handed back to the kernel after each model of at least this size.
_TRIM_AFTER_BYTES = 4 << 20


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
    previous: AcceptedModel | None = None,
    verdicts: Verdicts | None = None,
) -> Checked:
    """Everything a model must pass before it may be merged; raises ModelRejected.

    With a writer, the input is checked from its copy in the state folder (unless it is a
    kept copy already), which is kept once it passes, its large constants going into the
    version being built. Without one, it is read from frozen_dir (``tfmerge check``). With a
    sha256, the file must have those very bytes (a kept copy). ``previous`` is the model's
    last accepted input, whose interface a new input may not break unannounced. With
    verdicts, the import and probe of these very bytes under this declaration and these limits
    are reused when an earlier build found them (verdicts.py).
    """
    attribution.reading_file(spec, path, config, kept=kept)
    try:
        if writer is None:
            with FrozenDir(config.frozen_dir) as frozen:
                opened = frozen.open(spec.relpath, config.max_model_bytes)
                read = reading.read_opened(opened, spec.relpath)
        else:
            read = writer.read(path, spec.relpath, config.max_model_bytes, kept=kept)
    except ModelRejected as exc:
        if exc.sha256 is not None and not kept:
            # A torn upload often does not parse: its declared digest names the cause.
            _check_digest(spec, exc.sha256)
        raise
    try:
        if not kept:
            _check_digest(spec, read.sha256)
        with attribution.checking(
            spec, config, read, kept=kept, remember=writer is not None
        ) as checking:
            return _check_read(
                spec,
                read,
                config,
                checking,
                writer=writer,
                sha256=sha256,
                previous=previous,
                verdicts=verdicts,
            )
    except BaseException:
        if writer is not None:
            writer.reject(read)
        raise


def _check_digest(spec: ModelSpec, sha256: str) -> None:
    """Refuse bytes that are not the ones declared (digest file, or the entry's sha256)."""
    for source, declared in spec.declared_sha256:
        if sha256 != declared:
            raise ModelRejected(
                "digest_mismatch",
                f"the file's sha256 is {sha256}, but {source} declares {declared}: an upload "
                "that is incomplete, or not the file the digest was made for",
                sha256=sha256,
                declared_sha256=declared,
                declared_by=source,
            )


def _check_read(
    spec: ModelSpec,
    read: reading.GraphRead,
    config: Config,
    checking: attribution.Checking,
    *,
    writer: Writer | None,
    sha256: str | None,
    previous: AcceptedModel | None,
    verdicts: Verdicts | None,
) -> Checked:
    kept = checking.kept
    if sha256 is not None and read.sha256 != sha256:
        raise ModelRejected("damaged", "the kept copy in the state folder is damaged")
    sha256, size = read.sha256, len(read.data)
    verdict = None if verdicts is None else verdicts.get(spec, sha256, checking.limits)
    reused = verdict is not None
    if verdict is None:
        oppolicy.check_ops(read.graph_def, config.allow_ops)
        checking.step("import")
        staticcheck.check_library(read.graph_def)
    prepared = quirks.prepare(read, spec)
    light, large = prepared.light, prepared.large
    # From here on only the light graph and the constants' arrays (views of read.data) remain.
    read.graph_def = None
    init_nodes = signatures.initializer_nodes(light)
    if verdict is None:
        verdict = _import_and_probe(
            spec, prepared, init_nodes, checking, None if kept else previous, config
        )
        if verdicts is not None:
            verdicts.put(spec, sha256, checking.limits, verdict)
    elif spec.inputs is None or spec.outputs is None:
        _log_inferred(spec, verdict.inputs, verdict.outputs)
    tensors = _tensors(verdict.input_sigs, verdict.output_sigs)
    if reused and not kept:
        # A fresh check made this one before its probe run.
        check_interface(spec, previous, tensors, allow_all=config.allow_interface_change)
    del prepared
    if writer is not None:
        writer.accept(read, large)
    del large
    model = AcceptedModel(
        signature=spec.signature,
        relpath=spec.relpath,
        sha256=sha256,
        size=size,
        inputs=dict(verdict.inputs),
        outputs=dict(verdict.outputs),
        sample=spec.sample,
        origin=spec.origin,
        kept=kept,
        tensors=tensors,
        keep_devices=spec.keep_devices,
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


def _import_and_probe(
    spec: ModelSpec,
    prepared: quirks.Prepared,
    init_nodes: list[str],
    checking: attribution.Checking,
    previous: AcceptedModel | None,
    config: Config,
) -> Verdict:
    """Import the graph, find its signature's tensors, check its interface against the last
    accepted input's (``previous``), and run its probe: what a verdict records."""
    graph = signatures.import_graph(prepared.source)
    try:
        inputs, outputs = spec.inputs, spec.outputs
        if inputs is None or outputs is None:
            constants = [c.name for c in prepared.source_constants]
            inputs, outputs = signatures.infer_signature(graph, constants)
            _log_inferred(spec, inputs, outputs)
        input_sigs = {key: signatures.tensor_sig(graph, name) for key, name in inputs.items()}
        output_sigs = {key: signatures.tensor_sig(graph, name) for key, name in outputs.items()}
        tensors = _tensors(input_sigs, output_sigs)
        check_interface(spec, previous, tensors, allow_all=config.allow_interface_change)
        for key, sig in input_sigs.items():
            if signatures.op_type(graph, sig.name) not in signatures.INPUT_OPS:
                get_logger().debug(
                    "input_not_placeholder", signature=spec.signature, input=key, tensor=sig.name
                )
        checking.step("probe")
        feeds, expected = budget.probe_run(
            spec,
            graph,
            prepared.source,
            init_nodes,
            input_sigs,
            output_sigs,
            prepared.source_constants,
            checking.limits,
        )
    finally:
        graph.close()
    return Verdict(dict(inputs), dict(outputs), input_sigs, output_sigs, feeds, expected)


def _tensors(
    input_sigs: Mapping[str, TensorSig], output_sigs: Mapping[str, TensorSig]
) -> dict[str, Any]:
    """A signature's tensor types, as the interface check and ``tfmerge status`` read them."""
    return {
        "inputs": {k: s.as_dict() for k, s in input_sigs.items()},
        "outputs": {k: s.as_dict() for k, s in output_sigs.items()},
    }


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
    """Check each model from frozen_dir, one at a time: what passed, or its logged refusal."""
    accepted = Store(config.state_dir).accepted()
    for spec in specs:
        size: int | None = None
        try:
            checked = check_model(
                spec,
                config.frozen_dir / spec.relpath,
                config,
                kept=False,
                writer=writer,
                previous=accepted.get(spec.signature),
                verdicts=verdicts,
            )
            size = checked.model.size
            yield checked
        except ModelRejected as exc:
            rejection = Rejection(
                exc.code, exc.reason, spec.relpath, spec.signature, tuple(exc.details.items())
            )
            log_rejection(rejection)
            yield rejection
        finally:
            # A small model leaves little to hand back, and trimming costs about a millisecond.
            if size is None or size >= _TRIM_AFTER_BYTES:
                release_memory()


def release_memory() -> None:
    """Hand freed heap back to the kernel between models.

    glibc keeps freed blocks of a large graph in its arenas, so the peak of one model's check
    would otherwise be carried into the next one and into the merge. (No gc.collect: with
    TensorFlow loaded a full collection takes about 0.2 s, and refcounting frees the graphs.)
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def log_rejection(rejection: Rejection) -> None:
    """A refusal's ``model_rejected`` line: a warning for a file not at rest, which is built
    once it is, an error for a bad input."""
    log = get_logger()
    (log.warning if rejection.unsettled else log.error)("model_rejected", **rejection.as_dict())


def check_kept(
    signature: str,
    store: Store,
    config: Config,
    writer: Writer,
    cause: Rejection | None = None,
    verdicts: Verdicts | None = None,
) -> Checked | None:
    """The last accepted input of a signature whose current input was refused, checked again.

    ``cause`` is the refusal that made it needed, named on the ``model_kept`` line.
    """
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
    because = {} if cause is None else {"code": cause.code, "reason": cause.reason}
    log.warning(
        "model_kept",
        signature=signature,
        file=previous.relpath,
        sha256=previous.sha256,
        **because,
    )
    return checked


def check_all(config: Config) -> list[Rejection]:
    """``tfmerge check``: every check a build makes, without merging or publishing anything."""
    log = get_logger()
    resolution = resolve(config)
    for rejection in resolution.rejections:
        log_rejection(rejection)
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
