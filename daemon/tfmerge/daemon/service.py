"""The daemon: watch, settle, build in a worker, publish, and tell systemd. No TensorFlow here.

One thread does all the work. The watchdog observer thread only appends changes to a deque
and writes a byte to a wake-up pipe; signal handlers only set flags (Python writes the wake-up
byte for them through ``signal.set_wakeup_fd``). The loop sleeps in ``select`` until the next
debounce deadline or watchdog ping, so an idle daemon uses no CPU.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import tenacity

from tfmerge import exitcodes, logs, specs
from tfmerge.config import Config, ConfigError
from tfmerge.config import load as load_config
from tfmerge.daemon import isolate, pipeline
from tfmerge.daemon.debounce import Change, Debouncer, Flush, StatKey
from tfmerge.daemon.metrics import Metrics
from tfmerge.daemon.notify import Notifier
from tfmerge.daemon.watch import FolderWatcher
from tfmerge.daemon.worker import BuildAborted, Worker, WorkerError, drain
from tfmerge.folders import publish
from tfmerge.folders.errors import config_folders, folder_failure
from tfmerge.folders.fs import AlreadyRunning, InstanceLock
from tfmerge.folders.state import Store
from tfmerge.logs import get_logger

_RETRY_WAIT_MAX_SECONDS = 60.0


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier
        self.clock = clock
        self.log = get_logger()
        self._changes: collections.deque[Change] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_requests = 0
        self._reload_requested = False
        self._reload_due: float | None = None
        self._loaded_config_key = self._config_key()
        self._debouncer = Debouncer(config.watch.quiet_seconds, config.watch.max_wait_seconds)
        self._watcher: FolderWatcher | None = None
        self._warm: Worker | None = None
        self._last_ping = 0.0
        self._retry_sleep = sleep if sleep is not None else self._interruptible_sleep
        self.serving_version: int | None = None
        self._warned_no_default = False
        self.metrics = Metrics() if config.metrics.listen else None

    # --- signals and wake-ups -------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_requests += 1

    def _on_reload_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True

    def request_stop(self) -> None:
        self._stop_requests += 1
        self._wake()

    def _wake(self) -> None:
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"w")

    def _on_change(self, change: Change) -> None:
        """Called from the observer thread: hand over and wake the loop, nothing else."""
        self._changes.append(change)
        self._wake()

    @property
    def stopping(self) -> bool:
        return self._stop_requests > 0

    # --- the loop ------------------------------------------------------------------------

    def serve(self) -> int:
        self.log.info(
            "daemon_started",
            pid=os.getpid(),
            config=str(self.config.path),
            frozen_dir=str(self.config.frozen_dir),
            serving_dir=str(self.config.serving_dir),
            state_dir=str(self.config.state_dir),
        )
        if self.notifier.unusable_reason:
            self.log.warning("notify_unusable", reason=self.notifier.unusable_reason)
        self.config.frozen_dir.mkdir(parents=True, exist_ok=True)
        self.config.serving_dir.mkdir(parents=True, exist_ok=True)
        # A serving_dir the daemon cannot write ends it here, with the folder's event and an
        # exit status systemd does not restart on, rather than failing every build.
        publish.check_writable(self.config.serving_dir)
        for name in publish.remove_stale_staging(self.config.serving_dir, self.config.state_dir):
            self.log.info("staging_removed", path=str(self.config.serving_dir / name))
        self._start_watcher()
        if self.metrics is not None and self.config.metrics.listen:
            self.metrics.serve(self.config.metrics.listen)
            newest = publish.newest(self.config.serving_dir)
            if newest is not None:
                signatures = publish.read_manifest(newest[1]).get("signatures", {})
                self.metrics.serving(newest[0], len(signatures))
            self.log.info("metrics_listening", listen=self.config.metrics.listen)
        try:
            if not self.stopping:
                self._build(trigger="startup", skip_unchanged_files=True)
            if not self.stopping:
                self.notifier.ready(self._status_text())
                self.log.info("daemon_ready", version=self.serving_version)
            while not self.stopping:
                self._step()
        finally:
            self.notifier.stopping("stopping")
            self.log.info("daemon_stopping")
            self._shutdown()
        self.log.info("daemon_stopped")
        return exitcodes.OK

    def _step(self) -> None:
        self._ping_watchdog()
        if self._reload_requested:
            self._reload()
        now = self.clock()
        while self._changes:
            change = self._changes.popleft()
            if Path(change.path) == self.config.path:
                if self._config_key() == self._loaded_config_key:
                    continue  # an event about the file as last loaded (say, after a SIGHUP)
                # Editors and scp write in several steps: reload once the file is quiet.
                if self._reload_due is None:
                    self.log.info("config_changed", path=change.path, kind=change.kind)
                self._reload_due = now + self.config.watch.quiet_seconds
                continue
            self._debouncer.add(change, now)
        if self._reload_due is not None and now >= self._reload_due:
            self._reload_due = None
            self._reload_requested = True
        if self._reload_requested:
            return
        flush = self._debouncer.poll(now, self._stat)
        if flush is not None:
            self._settled(flush, now)
            return
        deadlines = [
            d for d in (self._debouncer.next_deadline(), self._reload_due) if d is not None
        ]
        self._sleep_until(min(deadlines) if deadlines else None)

    def _sleep_until(self, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        interval = self.notifier.watchdog_interval
        if interval is not None:
            timeout = interval if timeout is None else min(timeout, interval)
        readable, _, _ = select.select([self._wake_r], [], [], timeout)
        if readable:
            drain(self._wake_r)

    def _wait(self, seconds: float) -> bool:
        """Sleep, cut short by a stop request; False when the daemon is stopping."""
        self._interruptible_sleep(seconds)
        return not self.stopping

    def _interruptible_sleep(self, seconds: float) -> None:
        """Sleep between retries; a stop request cuts it short."""
        deadline = self.clock() + seconds
        while not self.stopping and self.clock() < deadline:
            self._ping_watchdog()
            limit = deadline - self.clock()
            interval = self.notifier.watchdog_interval
            readable, _, _ = select.select(
                [self._wake_r], [], [], max(0.0, min(limit, interval or limit))
            )
            if readable:
                drain(self._wake_r)

    def _ping_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= interval * 0.9:
            self.notifier.watchdog()
            self._last_ping = now

    def _stat(self, relpath: str) -> StatKey | None:
        try:
            st = os.stat(self.config.frozen_dir / relpath)
        except OSError:
            return None
        return StatKey(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino)

    def _settled(self, flush: Flush, now: float) -> None:
        settle = now - flush.first_change
        self.log.info(
            "batch_settled",
            paths=sorted(flush.paths),
            reason=flush.reason,
            still_writing=sorted(flush.still_writing),
            settle_seconds=round(settle, 3),
        )
        self._build(trigger=flush.reason, settle_seconds=settle, last_change=flush.last_change)

    # --- builds --------------------------------------------------------------------------

    def _build(
        self,
        *,
        trigger: str,
        settle_seconds: float | None = None,
        skip_unchanged_files: bool = False,
        last_change: float | None = None,
    ) -> None:
        if skip_unchanged_files:
            held = self._held()
            if held:
                return
        self.notifier.status(f"building ({trigger})")
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.worker.retries + 1)
            | _StopWhen(lambda: self.stopping),
            wait=tenacity.wait_exponential(multiplier=1, min=1, max=_RETRY_WAIT_MAX_SECONDS),
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, WorkerError) and e.transient),
            sleep=self._retry_sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            outcome = retrying(
                pipeline.run_once,
                self.config,
                self._run_in_worker,
                trigger=trigger,
                settle_seconds=settle_seconds,
                skip_unchanged_files=skip_unchanged_files,
                warn_no_default=not self._warned_no_default,
                wait=self._wait,
            )
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one build
            self._build_failed(exc)
            self._prepare_warm_worker()
            return
        if self.metrics is not None:
            # Before the next worker starts, which takes a while: scrapes see the build now.
            published_at = outcome.fields.get("published_at")
            ttl = None
            if published_at is not None and last_change is not None:
                ttl = published_at - last_change
            self.metrics.build_finished(
                outcome.outcome, outcome.fields, outcome.version, time_to_live=ttl
            )
        self._prepare_warm_worker()
        if outcome.fields.get("no_default_signature"):
            self._warned_no_default = True
        if outcome.version is not None:
            self.serving_version = outcome.version
        self.notifier.status(self._status_text())

    def _build_failed(self, exc: Exception) -> None:
        """Say how a build ended without a result; the daemon carries on."""
        if isinstance(exc, BuildAborted):
            self.log.warning("build_aborted", reason="the daemon is stopping")
            return
        cause = exc.error if isinstance(exc, WorkerError) and exc.error is not None else exc
        failed = folder_failure(cause, config_folders(self.config))
        if failed is not None:
            self.log.error(failed.event, **failed.fields())
        elif isinstance(exc, publish.ForeignVersion):
            self.log.error(exc.event, reason=str(exc), **exc.fields())
        elif isinstance(exc, WorkerError):
            events = {"timeout": "worker_timeout", "crashed": "worker_crashed"}
            self.log.error(
                events.get(exc.kind, "build_error"), reason=str(exc), transient=exc.transient
            )
        elif isinstance(exc, OSError | publish.PublishError):
            self.log.error("publish_failed", reason=str(exc), errno=getattr(exc, "errno", None))
        else:
            self.log.error("build_crashed", reason=f"{type(exc).__name__}: {exc}", exc_info=exc)
        self.notifier.status(f"last build failed: {exc}")
        if self.metrics is not None:
            self.metrics.build_finished("error", {}, None)

    def _held(self) -> bool:
        """After a rollback, the inputs on disk are not rebuilt until they change."""
        hold = Store(self.config.state_dir).hold()
        if hold is None:
            return False
        raw = specs.raw_fingerprint(self.config, specs.resolve(self.config))
        if raw == hold:
            self.log.info("build_held", reason="a rollback holds these inputs until they change")
            return True
        return False

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        self.log.warning(
            "build_retry", attempt=state.attempt_number, wait_seconds=wait, reason=str(exc)
        )

    def _run_in_worker(
        self,
        config: Config,
        resolution: specs.Resolution,
        staging: Path,
        build_id: str,
        *,
        newest_fingerprint: str | None,
        raw_fingerprint: str | None,
    ) -> Any:
        first, self._warm = self._warm, None
        try:
            return isolate.run_build(
                config,
                resolution,
                staging,
                build_id,
                newest_fingerprint=newest_fingerprint,
                raw_fingerprint=raw_fingerprint,
                first=first,
                wake_fd=self._wake_r,
                should_abort=lambda: self.stopping,
                on_wait=self._on_build_wait,
            )
        finally:
            # A retry after a crash, like the next build, starts on a worker already warm.
            self._prepare_warm_worker()

    def _on_build_wait(self) -> float | None:
        self._ping_watchdog()
        return self.notifier.watchdog_interval

    def _prepare_warm_worker(self) -> None:
        if self.config.worker.warm and not self.stopping and self._warm is None:
            self._warm = Worker(self.config)

    # --- reload and shutdown --------------------------------------------------------------

    def _config_key(self) -> tuple[int, int, int] | None:
        """The config file's identity and content stamp, to skip events about what is loaded."""
        try:
            st = self.config.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _reload(self) -> None:
        self._reload_requested = False
        self._reload_due = None  # this reload reads the file as it is now
        self._loaded_config_key = self._config_key()
        self.notifier.reloading("reloading configuration")
        try:
            config = load_config(self.config.path)
        except ConfigError as exc:
            self.log.error(
                "config_reload_failed",
                path=str(exc.path),
                problems=[str(p) for p in exc.problems],
                reason="the previous configuration stays in force",
            )
            self.notifier.ready(self._status_text())
            return
        old = self.config
        if config.state_dir != old.state_dir:
            self.log.error(
                "config_reload_failed",
                path=str(config.path),
                problems=["state_dir: cannot change while the daemon runs (it holds the lock)"],
                reason="the previous configuration stays in force; restart to move state_dir",
            )
            self.notifier.ready(self._status_text())
            return
        self.config = config
        logs.configure(fmt=config.log.format, level=config.log.level)
        self.log = get_logger()
        self.log.info("config_reloaded", path=str(config.path))
        if config.metrics != old.metrics:
            self.log.warning(
                "config_restart_needed",
                keys=["metrics.listen"],
                reason="the metrics endpoint is started, moved or stopped only by a restart",
            )
        if (config.watch,) != (old.watch,):
            self._debouncer = Debouncer(config.watch.quiet_seconds, config.watch.max_wait_seconds)
        if config.frozen_dir != old.frozen_dir:
            self._stop_watcher()
            self._start_watcher()
        self.notifier.ready(self._status_text())
        self._build(trigger="reload", skip_unchanged_files=True)

    def _start_watcher(self) -> None:
        self._watcher = FolderWatcher(
            self.config.frozen_dir, self._on_change, also_watch=[self.config.path]
        )
        self._watcher.start()

    def _stop_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _shutdown(self) -> None:
        self._stop_watcher()
        if self.metrics is not None:
            self.metrics.close()
        if self._warm is not None:
            self._warm.stop()
            self._warm = None
        try:
            for name in publish.remove_stale_staging(
                self.config.serving_dir, self.config.state_dir
            ):
                self.log.info("staging_removed", path=str(self.config.serving_dir / name))
        except OSError as exc:
            # Stopping goes on; the next start or build sweeps again.
            failed = folder_failure(exc, config_folders(self.config))
            self.log.warning(
                failed.event if failed else "publish_failed",
                **(failed.fields() if failed else {"reason": str(exc), "errno": exc.errno}),
            )
        self.notifier.close()

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _status_text(self) -> str:
        if self.serving_version is None:
            found = publish.newest(self.config.serving_dir)
            self.serving_version = found[0] if found else None
        version = (
            "nothing published yet"
            if self.serving_version is None
            else f"serving version {self.serving_version}"
        )
        return f"idle: {version}; watching {self.config.frozen_dir}"


class _StopWhen(tenacity.stop.stop_base):
    """Stop retrying as soon as the daemon is asked to stop."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._predicate()


def run_daemon(config: Config) -> int:
    log = get_logger()
    lock = InstanceLock(config.state_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        log.error(
            "another_instance", lock=str(exc.lock_path), holder_pid=exc.holder_pid, reason=str(exc)
        )
        return exitcodes.LOCKED
    notifier = Notifier.from_environ()
    daemon = Daemon(config, notifier=notifier)
    try:
        daemon.install_signal_handlers()
        return daemon.serve()
    finally:
        signal.set_wakeup_fd(-1)
        daemon.close()
        lock.release()
