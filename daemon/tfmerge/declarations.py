"""Model declarations: a ``[[models]]`` entry of the config or of a sidecar, and the
``[check]`` limits a config entry may set for its own model. No TensorFlow here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tfmerge.tomltable import Problem, Table

GiB = 1024**3
MiB = 1024**2
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/>]*(:\d+)?$")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")

#: Characters a signature name may not hold: the history files list names one a line in
#: ``exported_models`` and comma-separated in ``current_version``, whose fields are tabs. C1
#: controls and U+2028/U+2029 count: Python's splitlines() breaks lines at several of them.
_UNLISTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029,]")


def signature_problem(name: str) -> str | None:
    """Why a signature name cannot be served (to follow the name), or None."""
    if _UNLISTABLE.search(name):
        return (
            "holds a comma, a tab, a newline or another control character, and the history "
            "files (current_version, exported_models) list signatures one a line, "
            "comma-separated"
        )
    return None


@dataclass(frozen=True)
class ModelDecl:
    """One declared model: a signature served from a tensor map of one frozen graph."""

    signature: str
    frozen: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    sample: Mapping[str, Any] | None = None
    #: Where the declaration came from, for messages: "config models[0]", "sidecar a/b.toml".
    origin: str = "config"
    #: This model's own [check] settings (key -> value), over those of the config.
    limits: Mapping[str, float] | None = None
    #: The sha256 the graph's bytes must have (lowercase hex), or None.
    sha256: str | None = None
    #: Accept a change of the signature's interface that would break its clients.
    allow_interface_change: bool = False
    #: Keep the graph's device pins; None: as the top-level ``keep_devices`` says.
    keep_devices: bool | None = None


@dataclass(frozen=True)
class CheckLimits:
    """What checking one model may take. A model's file adds to the time and memory allowed
    (tfmerge.limits.for_model); a ``[[models]]`` entry may set its own."""

    #: Each step of one model's check (read, import, probe run), plus 1 s per 10 MiB of file.
    seconds: float = 60.0
    #: Memory the import and probe run may take on top of what the process holds, plus twice
    #: the file's size.
    memory_bytes: int = 4 * GiB
    #: Generated probe values of one model, numpy's float64 temporaries counted.
    probe_bytes: int = GiB


def _string_map(table: Table, name: str, *, required: bool) -> dict[str, str]:
    value = table.take(name)
    if value is None:
        if required:
            table.problem(name, 'is required: a table of key = "tensor:0" pairs')
        return {}
    if not isinstance(value, dict) or not value:
        table.problem(name, f'expected a non-empty table of key = "tensor:0" pairs, got {value!r}')
        return {}
    result: dict[str, str] = {}
    for key, tensor in value.items():
        if not isinstance(tensor, str) or not _TENSOR_NAME.match(tensor):
            table.problem(
                f"{name}.{key}", f"expected a tensor name like 'scope/op:0', got {tensor!r}"
            )
            continue
        result[key] = tensor if ":" in tensor else f"{tensor}:0"
    return result


def parse_models(raw: Any, prefix: str, origin: str, problems: list[Problem]) -> list[ModelDecl]:
    """Parse a ``[[models]]`` array (from the config or from a sidecar file)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append(Problem(prefix.rstrip("."), "expected an array of tables ([[models]])"))
        return []
    models = []
    for index, entry in enumerate(raw):
        where = f"{prefix}[{index}]"
        if not isinstance(entry, dict):
            problems.append(Problem(where, "expected a table"))
            continue
        before = len(problems)
        table = Table(entry, f"{where}.", problems, ModelDecl)
        signature = table.string("signature", required=True)
        if signature is not None and (problem := signature_problem(signature)) is not None:
            table.problem("signature", f"{signature!r} {problem}")
        frozen = table.string("frozen", required=origin == "config")
        inputs = _string_map(table, "inputs", required=True)
        outputs = _string_map(table, "outputs", required=True)
        sha256 = table.string("sha256")
        if sha256 is not None and not _SHA256_HEX.match(sha256):
            table.problem("sha256", f"expected 64 hexadecimal digits, got {sha256!r}")
        allow_change = table.boolean("allow_interface_change")
        sample = table.take("sample")
        if sample is not None and not isinstance(sample, dict):
            table.problem("sample", "expected a table of input key = value (nested arrays)")
        elif sample is not None:
            for key in sample:
                if key not in inputs:
                    table.problem(f"sample.{key}", f"names no input (inputs are {sorted(inputs)})")
        limits = _model_limits(table, origin)
        keep_devices = table.take("keep_devices")
        if keep_devices is not None and not isinstance(keep_devices, bool):
            table.problem("keep_devices", f"expected true or false, got {keep_devices!r}")
        table.finish()
        if len(problems) == before:
            models.append(
                ModelDecl(
                    signature=signature,
                    frozen=frozen or "",
                    inputs=inputs,
                    outputs=outputs,
                    sample=sample,
                    origin=f"{origin} {where}",
                    limits=limits,
                    sha256=sha256.lower() if sha256 else None,
                    allow_interface_change=allow_change,
                    keep_devices=keep_devices,
                )
            )
    return models


#: Each [check] key (also those of a [[models]] entry's ``limits`` table): its smallest value
#: and whether it is a whole number.
_CHECK_BOUNDS: Mapping[str, tuple[float, bool]] = {
    "seconds": (1.0, False),
    "memory_bytes": (64 * MiB, True),
    "probe_bytes": (1, True),
}


def limits_over(base: CheckLimits, given: Mapping[str, float] | None) -> CheckLimits:
    """``base`` with the keys of ``given`` (a [[models]] entry's ``limits``) in their place."""
    given = given or {}
    return CheckLimits(
        seconds=float(given.get("seconds", base.seconds)),
        memory_bytes=int(given.get("memory_bytes", base.memory_bytes)),
        probe_bytes=int(given.get("probe_bytes", base.probe_bytes)),
    )


def limits_table(table: Table) -> dict[str, float]:
    """The [check] keys given in table, each checked; the keys not given are left out."""
    given: dict[str, float] = {}
    for name, (minimum, integer) in _CHECK_BOUNDS.items():
        if table.has(name):
            given[name] = table.number(name, minimum=minimum, integer=integer)
    table.finish()
    return given


def _model_limits(table: Table, origin: str) -> dict[str, float] | None:
    if not table.has("limits"):
        return None
    if origin != "config":
        # An upload must not grant itself more memory or time than the host's owner allows.
        table.take("limits")
        table.problem("limits", "only the config file may set a model's limits")
        return None
    return limits_table(table.table("limits", CheckLimits))
