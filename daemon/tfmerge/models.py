"""What tfmerge knows about models, as plain data: no TensorFlow, no I/O.

These types cross the worker's process boundary (a build's result is unpickled in the
supervisor) and are shared by both sides, so they live apart from ``tfmerge.build``:
importing them never imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

#: TensorFlow's DataType enum values and their names (``tf.as_dtype(n).name``).
DTYPE_NAMES: Mapping[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    7: "string", 8: "complex64", 9: "int64", 10: "bool", 11: "qint8", 12: "quint8",
    13: "qint32", 14: "bfloat16", 15: "qint16", 16: "quint16", 17: "uint16",
    18: "complex128", 19: "float16", 20: "resource", 21: "variant", 22: "uint32",
    23: "uint64", 24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz",
    27: "float8_e4m3b11fnuz", 28: "float8_e5m2fnuz", 29: "int4", 30: "uint4",
    31: "int2", 32: "uint2", 33: "float4_e2m1fn",
}  # fmt: skip

#: Where a declaration came from: the config file, a sidecar, or discovery.
Origin = str
#: What a build produced. "built": staging holds a verified version; "unchanged": equal to
#: the newest version; "empty": no model was accepted; "failed": verification failed.
BuildOutcome = Literal["built", "unchanged", "empty", "failed"]
#: Refusals of a file that was not at rest when it was read: it is built again once it is.
UNSETTLED_CODES = frozenset({"still_being_written", "changed_while_read"})


@dataclass(frozen=True)
class ModelSpec:
    """One signature to serve, with its graph file resolved inside ``frozen_dir``."""

    signature: str
    relpath: str
    inputs: Mapping[str, str] | None  # None: infer from the graph's placeholders
    outputs: Mapping[str, str] | None  # None: infer from the graph's sink tensors
    sample: Mapping[str, Any] | None = None
    origin: Origin = "config"
    #: The digests the graph's bytes must have: (who declares it, sha256) pairs, from its
    #: ``NAME.pb.sha256`` file and from a ``sha256`` key of its entry.
    declared_sha256: tuple[tuple[str, str], ...] = ()
    #: The entry's ``allow_interface_change``: a breaking change of its signature is accepted.
    allow_interface_change: bool = False
    #: Keep the graph's device pins (``keep_devices``) instead of clearing them.
    keep_devices: bool = False

    @property
    def discovered(self) -> bool:
        return self.inputs is None


@dataclass(frozen=True)
class Rejection:
    """An input refused before or during a build: always a file and a reason."""

    code: str
    reason: str
    file: str | None = None
    signature: str | None = None
    #: Facts beside the reason, logged as fields of their own (a mismatch's two digests).
    details: tuple[tuple[str, Any], ...] = ()

    @property
    def unsettled(self) -> bool:
        """The file was not at rest when it was read: not a bad input, a build to come."""
        return self.code in UNSETTLED_CODES

    def as_dict(self) -> dict[str, Any]:
        fields = {"code": self.code, "reason": self.reason}
        named = {"file": self.file, "signature": self.signature}
        fields.update({key: value for key, value in named.items() if value is not None})
        fields.update(self.details)
        return fields


class ModelRejected(Exception):
    """A model refused by a check: a short code (docs/events.md) and a reason to act on."""

    def __init__(self, code: str, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.details = details
        #: The sha256 of the bytes read, when they were read whole but refused (unparseable):
        #: a declared digest then names the real cause, a torn upload.
        self.sha256: str | None = None


@dataclass(frozen=True)
class TensorSig:
    """A tensor as a SignatureDef describes it."""

    name: str
    dtype: int  # a DataType enum value
    shape: tuple[int, ...] | None  # None: unknown rank; -1: unknown dimension

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": DTYPE_NAMES.get(self.dtype, f"dtype_{self.dtype}"),
            "shape": self.shape,
        }


@dataclass(frozen=True)
class LargeConstant:
    """A large Const set aside from its graph: what the check feeds and the merge stores."""

    name: str
    dtype: int  # a DataType enum value
    shape: tuple[int, ...]
    value: np.ndarray
    #: Where the value's bytes are in the graph file, when they are there as they are.
    offset: int | None = None


@dataclass(frozen=True)
class AcceptedModel:
    """A model that passed every check, with the exact input it was built from."""

    signature: str
    relpath: str
    sha256: str
    size: int
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    sample: Mapping[str, Any] | None = None
    origin: Origin = "config"
    #: True when the current file was refused and this is its last good input.
    kept: bool = False
    #: Input and output types as the signature declares them, for `tfmerge status`.
    tensors: Mapping[str, Any] = field(default_factory=dict)
    keep_devices: bool = False

    @property
    def suffix(self) -> str:
        return ".pbtxt" if self.relpath.endswith(".pbtxt") else ".pb"

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON takes them. Not ``dataclasses.asdict``: its deep copy of every
        model's tensors and sample costs more than the JSON encoding, once per model for the
        state and once for the manifest, and nothing changes the result."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AcceptedModel:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def spec(self) -> ModelSpec:
        """The declaration this model was checked under, to check its kept copy again."""
        return ModelSpec(
            signature=self.signature,
            relpath=self.relpath,
            inputs=self.inputs,
            outputs=self.outputs,
            sample=self.sample,
            origin=self.origin,
            keep_devices=self.keep_devices,
        )


@dataclass(frozen=True)
class BuildResult:
    """What a build did, in plain data: it crosses the worker's process boundary."""

    build_id: str
    outcome: BuildOutcome
    staging: str | None
    fingerprint: str | None
    models: tuple[AcceptedModel, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    mismatches: tuple[tuple[str, str], ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    #: Fingerprint of the files as read (specs.raw_fingerprint), for the next start-up check.
    raw_fingerprint: str | None = None
    #: Files (relative to frozen_dir) refused because they were still being written or changed
    #: while they were read: the supervisor settles them again and builds once they are at rest.
    unsettled: tuple[str, ...] = ()


def _plain(value: Any) -> Any:
    """A mapping as a dict (JSON does not take other mappings); anything else as it is."""
    return dict(value) if isinstance(value, Mapping) and not isinstance(value, dict) else value
