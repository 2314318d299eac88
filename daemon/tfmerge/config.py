"""The configuration file: TOML in, frozen dataclasses out, every error reported at once.

Relative paths resolve against the folder of the file that holds them. No TensorFlow here:
the supervisor loads and reloads the configuration.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tfmerge import oppolicy
from tfmerge.tolerance import DEFAULT_TOLERANCES, Tolerance

GiB = 1024**3
MiB = 1024**2
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/>]*(:\d+)?$")
_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOG_FORMATS = ("auto", "json", "console")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
#: Characters a signature name may not hold: the history files list names one a line in
#: ``exported_models`` and comma-separated in ``current_version``, whose fields are tabs. C1
#: controls and U+2028/U+2029 count: Python's splitlines() breaks lines at several of them.
_UNLISTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029,]")
MiB = 1024**2


def signature_problem(name: str) -> str | None:
    """Why a signature name cannot be served (to follow the name), or None."""
    if _UNLISTABLE.search(name):
        return (
            "holds a comma, a tab, a newline or another control character, and the history "
            "files (current_version, exported_models) list signatures one a line, "
            "comma-separated"
        )
    return None


_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file: where, and what was expected."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(Exception):
    """A configuration file that cannot be used. Lists every problem found, not just the first."""

    def __init__(self, path: Path, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s)\n{lines}")


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
class WatchSettings:
    quiet_seconds: float = 2.0
    max_wait_seconds: float = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    timeout_seconds: float = 1800.0
    #: On by default: measured on 50 models of 200 KB, a warm worker publishes 1.25 s after
    #: the quiet period instead of 6.0 s, for 572 MiB held while idle (docs/benchmarks.md).
    warm: bool = True
    retries: int = 3


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


class _Table:
    """Reads keys out of one TOML table, recording problems instead of raising.

    ``settings`` is the dataclass the table fills: a key's default is that class's field
    default, so every default is written once, in the dataclass.
    """

    def __init__(
        self, data: Mapping[str, Any], prefix: str, problems: list[Problem], settings: Any = None
    ) -> None:
        self._data = dict(data)
        self._prefix = prefix
        self._problems = problems
        # Fields with a default_factory are tables of their own, read with their own class.
        # An instance instead of a class gives its own values as the defaults (a table whose
        # defaults depend on its name, such as one tolerance per dtype).
        if settings is None:
            self._defaults: dict[str, Any] = {}
        elif isinstance(settings, type):
            self._defaults = {
                f.name: f.default for f in fields(settings) if f.default is not MISSING
            }
        else:
            self._defaults = {f.name: getattr(settings, f.name) for f in fields(settings)}

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def problem(self, name: str, message: str) -> None:
        self._problems.append(Problem(self.key(name), message))

    def has(self, name: str) -> bool:
        return name in self._data

    def default(self, name: str) -> Any:
        return self._defaults.get(name)  # None: the key has no default (it is required)

    def take(self, name: str, default: Any = None) -> Any:
        return self._data.pop(name, default)

    def string(self, name: str, *, required: bool = False) -> Any:
        value = self.take(name)
        if value is None:
            if required:
                self.problem(name, "is required (a string)")
            return self.default(name)
        if not isinstance(value, str) or not value:
            self.problem(name, f"expected a non-empty string, got {value!r}")
            return self.default(name)
        return value

    def boolean(self, name: str) -> bool:
        default: bool = self.default(name)
        value = self.take(name, default)
        if not isinstance(value, bool):
            self.problem(name, f"expected true or false, got {value!r}")
            return default
        return value

    def number(self, name: str, *, minimum: float, integer: bool = False) -> Any:
        default = self.default(name)
        value = self.take(name, default)
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            self.problem(name, f"expected {kind}, got {value!r}")
            return default
        if value < minimum:
            self.problem(name, f"expected {kind} >= {minimum}, got {value!r}")
            return default
        return value

    def choice(self, name: str, choices: Sequence[str]) -> Any:
        default = self.default(name)
        value = self.take(name, default)
        if value not in choices:
            self.problem(name, f"expected one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def table(self, name: str, settings: Any = None) -> _Table:
        value = self.take(name, {})
        if not isinstance(value, dict):
            self.problem(name, f"expected a table, got {value!r}")
            value = {}
        return _Table(value, f"{self.key(name)}.", self._problems, settings)

    def finish(self, expected: Sequence[str] = ()) -> None:
        hint = f" (expected one of {', '.join(expected)})" if expected else ""
        for name in sorted(self._data):
            self.problem(name, f"unknown key{hint}")


def _string_map(table: _Table, name: str, *, required: bool) -> dict[str, str]:
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
        table = _Table(entry, f"{where}.", problems, ModelDecl)
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


def _limits_table(table: _Table) -> dict[str, float]:
    """The [check] keys given in table, each checked; the keys not given are left out."""
    given: dict[str, float] = {}
    for name, (minimum, integer) in _CHECK_BOUNDS.items():
        if table.has(name):
            given[name] = table.number(name, minimum=minimum, integer=integer)
    table.finish()
    return given


def _model_limits(table: _Table, origin: str) -> dict[str, float] | None:
    if not table.has("limits"):
        return None
    if origin != "config":
        # An upload must not grant itself more memory or time than the host's owner allows.
        table.take("limits")
        table.problem("limits", "only the config file may set a model's limits")
        return None
    return _limits_table(table.table("limits", CheckLimits))


def _path(table: _Table, name: str, base: Path) -> Path:
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
    top = _Table(data, "", problems, Config)
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

    check = limits_over(CheckLimits(), _limits_table(top.table("check", CheckLimits)))

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


def _serving(table: _Table) -> ServingSettings:
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


def _smoke(table: _Table) -> SmokeSettings:
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
