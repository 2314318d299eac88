"""Which model's check, and which step of it, a build is on: told before each risky step.

A check can end the worker process (a crash inside TensorFlow) or never return (a kernel
that runs for hours); nothing in the process can then say which input did it. So the build
reports each step before taking it, and the daemon's side of the worker pipe pins a crash or
an overrun on the model last reported. Both sides speak through this module, which imports
no TensorFlow; with no sink set (``tfmerge build``, ``tfmerge check``) reports go nowhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """A step of one model's check, as the daemon learns it."""

    signature: str
    file: str
    #: "read" (reading, hashing and parsing the file), "import" (static checks and the
    #: import into TensorFlow) or "probe" (making the probe input and running the graph).
    step: str
    #: How long the step may take before the daemon ends the worker.
    seconds: float
    sha256: str | None = None
    #: True while the last accepted copy of a refused input is checked again.
    kept: bool = False


def allowed(current: Step) -> float:
    """How long the daemon lets a step run before it ends the worker: the step's own time
    and half as much again, plus 2 s. A probe run's deadline inside the worker comes first
    and refuses the model cleanly; this is for a kernel that ignores that deadline."""
    return current.seconds * 1.5 + 2.0


Sink = Callable[[Step | None], None]
_sink: Sink | None = None


def report_to(sink: Sink | None) -> None:
    """Send every report to sink from now on (None: drop them)."""
    global _sink  # noqa: PLW0603 - one reporter per process, set once by the worker
    _sink = sink


def step(current: Step) -> None:
    if _sink is not None:
        _sink(current)


def idle() -> None:
    """No model's check is running: whatever comes next is the build's own."""
    if _sink is not None:
        _sink(None)
