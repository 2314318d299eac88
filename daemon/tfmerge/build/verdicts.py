"""What the check of an input found, kept so that an unchanged model is not checked again.

Worker side. A model's check (op policy, import, tensor types, probe run) depends only on its
file's bytes, its declaration, the limits it runs under, the TensorFlow that runs it and the
settings below. Once it
passes, its verdict is written to ``state_dir/checks/``: the tensors its signature serves,
with their types, and the probe feeds with the outputs the source graph computed on them. A
later build that reads the same bytes under the same declaration, TensorFlow, tfmerge and
settings reuses that verdict instead of importing and running the graph again. The merged
model is still loaded and every signature run against those outputs (verify.py), so a verdict
saves the check of a source, never the check of what is published.

The key of a verdict is a digest of everything it depends on (``key``): anything that differs
(one byte of the file, a renamed output, another sample, lower limits, ``allow_ops``, another
TensorFlow) is another key, which is a miss. What does not depend on the bytes alone is checked
on every build all the same: the declared digest, and the interface against the signature's
last accepted one. A record carries a checksum of its contents: a damaged, partly
written or unreadable record is a miss too, and a miss is a full check. A build writes its new
verdicts in one pack file, not synced (folders/packs.py: a cache whose records check
themselves loses nothing it needs in a power loss), and the verdicts of inputs no longer in
use are removed with their blobs.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge import __version__, oppolicy
from tfmerge.build import constants, tfcore
from tfmerge.build.probe import check_session_config
from tfmerge.config import Config
from tfmerge.folders.packs import Packs, Record
from tfmerge.limits import ModelLimits
from tfmerge.models import ModelSpec, TensorSig

#: Bumped whenever the check changes what it finds for the same input: older verdicts are
#: then misses.
CHECK_FORMAT = 2
#: Settings of TensorFlow's CPU kernels that can change the last bits of a float: a verdict
#: found under one (a ``tfmerge build`` from a shell) is not the one for another (the unit).
_KERNEL_SETTINGS = (
    "TF_ENABLE_ONEDNN_OPTS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "OMP_NUM_THREADS",
)


def _cpu() -> str:
    """The CPU as kernels see it: its feature flags and the CPUs this process may use.

    A host moved to another CPU (a resized or migrated virtual machine) picks other kernels.
    Where /proc/cpuinfo is hidden (the unit's ProcSubset=pid), the count alone is known.
    """
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    with contextlib.suppress(OSError), cpuinfo.open(encoding="ascii", errors="replace") as lines:
        flags = next((line for line in lines if line.startswith("flags")), "")
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    return f"{len(os.sched_getaffinity(0))} cpus, flags {digest if flags else 'unknown'}"


#: What else a verdict depends on. A module-level mapping, so that a test can stand for
#: another TensorFlow or another CPU without installing or having one.
ENVIRONMENT: dict[str, str] = {
    "tensorflow": tfcore.VERSION,
    "tensorflow_git": tfcore.GIT_VERSION,
    "tfmerge": __version__,
    "cpu": _cpu(),
    **{f"env.{name}": os.environ.get(name, "") for name in _KERNEL_SETTINGS},
}
_STRING = 7


@dataclass(frozen=True)
class Verdict:
    """A passed check: the signature's tensors, and the probe with what the source computed."""

    inputs: dict[str, str]
    outputs: dict[str, str]
    input_sigs: dict[str, TensorSig]
    output_sigs: dict[str, TensorSig]
    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def key(spec: ModelSpec, sha256: str, limits: ModelLimits, config: Config) -> str:
    """The digest of everything a model's check depends on."""
    return _key(_settings(config), spec, sha256, limits)


def _settings(config: Config) -> str:
    """What a check depends on besides its input: the same for every model of a build."""
    payload = {
        "format": CHECK_FORMAT,
        "environment": dict(sorted(ENVIRONMENT.items())),
        "allow_ops": sorted(config.allow_ops),
        "denied_ops": sorted(oppolicy.DENIED_OPS),
        "max_model_bytes": config.max_model_bytes,
        "large_constant_bytes": constants.LARGE_CONSTANT_BYTES,
        "shard_constant_bytes": constants.SHARD_CONSTANT_BYTES,
        "session": check_session_config().SerializeToString(deterministic=True).hex(),
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def _key(settings: str, spec: ModelSpec, sha256: str, limits: ModelLimits) -> str:
    # Every field of the declaration, the ones to come included.
    declaration = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    model = {"sha256": sha256, "declaration": declaration, "limits": dataclasses.asdict(limits)}
    text = json.dumps(model, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{settings}\n{text}".encode()).hexdigest()


class Verdicts:
    """The verdicts in one folder (``state_dir/checks``), for one build's config."""

    def __init__(self, folder: Path, config: Config) -> None:
        self._packs = Packs(folder)
        self._settings = _settings(config)
        self._known: dict[str, Record] | None = None
        self._new: list[Record] = []
        #: The key of each verdict this build reused, by signature.
        self._used: dict[str, str] = {}
        #: How many checks this build reused, and how many verdicts it wrote.
        self.reused = 0
        self.stored = 0

    def get(self, spec: ModelSpec, sha256: str, limits: ModelLimits) -> Verdict | None:
        """The verdict of this very check, or None (no record, or a damaged one)."""
        if self._known is None:
            self._known = self._packs.records()
        key = _key(self._settings, spec, sha256, limits)
        record = self._known.get(key)
        if record is None:
            return None
        try:
            verdict = _decode(json.loads(record.body))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        self.reused += 1
        self._used[spec.signature] = key
        return verdict

    def forget(self, signatures: Iterable[str]) -> list[str]:
        """Drop the reused verdicts of these signatures, so that their next check is a full
        one; returns the signatures whose verdict was dropped.

        For a verification that failed: a verdict whose outputs the merged model does not
        reproduce must not be reused again, whatever the key missed.
        """
        dropped = sorted({s for s in signatures if s in self._used})
        if dropped:
            with contextlib.suppress(OSError):
                self._packs.forget({self._used[s] for s in dropped})
        return dropped

    def put(self, spec: ModelSpec, sha256: str, limits: ModelLimits, verdict: Verdict) -> None:
        body = json.dumps(_encode(verdict), separators=(",", ":")).encode()
        self._new.append(Record(_key(self._settings, spec, sha256, limits), sha256, body))

    def flush(self) -> None:
        """Write the verdicts put so far, all in one pack (folders/packs.py)."""
        new, self._new = self._new, []
        try:
            self._packs.write(new)
        except OSError:
            return  # a verdict not kept is a check made again next time
        self.stored += len(new)


def _encode(verdict: Verdict) -> dict[str, Any]:
    def sigs(values: Mapping[str, TensorSig]) -> dict[str, Any]:
        return {k: [s.name, s.dtype, s.shape] for k, s in values.items()}

    return {
        "inputs": dict(verdict.inputs),
        "outputs": dict(verdict.outputs),
        "input_sigs": sigs(verdict.input_sigs),
        "output_sigs": sigs(verdict.output_sigs),
        "feeds": {k: _array_to_json(v) for k, v in verdict.feeds.items()},
        "expected": {k: _array_to_json(v) for k, v in verdict.expected.items()},
    }


def _decode(body: Mapping[str, Any]) -> Verdict:
    def sigs(values: Mapping[str, Any]) -> dict[str, TensorSig]:
        return {k: TensorSig(str(n), int(t), _shape(s)) for k, (n, t, s) in values.items()}

    return Verdict(
        inputs={str(k): str(v) for k, v in body["inputs"].items()},
        outputs={str(k): str(v) for k, v in body["outputs"].items()},
        input_sigs=sigs(body["input_sigs"]),
        output_sigs=sigs(body["output_sigs"]),
        feeds={k: _array_from_json(v) for k, v in body["feeds"].items()},
        expected={k: _array_from_json(v) for k, v in body["expected"].items()},
    )


def _shape(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(d) for d in value)


def _array_to_json(value: np.ndarray) -> dict[str, Any]:
    array = np.asarray(value)
    dtype = tfcore.dtypes.as_dtype(array.dtype).as_datatype_enum
    if dtype == _STRING:
        items = [i if isinstance(i, bytes) else str(i).encode() for i in array.reshape(-1)]
        data: Any = [base64.b64encode(item).decode() for item in items]
    else:
        data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()
    return {"dtype": dtype, "shape": list(array.shape), "data": data}


def _array_from_json(value: Mapping[str, Any]) -> np.ndarray:
    dtype, shape = int(value["dtype"]), tuple(int(d) for d in value["shape"])
    if dtype == _STRING:
        items = [base64.b64decode(item) for item in value["data"]]
        strings: np.ndarray = np.empty(len(items), dtype=object)
        strings[:] = items
        return strings.reshape(shape)
    numpy_dtype = np.dtype(tfcore.dtypes.as_dtype(dtype).as_numpy_dtype)
    array: np.ndarray = np.frombuffer(base64.b64decode(value["data"]), numpy_dtype)
    return array.reshape(shape).copy()
