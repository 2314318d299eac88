"""What a build does without a model that ended its worker (tfmerge.daemon.runner).

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
from dataclasses import replace

from tfmerge import limits
from tfmerge.config import Config
from tfmerge.daemon.worker import ModelFailed
from tfmerge.folders.state import Store
from tfmerge.logs import get_logger
from tfmerge.models import Rejection
from tfmerge.specs import Resolution

_FROM_OUTSIDE = frozenset({signal.SIGKILL, signal.SIGTERM})


def leave_out(
    config: Config,
    resolution: Resolution,
    failure: ModelFailed,
    build_id: str,
    killed_once: set[str],
) -> Resolution:
    """The resolution for the next worker: the failed model refused, or tried once more.

    ``killed_once`` holds the signatures a SIGKILL or SIGTERM already cost one try in this
    build; it is updated here.
    """
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
