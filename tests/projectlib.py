"""A throwaway tfmerge installation on tmp paths: config, frozen/, serving/, state/."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tfmerge import cli

from graphgen import FrozenModel


def toml_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def model_entry(signature: str, frozen: str, model: FrozenModel, **extra: Any) -> dict[str, Any]:
    return {
        "signature": signature,
        "frozen": frozen,
        "inputs": dict(model.inputs),
        "outputs": dict(model.outputs),
        **extra,
    }


def models_toml(models: Sequence[Mapping[str, Any]]) -> str:
    text = ""
    for entry in models:
        text += "\n[[models]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in entry.items())
    return text


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.frozen = root / "frozen"
        self.serving = root / "serving"
        self.state = root / "state"
        self.config = root / "tfmerge.toml"
        self.frozen.mkdir(parents=True, exist_ok=True)

    def configure(
        self,
        models: Sequence[Mapping[str, Any]] = (),
        *,
        discover: bool = False,
        quiet_seconds: float = 0.3,
        worker: Mapping[str, Any] | None = None,
        **top: Any,
    ) -> Path:
        """Write the config. No warm worker unless ``worker`` asks for one: a warm worker
        imports TensorFlow after every build, and a test stops the daemon right after its
        last build, so that import is two seconds of CPU spent for nothing."""
        settings = {"discover": discover, "keep_versions": 5, **top}
        worker_settings = {"warm": False, **(worker or {})}
        # Relative to the config where it can be; a test may put the state folder elsewhere.
        state = self.state.relative_to(self.root) if self.state.is_relative_to(self.root) else None
        text = (
            'frozen_dir = "frozen"\nserving_dir = "serving"\n'
            f"state_dir = {toml_value(str(state or self.state))}\n"
            + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())
            + "[worker]\n"
            + "".join(f"{k} = {toml_value(v)}\n" for k, v in worker_settings.items())
            + f"[watch]\nquiet_seconds = {quiet_seconds}\nmax_wait_seconds = 10.0\n"
            + '[log]\nformat = "json"\nlevel = "debug"\n'
            + models_toml(models)
        )
        self.config.write_text(text)
        return self.config

    def add(self, model: FrozenModel, name: str) -> Path:
        target = self.frozen / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.path, target)
        return target

    def cli(
        self, capsys: pytest.CaptureFixture[str], *args: str
    ) -> tuple[int, list[dict[str, Any]]]:
        """Run a tfmerge command in-process; returns its exit code and its log events."""
        capsys.readouterr()
        code = cli.main([*args, "-c", str(self.config)] if args[0] != "inspect" else list(args))
        return code, parse_events(capsys.readouterr().out)


def parse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def named(events: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in events if e.get("event") == name]


def one(events: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    found = named(events, name)
    assert len(found) == 1, (
        f"expected one {name!r} event, got {len(found)}: {[e.get('event') for e in events]}"
    )
    return found[0]
