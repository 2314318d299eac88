"""One model's check as the rest of the system sees it: its steps, its remembered refusals.

Before each risky step the check says which model and step it is on (tfmerge.progress), so
that a crash or an overrun that ends the worker is pinned on that model. A refusal that cost
a run to find (tfmerge.limits.REMEMBERED_CODES) is remembered by the input's bytes and
declaration, and the same input is refused again without being run. Worker side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tfmerge import limits, progress
from tfmerge.build import reading
from tfmerge.config import Config
from tfmerge.folders.state import Store
from tfmerge.models import ModelRejected, ModelSpec, Rejection


@dataclass(frozen=True)
class Checking:
    """A model whose check is under way, with the limits it runs under."""

    spec: ModelSpec
    limits: limits.ModelLimits
    sha256: str | None
    kept: bool

    def step(self, name: str) -> None:
        progress.step(
            progress.Step(
                self.spec.signature,
                self.spec.relpath,
                name,
                self.limits.seconds,
                self.sha256,
                self.kept,
            )
        )


def reading_file(spec: ModelSpec, path: Path, config: Config, *, kept: bool) -> None:
    """Report the read of a model's file (its size sets the time allowed)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    Checking(spec, limits.for_model(config, spec.signature, size), None, kept).step("read")


@contextlib.contextmanager
def checking(
    spec: ModelSpec, config: Config, read: reading.GraphRead, *, kept: bool, remember: bool
) -> Iterator[Checking]:
    """Around a model's check once its file is read; with remember (a build, not a kept
    copy), a refusal remembered for these bytes is raised again at once, and a new one of
    the remembered kinds is recorded."""
    model = Checking(
        spec, limits.for_model(config, spec.signature, len(read.data)), read.sha256, kept
    )
    store = Store(config.state_dir) if remember and not kept else None
    key = limits.verdict_key(config, spec, read.sha256) if store is not None else None
    try:
        if store is not None and key is not None:
            _raise_remembered(store, key)
        yield model
    except ModelRejected as exc:
        new = not exc.details.get("remembered") and exc.code in limits.REMEMBERED_CODES
        if store is not None and key is not None and new:
            rejection = Rejection(exc.code, exc.reason, spec.relpath, spec.signature)
            store.record_verdict(key, limits.verdict_record(rejection, read.sha256, _build_id()))
        raise
    finally:
        progress.idle()


def _raise_remembered(store: Store, key: str) -> None:
    verdict = store.verdict(key)
    if verdict is None:
        return
    raise ModelRejected(
        str(verdict.get("code")),
        f"{verdict.get('reason')} (the same bytes were refused before, and are not run again "
        "until the file, its declaration or its limits change)",
        remembered=True,
    )


def _build_id() -> str | None:
    import structlog

    value = structlog.contextvars.get_contextvars().get("build_id")
    return value if isinstance(value, str) else None
