"""One TOML table read key by key: every problem recorded, none raised. No TensorFlow here.

The config file and the sidecar files are read with it, so a file with several mistakes is
reported with all of them at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file: where, and what was expected."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class Table:
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

    def table(self, name: str, settings: Any = None) -> Table:
        value = self.take(name, {})
        if not isinstance(value, dict):
            self.problem(name, f"expected a table, got {value!r}")
            value = {}
        return Table(value, f"{self.key(name)}.", self._problems, settings)

    def finish(self, expected: Sequence[str] = ()) -> None:
        hint = f" (expected one of {', '.join(expected)})" if expected else ""
        for name in sorted(self._data):
            self.problem(name, f"unknown key{hint}")
