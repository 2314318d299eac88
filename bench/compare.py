"""One set, three ways, in one process tree: the copy floor, the naive merge, ``tfmerge build``.

Each run starts every tool as a child process of this one (reaped with wait4, see
bench.launch), in an order that rotates from run to run so that no tool always comes first
after another's page-cache or allocator traffic. TensorFlow's own baseline (a process that
only imports it) is measured in every run as well.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.launch import Measured, measure
from bench.sets import ROOT, ModelSet

TOOLS = ("copy", "naive", "tfmerge")
#: The copy floor: the same bytes copied with cp and made durable with one fsync per file.
_COPY_SCRIPT = 'cp -r "$1" "$2" && sync "$2"/*'
_TIMEOUT_SECONDS = 3600.0


@dataclass
class ToolRun:
    tool: str
    command_seconds: float
    peak_rss: int
    ok: bool
    #: The build step alone: from after ``import tensorflow`` to the end of the work.
    build_seconds: float | None = None
    error: str | None = None
    durations: dict[str, float] = field(default_factory=dict)
    checked: dict[str, Any] | None = None
    #: CPU seconds of the whole command (bench.launch.Measured.cpu_seconds).
    cpu_seconds: float | None = None


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                value: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            return value
    return {}


def _events(text: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
    return found


def write_tfmerge_config(set_dir: Path, project: Path) -> Path:
    """A config that declares every model of the set, as the naive script is given them."""
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    models = json.loads((set_dir / "models.json").read_text())["models"]
    lines = [
        f"frozen_dir = {json.dumps(str(set_dir.resolve() / 'frozen'))}",
        'serving_dir = "serving"',
        'state_dir = "state"',
        "discover = false",
        "[log]",
        'format = "json"',
        'level = "info"',
    ]
    for model in models:
        lines += [
            "[[models]]",
            f"signature = {json.dumps(model['signature'])}",
            f"frozen = {json.dumps(model['frozen'])}",
            "inputs = { "
            + ", ".join(f"{k} = {json.dumps(v)}" for k, v in model["inputs"].items())
            + " }",
            "outputs = { "
            + ", ".join(f"{k} = {json.dumps(v)}" for k, v in model["outputs"].items())
            + " }",
        ]
    config = project / "tfmerge.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def tf_baseline() -> Measured:
    return measure([sys.executable, "-c", "import tensorflow"])


def core_baseline() -> Measured:
    """The part of TensorFlow a tfmerge build imports (tfmerge/build/tfcore.py)."""
    return measure([sys.executable, "-c", "import tfmerge.build.tfcore"])


def copy_floor(model_set: ModelSet, work: Path) -> ToolRun:
    target = work / "copy"
    shutil.rmtree(target, ignore_errors=True)
    run = measure(["sh", "-c", _COPY_SCRIPT, "sh", str(model_set.frozen_dir), str(target)])
    shutil.rmtree(target, ignore_errors=True)
    return ToolRun("copy", run.wall_seconds, run.peak_rss_bytes, True, run.wall_seconds)


def naive(model_set: ModelSet, work: Path) -> tuple[ToolRun, Path]:
    export = work / "naive"
    shutil.rmtree(export, ignore_errors=True)
    command = [sys.executable, "-m", "bench.naive_merge"]
    command += [str(model_set.root / "models.json"), str(model_set.frozen_dir), str(export)]
    run = measure(command, cwd=ROOT, check=False, timeout=_TIMEOUT_SECONDS)
    report = _last_json(run.stdout)
    ok = run.returncode == 0 and "build_seconds" in report
    error = report.get("error") or (None if ok else _tail(run))
    return (
        ToolRun(
            "naive",
            run.wall_seconds,
            run.peak_rss_bytes,
            ok,
            report.get("build_seconds"),
            error,
            {k: v for k, v in report.items() if k.endswith("_seconds")},
            cpu_seconds=run.cpu_seconds,
        ),
        export,
    )


def tfmerge_build(model_set: ModelSet, work: Path) -> tuple[ToolRun, Path | None]:
    project = work / "tfmerge"
    config = write_tfmerge_config(model_set.root, project)
    tfmerge = Path(sys.executable).parent / "tfmerge"
    run = measure(
        [str(tfmerge), "build", "-c", str(config)],
        cwd=project,
        check=False,
        timeout=_TIMEOUT_SECONDS,
    )
    finished = _events(run.stdout, "build_finished")
    event = finished[-1] if finished else {}
    durations = dict(event.get("durations", {}))
    ok = run.returncode == 0 and event.get("outcome") == "published"
    error = None
    if not ok:
        problems = _events(run.stdout, "verify_failed") + _events(run.stdout, "model_rejected")
        error = json.dumps(problems[:3]) if problems else _tail(run)
    published = project / "serving" / str(event["version"]) if ok else None
    return (
        ToolRun(
            "tfmerge",
            run.wall_seconds,
            run.peak_rss_bytes,
            ok,
            durations.get("total"),
            error,
            durations,
        ),
        published,
    )


def _tail(run: Measured) -> str:
    text = (run.stderr.strip() or run.stdout.strip()).splitlines()
    return f"exit {run.returncode}: " + " | ".join(text[-3:])[-600:]


def check_published(
    model_set: ModelSet, export: Path, *, discovered: bool = False
) -> dict[str, Any]:
    """Load export with the SavedModel loader and compare every signature with its source."""
    command = [sys.executable, "-m", "bench.check_published", str(model_set.root), str(export)]
    if discovered:
        command.append("--discovered")
    run = measure(command, cwd=ROOT, check=False, timeout=_TIMEOUT_SECONDS)
    report = _last_json(run.stdout)
    if run.returncode != 0 or not report:
        return {"signatures": 0, "equal": 0, "mismatches": [_tail(run)]}
    return report


@dataclass
class SetRuns:
    name: str
    input_bytes: int
    files: int
    baseline: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


def run_set(model_set: ModelSet, runs: int, work: Path, log: Any = print) -> SetRuns:
    result = SetRuns(model_set.spec.name, model_set.input_bytes(), model_set.spec.count)
    work.mkdir(parents=True, exist_ok=True)
    for index in range(runs):
        # Other work on the host shows here: the 1-minute load average as the run starts.
        load = os.getloadavg()[0]
        base, core = tf_baseline(), core_baseline()
        result.baseline.append(
            {
                "seconds": base.wall_seconds,
                "peak_rss": base.peak_rss_bytes,
                "core_seconds": core.wall_seconds,
                "core_peak_rss": core.peak_rss_bytes,
            }
        )
        order = TOOLS[index % 3 :] + TOOLS[: index % 3]
        tools: dict[str, ToolRun] = {}
        for tool in order:
            if tool == "copy":
                tools[tool] = copy_floor(model_set, work)
            elif tool == "naive":
                tools[tool], export = naive(model_set, work)
                # The naive merge's output is checked once, to show it is a fair opponent.
                if index == 0 and tools[tool].ok:
                    tools[tool].checked = check_published(model_set, export)
                shutil.rmtree(export, ignore_errors=True)
            else:
                tools[tool], published = tfmerge_build(model_set, work)
                if published is not None:
                    tools[tool].checked = check_published(model_set, published)
                shutil.rmtree(work / "tfmerge", ignore_errors=True)
        result.runs.append({name: asdict(run) for name, run in tools.items()})
        result.load.append(load)
        log(f"  {model_set.spec.name} run {index + 1}/{runs}: " + _summary(tools))
    return result


def _summary(tools: dict[str, ToolRun]) -> str:
    parts = []
    for name in TOOLS:
        run = tools[name]
        state = "" if run.ok else " FAILED"
        build = f"{run.build_seconds:.2f}" if run.build_seconds is not None else "-"
        parts.append(
            f"{name} {run.command_seconds:.2f} s (step {build} s, {run.peak_rss / 2**20:.0f} MiB)"
            f"{state}"
        )
    return "; ".join(parts)
