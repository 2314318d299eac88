"""What checking one model may take, and the refusals remembered for an input. No TensorFlow.

A hostile graph can ask for more than the host has: a probe input of petabytes, a tensor of
12 GB from a 139-byte file, a loop that never ends, a crash inside TensorFlow. Each model's
check runs under limits sized from its file ([check] in the config, a [[models]] entry's
``limits``), and a refusal for one of those reasons is remembered by the input's sha256 and
its declaration: the same bytes are refused again as they were, without being run, until the
file, its declaration or its limits change.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from tfmerge import __version__
from tfmerge.config import Config
from tfmerge.declarations import CheckLimits, limits_over
from tfmerge.models import ModelSpec, Rejection
from tfmerge.specs import spec_key

MiB = 1 << 20
#: Time allowed per byte of the file on top of [check] seconds: 1 s per 10 MiB (a model of
#: 2 GiB gets 205 s more), for reading and hashing it, and for a graph that size to run.
_SECONDS_PER_BYTE = 1 / (10 * MiB)
#: Memory allowed per byte of the file on top of [check] memory_bytes: a model's constants
#: are held once as read, and again by the kernels that use them.
_MEMORY_PER_BYTE = 2

#: Refusals that cost a run (or a worker) to find: remembered, and not run again.
REMEMBERED_CODES = frozenset(
    {
        "probe_too_large",
        "tensor_too_large",
        "resource_exhausted",
        "probe_timeout",
        "probe_crashed",
        "recursive_function",
    }
)


@dataclass(frozen=True)
class ModelLimits:
    """The limits of one model's check, its file size counted."""

    #: Each step (read, import, probe run); the daemon ends a worker stuck longer.
    seconds: float
    #: What the import and the probe run may take on top of what the process holds.
    memory_bytes: int
    #: The generated probe values, numpy's float64 temporaries counted.
    probe_bytes: int


def human_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} PiB"


def declared(config: Config, signature: str) -> CheckLimits:
    """[check], with the ``limits`` of the model's [[models]] entry in the config over it."""
    return limits_over(config.check, config.entry_limits.get(signature))


def for_model(config: Config, signature: str, file_size: int) -> ModelLimits:
    base = declared(config, signature)
    return ModelLimits(
        seconds=base.seconds + file_size * _SECONDS_PER_BYTE,
        memory_bytes=base.memory_bytes + _MEMORY_PER_BYTE * file_size,
        probe_bytes=base.probe_bytes,
    )


def verdict_key(config: Config, spec: ModelSpec, sha256: str) -> str:
    """What a remembered refusal is about: these bytes, declared so, under these limits."""
    payload = {
        "sha256": sha256,
        "declaration": spec_key(spec),
        "limits": asdict(declared(config, spec.signature)),
        "tool": __version__,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def verdict_record(rejection: Rejection, sha256: str, build_id: str | None) -> dict[str, Any]:
    return {
        "code": rejection.code,
        "reason": rejection.reason,
        "file": rejection.file,
        "signature": rejection.signature,
        "sha256": sha256,
        "build_id": build_id,
        "recorded": time.time(),
    }
