"""What a build returns, as plain data that crosses the worker's process boundary.

Lives apart from ``tfmerge.build`` so that unpickling a result in the supervisor never
imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tfmerge.specs import Rejection
from tfmerge.store import AcceptedModel


@dataclass(frozen=True)
class BuildResult:
    """What a build did, in plain data: it crosses the worker's process boundary."""

    build_id: str
    #: "built": staging holds a verified version; "unchanged": equal to the newest version;
    #: "empty": no model was accepted; "failed": verification failed.
    outcome: str
    staging: str | None
    fingerprint: str | None
    models: tuple[AcceptedModel, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    mismatches: tuple[tuple[str, str], ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    #: Fingerprint of the files as read (specs.raw_fingerprint), for the next start-up check.
    raw_fingerprint: str | None = None
