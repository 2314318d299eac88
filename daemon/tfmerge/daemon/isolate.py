"""One build over as many workers as it takes: a model that ends its worker is left out.

A worker that dies (a crash inside TensorFlow, an abort) or overruns a step while it checks
a model has that model's name and step on its pipe (tfmerge.progress). The build then goes
on in a fresh worker, with that model refused (``probe_crashed``, ``probe_timeout``) and the
refusal remembered by its bytes, so that no later build runs it again. The other models are
checked again from the start: what the first worker learnt about them died with it, and the
refusals it made that cost a run are remembered, so the second pass is quick.

A SIGKILL or SIGTERM can come from outside the worker (the kernel's out-of-memory killer, a
person): the first one during a model's check costs that model nothing, and its check is
tried once more. No TensorFlow here.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tfmerge import limits
from tfmerge.config import Config
from tfmerge.daemon.worker import ModelFailed, Worker, make_request
from tfmerge.folders.publish import clear_staging
from tfmerge.folders.state import Store
from tfmerge.logs import get_logger
from tfmerge.models import Rejection
from tfmerge.specs import Resolution

if TYPE_CHECKING:
    from tfmerge.models import BuildResult

_FROM_OUTSIDE = frozenset({signal.SIGKILL, signal.SIGTERM})


def run_build(
    config: Config,
    resolution: Resolution,
    staging: Path,
    build_id: str,
    *,
    newest_fingerprint: str | None,
    raw_fingerprint: str | None,
    first: Worker | None,
    wake_fd: int | None,
    should_abort: Callable[[], bool],
    on_wait: Callable[[], float | None],
) -> BuildResult:
    """The build's result, from the first worker that lives to give one.

    ``first`` is a worker already started (warm), or None. Each worker is stopped before
    this returns; ``[worker] timeout_seconds`` bounds them all together.
    """
    started = time.monotonic()
    killed_once: set[str] = set()
    reported: set[tuple[Any, ...]] = set()
    worker = first if first is not None and first.alive() else Worker(config)
    while True:
        request = make_request(
            config,
            resolution,
            staging,
            build_id,
            newest_fingerprint,
            raw_fingerprint,
            frozenset(reported),
        )
        try:
            return worker.run(
                request,
                timeout=config.worker.timeout_seconds,
                started=started,
                wake_fd=wake_fd,
                should_abort=should_abort,
                on_wait=on_wait,
            )
        except ModelFailed as failure:
            reported |= worker.reported
            resolution = _without(config, resolution, failure, build_id, killed_once)
            clear_staging(staging)
        finally:
            worker.stop()
        worker = Worker(config)


def _without(
    config: Config,
    resolution: Resolution,
    failure: ModelFailed,
    build_id: str,
    killed_once: set[str],
) -> Resolution:
    """The resolution for the next worker: the failed model refused, or tried once more."""
    step = failure.step
    log = get_logger()
    fields = {"signature": step.signature, "file": step.file, "step": step.step}
    if failure.signal in _FROM_OUTSIDE and step.signature not in killed_once:
        killed_once.add(step.signature)
        log.warning(
            "worker_replaced",
            **fields,
            reason=f"{failure}; its check is tried once more: that signal can come from "
            "outside the worker",
            refused=False,
        )
        return resolution
    log.warning("worker_replaced", **fields, reason=str(failure), refused=True)
    if failure.kind == "timeout":
        rejection = Rejection(
            "probe_timeout",
            f"{failure}: a kernel that never returns, or a model that needs larger `limits`",
            step.file,
            step.signature,
        )
    else:
        rejection = Rejection(
            "probe_crashed",
            f"{failure} on the {step.step} step of this model's check: TensorFlow crashed on "
            "it, and the build went on without it",
            step.file,
            step.signature,
        )
    rejections = (*resolution.rejections, rejection)
    if step.kept:
        # Its last accepted input did it: nothing of this signature is served by this build.
        return replace(
            resolution, rejections=rejections, unkept=resolution.unkept | {step.signature}
        )
    spec = next((s for s in resolution.specs if s.signature == step.signature), None)
    if spec is not None and step.sha256 is not None:
        Store(config.state_dir).record_verdict(
            limits.verdict_key(config, spec, step.sha256),
            limits.verdict_record(rejection, step.sha256, build_id),
        )
    return replace(
        resolution,
        specs=tuple(s for s in resolution.specs if s.signature != step.signature),
        rejections=rejections,
        refused_signatures=resolution.refused_signatures | {step.signature},
    )
