"""The configuration file: TOML in, frozen dataclasses out, every error reported at once.

Relative paths resolve against the folder of the file that holds them. No TensorFlow here:
the supervisor loads and reloads the configuration.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from tfmerge import oppolicy
from tfmerge.declarations import CheckLimits, ModelDecl, limits_over, limits_table, parse_models
from tfmerge.tolerance import DEFAULT_TOLERANCES, Tolerance
from tfmerge.tomltable import Problem, Table

GiB = 1024**3
MiB = 1024**2
_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOG_FORMATS = ("auto", "json", "console")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration file that cannot be used. Lists every problem found, not just the first."""

    def __init__(self, path: Path, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class WatchSettings:
    quiet_seconds: float = 2.0
    max_wait_seconds: float = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    timeout_seconds: float = 1800.0
    #: On by default: measured on 50 models of 200 KB, a warm worker publishes 0.8 s after
    #: the quiet period instead of 2.0 s, for about 370 MiB held while idle
    #: (docs/benchmarks.md).
    warm: bool = True
    retries: int = 3


@dataclass(frozen=True)
class LogSettings:
    format: Literal["auto", "json", "console"] = "auto"
    level: str = "info"


@dataclass(frozen=True)
class ServingSettings:
    """Where the TensorFlow Serving that serves serving_dir answers; all optional."""

    #: e.g. "http://127.0.0.1:8501"; when set, every publish is followed until it is live.
    rest_url: str | None = None
    #: e.g. "127.0.0.1:8500", for `tfmerge smoke` over gRPC.
    grpc_target: str | None = None
    #: The name TensorFlow Serving serves serving_dir under (--model_name).
    model_name: str = "model"
    #: How long a new version may take to become AVAILABLE before it counts as failed.
    live_timeout_seconds: float = 300.0
    #: On a failed version: move it out of serving_dir, republish the last live version.
    rollback_on_failure: bool = True


@dataclass(frozen=True)
class SmokeSettings:
    """How `tfmerge smoke` judges a live server's answers."""

    #: Per float dtype name: how far an answer may be from the source's output. The server
    #: runs its own optimisations, so its floats may differ in the last bits.
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))


@dataclass(frozen=True)
class MetricsSettings:
    #: "HOST:PORT" of the Prometheus endpoint; None: no endpoint.
    listen: str | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    frozen_dir: Path
    serving_dir: Path
    state_dir: Path
    discover: bool = True
    max_model_bytes: int = 2 * GiB
    #: The largest sidecar or digest file read; a larger one is refused unread.
    max_sidecar_bytes: int = MiB
    #: Accept every change of a signature's interface that would break its clients.
    allow_interface_change: bool = False
    keep_versions: int = 5
    allow_ops: tuple[str, ...] = ()
    #: Keep device pins (``/device:GPU:0``) of every graph instead of clearing them.
    keep_devices: bool = False
    models: tuple[ModelDecl, ...] = ()
    watch: WatchSettings = field(default_factory=WatchSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    check: CheckLimits = field(default_factory=CheckLimits)
    log: LogSettings = field(default_factory=LogSettings)
    #: Signature that clients naming none (``serving_default``) get.
    default_signature: str | None = None
    serving: ServingSettings = field(default_factory=ServingSettings)
    smoke: SmokeSettings = field(default_factory=SmokeSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @cached_property
    def entry_limits(self) -> dict[str, Mapping[str, float] | None]:
        """Each [[models]] entry's own ``limits`` (None: none), by signature; asked for once
        or more per model and build, so looked up, not scanned for."""
        own: dict[str, Mapping[str, float] | None] = {}
        for model in self.models:
            own.setdefault(model.signature, model.limits)
        return own


def _path(table: Table, name: str, base: Path) -> Path:
    value = table.string(name, required=True)
    return (base / (value or ".")).resolve()


def load(path: Path) -> Config:
    """Load and check a configuration file. Raises ConfigError listing every problem."""
    path = Path(path).absolute()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, [Problem("", f"cannot read: {exc.strerror or exc}")]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [Problem("", f"not valid TOML: {exc}")]) from exc
    return parse(data, path)


def parse(data: Mapping[str, Any], path: Path) -> Config:
    problems: list[Problem] = []
    base = path.parent
    top = Table(data, "", problems, Config)
    frozen_dir = _path(top, "frozen_dir", base)
    serving_dir = _path(top, "serving_dir", base)
    state_dir = _path(top, "state_dir", base)
    discover = top.boolean("discover")
    max_model_bytes = top.number("max_model_bytes", minimum=1, integer=True)
    max_sidecar_bytes = top.number("max_sidecar_bytes", minimum=1, integer=True)
    allow_interface_change = top.boolean("allow_interface_change")
    keep_versions = top.number("keep_versions", minimum=2, integer=True)
    keep_devices = top.boolean("keep_devices")
    allow_ops = top.take("allow_ops", list(top.default("allow_ops")))
    if not isinstance(allow_ops, list) or not all(
        isinstance(op, str) and _OP_NAME.match(op) for op in allow_ops
    ):
        top.problem(
            "allow_ops", f'expected an array of op names like ["ReadFile"], got {allow_ops!r}'
        )
        allow_ops = []
    for name in oppolicy.unknown_allowed_ops(allow_ops):
        top.problem("allow_ops", f"{name!r} is not a refused op, so allowing it changes nothing")
    models = parse_models(top.take("models"), "models", "config", problems)

    watch_table = top.table("watch", WatchSettings)
    quiet = watch_table.number("quiet_seconds", minimum=0.0)
    max_wait = watch_table.number("max_wait_seconds", minimum=0.0)
    if max_wait < quiet:
        watch_table.problem("max_wait_seconds", f"must be >= quiet_seconds ({quiet})")
    watch_table.finish()

    worker_table = top.table("worker", WorkerSettings)
    worker = WorkerSettings(
        timeout_seconds=worker_table.number("timeout_seconds", minimum=1.0),
        warm=worker_table.boolean("warm"),
        retries=worker_table.number("retries", minimum=0, integer=True),
    )
    worker_table.finish()

    check = limits_over(CheckLimits(), limits_table(top.table("check", CheckLimits)))

    log_table = top.table("log", LogSettings)
    log = LogSettings(
        format=log_table.choice("format", _LOG_FORMATS),
        level=log_table.choice("level", _LOG_LEVELS),
    )
    log_table.finish()
    default_signature = top.string("default_signature")
    serving = _serving(top.table("serving", ServingSettings))
    smoke = _smoke(top.table("smoke"))
    metrics_table = top.table("metrics", MetricsSettings)
    listen = metrics_table.string("listen")
    if listen is not None and not _HOST_PORT.match(listen):
        metrics_table.problem("listen", f"expected HOST:PORT like 127.0.0.1:9464, got {listen!r}")
    metrics_table.finish()
    top.finish()

    folders_given = len(problems) == 0 or not any(
        p.key in ("frozen_dir", "serving_dir", "state_dir") for p in problems
    )
    if folders_given:
        problems.extend(_overlapping_folders(frozen_dir, serving_dir, state_dir))
    problems.extend(_duplicate_signatures(models))
    if problems:
        raise ConfigError(path, problems)
    return Config(
        path=path,
        frozen_dir=frozen_dir,
        serving_dir=serving_dir,
        state_dir=state_dir,
        discover=discover,
        max_model_bytes=max_model_bytes,
        max_sidecar_bytes=max_sidecar_bytes,
        allow_interface_change=allow_interface_change,
        keep_versions=keep_versions,
        allow_ops=tuple(sorted(set(allow_ops))),
        keep_devices=keep_devices,
        models=tuple(models),
        watch=WatchSettings(quiet_seconds=float(quiet), max_wait_seconds=float(max_wait)),
        worker=worker,
        check=check,
        log=log,
        default_signature=default_signature,
        serving=serving,
        smoke=smoke,
        metrics=MetricsSettings(listen=listen),
    )


def _overlapping_folders(frozen_dir: Path, serving_dir: Path, state_dir: Path) -> list[Problem]:
    """The three folders must be apart: discovery would read versions or state as inputs."""
    folders = {"frozen_dir": frozen_dir, "serving_dir": serving_dir, "state_dir": state_dir}
    problems = []
    for name, folder in folders.items():
        for other_name, other in folders.items():
            if name == other_name:
                continue
            if folder == other and name < other_name:
                problems.append(Problem(other_name, f"must differ from {name} ({folder})"))
            elif folder != other and folder.is_relative_to(other):
                problems.append(Problem(name, f"must not be inside {other_name} ({other})"))
    return problems


def _serving(table: Table) -> ServingSettings:
    rest_url = table.string("rest_url")
    if rest_url is not None and not rest_url.startswith(("http://", "https://")):
        table.problem("rest_url", f"expected an http:// or https:// URL, got {rest_url!r}")
    grpc_target = table.string("grpc_target")
    if grpc_target is not None and not _HOST_PORT.match(grpc_target):
        table.problem("grpc_target", f"expected HOST:PORT like 127.0.0.1:8500, got {grpc_target!r}")
    settings = ServingSettings(
        rest_url=rest_url.rstrip("/") if rest_url else None,
        grpc_target=grpc_target,
        model_name=table.string("model_name"),
        live_timeout_seconds=float(table.number("live_timeout_seconds", minimum=1.0)),
        rollback_on_failure=table.boolean("rollback_on_failure"),
    )
    table.finish()
    return settings


def _smoke(table: Table) -> SmokeSettings:
    tolerance_table = table.table("tolerance")
    tolerances = {}
    for dtype, default in DEFAULT_TOLERANCES.items():
        entry = tolerance_table.table(dtype, default)
        tolerances[dtype] = Tolerance(
            rtol=float(entry.number("rtol", minimum=0.0)),
            atol=float(entry.number("atol", minimum=0.0)),
        )
        entry.finish(("rtol", "atol"))
    tolerance_table.finish(tuple(DEFAULT_TOLERANCES))
    table.finish()
    return SmokeSettings(tolerances=tolerances)


def _duplicate_signatures(models: Sequence[ModelDecl]) -> Iterator[Problem]:
    seen: dict[str, str] = {}
    for model in models:
        if model.signature in seen:
            yield Problem(
                model.origin.removeprefix("config "),
                f"signature {model.signature!r} is already declared by {seen[model.signature]}",
            )
        else:
            seen[model.signature] = model.origin.removeprefix("config ")
