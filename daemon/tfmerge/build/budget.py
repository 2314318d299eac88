"""A model's probe run under its memory and time budget; what goes wrong there, as a refusal.

Memory: RLIMIT_DATA, lowered to what the process holds now plus the model's budget for the
probe, then put back. Over it, numpy raises MemoryError and TensorFlow's allocator fails
with ResourceExhausted: a refusal, where the kernel's out-of-memory killer would have ended
the whole process (and the build of every other model with it). RLIMIT_DATA counts the
private writable memory a process maps (heap, numpy arrays, tensors, thread stacks), not the
address space glibc reserves per thread arena, which makes RLIMIT_AS unusable as a budget.
TensorFlow's thread pools must exist before the limit is first lowered (their stacks count,
and a pool that cannot start aborts the process), so the first budget starts a session.

Time: the run's deadline (RunOptions) ends a loop that never ends with DeadlineExceeded, and
the session stays usable. One kernel that runs for hours is not interrupted by it: the
daemon's side of the worker pipe ends such a worker (tfmerge.progress).

Worker side.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge.build import capi, devices, probe, staticcheck, tfcore
from tfmerge.limits import ModelLimits, human_bytes
from tfmerge.logs import get_logger
from tfmerge.models import LargeConstant, ModelRejected, ModelSpec, TensorSig

_pools_started = False
_limit_refused = False


def _start_pools() -> None:
    """Run one tiny session, so that TensorFlow's process-wide thread pools exist."""
    global _pools_started  # noqa: PLW0603 - once per process
    if _pools_started:
        return
    graph_def = tfcore.graph_pb2.GraphDef()
    node = graph_def.node.add(name="zeros", op="Const")
    node.attr["dtype"].type = tfcore.dtypes.float32.as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tfcore.make_tensor_proto(np.zeros(2, np.float32)))
    graph = capi.Graph()
    try:
        graph.import_graph_def(graph_def.SerializeToString())
        with capi.Session(graph, probe.check_session_config().SerializeToString()) as session:
            session.run({}, ["zeros:0"])
    finally:
        graph.close()
    _pools_started = True


def data_in_use() -> int:
    """VmData: the private writable memory this process has mapped, in bytes."""
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


@contextlib.contextmanager
def memory(extra: int) -> Iterator[None]:
    """Let the process map at most ``extra`` more bytes than now, within the block."""
    global _limit_refused  # noqa: PLW0603 - said once per process
    _start_pools()
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_in_use() + extra
    for outer in (soft, hard):
        if outer != resource.RLIM_INFINITY:
            limit = min(limit, outer)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except OSError as exc:
        # A seccomp filter that denies prlimit64: the probe runs with no window of its own.
        if not _limit_refused:
            _limit_refused = True
            get_logger().warning("memory_window_unavailable", reason=str(exc))
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def probe_run(
    spec: ModelSpec,
    graph: Any,
    graph_def: Any,
    init_nodes: Sequence[str],
    inputs: Mapping[str, TensorSig],
    outputs: Mapping[str, TensorSig],
    large: Sequence[LargeConstant],
    limits: ModelLimits,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The probe input of a model and its source graph's outputs on it, within its limits.

    What can be told from the graph is told first: the probe input's size, then every
    tensor's static size (a huge input's consumers are as huge as the input).
    """
    staticcheck.check_probe_sizes(inputs, spec.sample, limits)
    staticcheck.check_tensors(graph, graph_def, limits)
    with memory(limits.memory_bytes):
        try:
            feeds = probe.probe_inputs(spec.signature, inputs, spec.sample)
        except MemoryError as exc:
            raise ModelRejected(
                "probe_too_large",
                "its probe input does not fit in this model's memory budget of "
                f"{human_bytes(limits.memory_bytes)} ({exc}): give its inputs a `sample`",
            ) from exc
        try:
            expected = probe.run_graph(
                graph,
                init_nodes,
                {inputs[k].name: v for k, v in feeds.items()}
                | {f"{c.name}:0": c.value for c in large},
                {k: s.name for k, s in outputs.items()},
                timeout_seconds=limits.seconds,
            )
        except Exception as exc:  # any kernel error on the probe input, whatever its type
            raise _refusal(exc, limits) from exc
    return feeds, expected


def _refusal(error: Exception, limits: ModelLimits) -> ModelRejected:
    message = getattr(error, "message", None) or str(error)
    if isinstance(error, capi.DeadlineExceededError):
        return ModelRejected(
            "probe_timeout",
            f"the probe run did not finish within this model's {limits.seconds:.0f} s: a loop "
            "that never ends, or a model that needs larger `limits`",
        )
    if isinstance(error, MemoryError | capi.ResourceExhaustedError):
        return ModelRejected(
            "resource_exhausted",
            f"the probe run needs more than this model's memory budget of "
            f"{human_bytes(limits.memory_bytes)} ({type(error).__name__}: {_gist(message)}); "
            "a model that needs more can be given larger `limits`",
        )
    return devices.source_failure(error)


def _gist(message: str) -> str:
    """The line of a TensorFlow error that says what failed (its first is often generic)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    telling = [line for line in lines if "OOM" in line or "llocat" in line]
    return (telling or lines or [""])[0][:300]
