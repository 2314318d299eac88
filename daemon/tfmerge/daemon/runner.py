"""How the daemon runs a build: in a worker process, the next one started while it is idle.

The daemon is given a runner factory (:data:`RunnerFactory`); :class:`WorkerRunner` is the
real one, and it is given in turn how to start a worker (:data:`StartWorker`), a
:class:`~tfmerge.daemon.worker.Worker` process in the running service. What happens to a
worker (which one builds, when the next one starts, when one is stopped) lives here; what
happens inside one (timeout, crash, abort) lives in :mod:`tfmerge.daemon.worker`.
No TensorFlow here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tfmerge.config import Config
from tfmerge.daemon import isolate
from tfmerge.daemon.pipeline import BuildRunner
from tfmerge.daemon.worker import BuildRequest, ModelFailed, Worker
from tfmerge.folders.publish import clear_staging
from tfmerge.specs import Resolution

if TYPE_CHECKING:
    from tfmerge.models import BuildResult


@dataclass(frozen=True)
class Supervision:
    """What a running build needs from the daemon that waits for it."""

    #: True once the daemon is asked to stop: the build is abandoned (BuildAborted).
    should_abort: Callable[[], bool]
    #: Readable when the daemon has news (a signal, a stop request): the wait looks again.
    wake_fd: int | None
    #: Runs at every wake-up of the wait (it pings the systemd watchdog) and returns how
    #: long the next wait may last at most.
    on_wait: Callable[[], float | None]


class WorkerHandle(Protocol):
    """One worker, used for exactly one build (what :class:`Worker` offers)."""

    def alive(self) -> bool: ...

    #: The ``model_rejected`` lines it logged: (file, signature, code).
    reported: set[tuple[Any, ...]]

    def run(
        self,
        request: BuildRequest,
        *,
        timeout: float,
        wake_fd: int | None,
        should_abort: Callable[[], bool],
        on_wait: Callable[[], float | None],
        started: float | None = None,
    ) -> BuildResult:
        """The result; raises ModelFailed (it died or overran on one model's check),
        WorkerError (crash, timeout, error) or BuildAborted. The timeout counts from
        ``started`` (time.monotonic()), by default now."""
        ...

    def stop(self) -> None: ...


StartWorker = Callable[[Config], WorkerHandle]


class DaemonRunner(BuildRunner, Protocol):
    """A build runner that may keep a worker ready between builds."""

    def prepare(self, config: Config) -> None:
        """Get ready for the next build (start a warm worker) while the daemon is idle."""
        ...

    def close(self) -> None:
        """Let go of whatever :meth:`prepare` holds."""
        ...


RunnerFactory = Callable[[Supervision], DaemonRunner]


class WorkerRunner:
    """Runs each build in a worker of its own; with ``[worker] warm``, one is started ahead."""

    def __init__(self, supervision: Supervision, *, start_worker: StartWorker = Worker) -> None:
        self._supervision = supervision
        self._start_worker = start_worker
        self._warm: WorkerHandle | None = None

    def __call__(
        self,
        config: Config,
        resolution: Resolution,
        staging: Path,
        build_id: str,
        *,
        newest_fingerprint: str | None,
        raw_fingerprint: str | None,
    ) -> BuildResult:
        started = time.monotonic()
        killed_once: set[str] = set()
        reported: set[tuple[Any, ...]] = set()
        worker = self._take_warm() or self._start_worker(config)
        try:
            while True:
                request = BuildRequest(
                    config,
                    resolution,
                    str(staging),
                    build_id,
                    newest_fingerprint,
                    raw_fingerprint,
                    frozenset(reported),
                )
                try:
                    return worker.run(
                        request,
                        timeout=config.worker.timeout_seconds,
                        started=started,
                        wake_fd=self._supervision.wake_fd,
                        should_abort=self._supervision.should_abort,
                        on_wait=self._supervision.on_wait,
                    )
                except ModelFailed as failure:
                    # The build goes on in a fresh worker, without the model that did it.
                    worker.stop()
                    reported |= worker.reported
                    resolution = isolate.leave_out(
                        config, resolution, failure, build_id, killed_once
                    )
                    clear_staging(staging)
                    worker = self._start_worker(config)
        finally:
            worker.stop()
            # A retry after a crash, like the next build, starts on a worker already warm.
            self.prepare(config)

    def _take_warm(self) -> WorkerHandle | None:
        worker, self._warm = self._warm, None
        if worker is not None and not worker.alive():
            worker.stop()  # died while idle: reap it, and build on a new one
            return None
        return worker

    def prepare(self, config: Config) -> None:
        if config.worker.warm and not self._supervision.should_abort() and self._warm is None:
            self._warm = self._start_worker(config)

    def close(self) -> None:
        if self._warm is not None:
            self._warm.stop()
            self._warm = None
