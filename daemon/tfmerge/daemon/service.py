"""The daemon: watch, settle, build in a worker, publish, and tell systemd. No TensorFlow here.

One thread does all the work. The watcher only hands changes over (a deque and a wake-up);
signal handlers only set flags. The loop sleeps until the next debounce deadline, watchdog
ping or wake-up (:mod:`tfmerge.daemon.wakeup`), so an idle daemon uses no CPU.

What touches the operating system is passed in: the watcher (:data:`WatcherFactory`), the
build runner (:data:`~tfmerge.daemon.runner.RunnerFactory`), the probe that asks the kernel
whether a file is open for writing (:mod:`tfmerge.daemon.writers`), the clock and the wait for
a wake-up. :func:`run_daemon` passes the real ones; tests pass a scripted watcher, scripted
workers and a fake clock, and step the loop without real time.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tfmerge import exitcodes, logs, snapshot, specs
from tfmerge.config import Config
from tfmerge.daemon import network, pipeline, reload, retry
from tfmerge.daemon.debounce import Change, Debouncer, Flush, StatKey
from tfmerge.daemon.health import WatchKeeper
from tfmerge.daemon.metrics import Metrics
from tfmerge.daemon.notify import Notifier
from tfmerge.daemon.runner import RunnerFactory, Supervision, WorkerRunner
from tfmerge.daemon.wakeup import Pacer, Restore, WaitForWakeup, WakeupPipe
from tfmerge.daemon.watch import FolderWatcher, WatcherFactory
from tfmerge.daemon.worker import BuildAborted, WorkerError
from tfmerge.daemon.writers import LeaseProbe
from tfmerge.folders import publish
from tfmerge.folders.errors import config_folders, folder_failure
from tfmerge.folders.fs import AlreadyRunning, InstanceLock
from tfmerge.folders.state import Store
from tfmerge.logs import get_logger

#: Is frozen_dir/relpath open for writing? None: the kernel cannot tell.
WritingProbe = Callable[[Path, str], bool | None]


class Daemon:
    """The loop, and what it keeps between builds.

    ``runner`` makes the build runner, given what a running build needs from the loop;
    ``watcher`` makes the watcher of ``frozen_dir`` and of the config file (again when a
    reload moves ``frozen_dir``, or when one went deaf); ``writers`` makes the probe of files
    open for writing (returning None: the events alone tell); ``clock`` gives monotonic
    seconds; ``wait`` returns at the next wake-up or after the seconds given (by default,
    ``select`` on the wake-up pipe).
    """

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier,
        runner: RunnerFactory,
        watcher: WatcherFactory,
        writers: Callable[[], WritingProbe | None] = LeaseProbe,
        clock: Callable[[], float] = time.monotonic,
        wait: WaitForWakeup | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier
        self.clock = clock
        self.log = get_logger()
        self._changes: collections.deque[Change] = collections.deque()
        self._wakeup = WakeupPipe()
        self._pacer = Pacer(
            notifier,
            clock,
            wait if wait is not None else self._wakeup.wait,
            stopping=lambda: self.stopping,
        )
        self._stop_requests = 0
        self._reloads = reload.ReloadRequests(config.path)
        self._writing = writers()
        self._debouncer = self._new_debouncer()
        self._keeper = WatchKeeper(watcher, self._on_change)
        self._runner = runner(
            Supervision(
                should_abort=lambda: self.stopping,
                wake_fd=self._wakeup.fd,
                on_wait=self._on_build_wait,
            )
        )
        self.serving_version: int | None = None
        self._warned_no_default = False
        self.metrics = Metrics() if config.metrics.listen else None

    # --- requests from signals and other threads -------------------------------------------

    def install_signal_handlers(self) -> Restore:
        return self._wakeup.install_signal_handlers(
            stop=self.request_stop, reload=self.request_reload
        )

    def request_stop(self) -> None:
        """SIGTERM, SIGINT: end the running build and stop. Safe from any thread."""
        self._stop_requests += 1
        self._wakeup.wake()

    def request_reload(self) -> None:
        """SIGHUP: reload the configuration file now."""
        self._reloads.request()
        self._wakeup.wake()

    def _on_change(self, change: Change) -> None:
        """Called from the watcher's thread: hand over and wake the loop, nothing else."""
        self._changes.append(change)
        self._wakeup.wake()

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
        # A lease the writing probe takes is broken with SIGIO, whose default ends the process.
        snapshot.ignore_lease_breaks()
        self.config = network.usable(self.config)
        self.config.frozen_dir.mkdir(parents=True, exist_ok=True)
        self.config.serving_dir.mkdir(parents=True, exist_ok=True)
        # A serving_dir the daemon cannot write ends it here, with the folder's event and an
        # exit status systemd does not restart on, rather than failing every build.
        publish.check_writable(self.config.serving_dir)
        for name in publish.remove_stale_staging(self.config.serving_dir, self.config.state_dir):
            self.log.info("staging_removed", path=str(self.config.serving_dir / name))
        self._start_watcher()
        if self.metrics is not None and self.config.metrics.listen:
            self.metrics.start(self.config.metrics.listen, self.config.serving_dir)
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
        """One turn of the loop: take the changes in, then build, reload or sleep."""
        self._pacer.ping()
        if self._reloads.requested:
            self._reload()
        now = self.clock()
        for change in self._keeper.check(now):
            self._debouncer.add(change, now)
        while self._changes:
            change = self._changes.popleft()
            if not self._reloads.file_changed(change, now, self.config.watch.quiet_seconds):
                self._debouncer.add(change, now)
        if self._reloads.poll(now):
            return
        flush = self._debouncer.poll(now, self._stat)
        for held in self._debouncer.take_held():
            self.log.info("batch_held", **held.fields(now))
        if flush is not None:
            self._settled(flush, now)
            return
        deadlines = [self._debouncer.next_deadline(), self._reloads.due, self._keeper.next_check]
        self._pacer.sleep_until(min(d for d in deadlines if d is not None))

    def _wait(self, seconds: float) -> bool:
        """Sleep, cut short by a stop request; False when the daemon is stopping."""
        self._pacer.sleep(seconds)
        return not self.stopping

    def _backoff(self, seconds: float) -> None:
        """The sleep between two tries of a build; a stop request ends it and the retries."""
        self._pacer.sleep(seconds)
        if self.stopping:
            raise BuildAborted("the daemon is stopping")

    def _new_debouncer(self) -> Debouncer:
        watch, probe = self.config.watch, self._writing
        return Debouncer(
            watch.quiet_seconds,
            watch.max_wait_seconds,
            writing=None if probe is None else lambda path: probe(self.config.frozen_dir, path),
        )

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
        self._keeper.remember()
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
        if skip_unchanged_files and self._held():
            return
        self.notifier.status(f"building ({trigger})")
        retrying = retry.retrying(
            self.config.worker.retries, stopping=lambda: self.stopping, sleep=self._backoff
        )
        try:
            outcome = retrying(
                pipeline.run_once,
                self.config,
                self._runner,
                trigger=trigger,
                settle_seconds=settle_seconds,
                skip_unchanged_files=skip_unchanged_files,
                warn_no_default=not self._warned_no_default,
                wait=self._wait,
            )
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one build
            self._build_failed(exc)
            self._runner.prepare(self.config)
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
        self._runner.prepare(self.config)
        # Files not at rest when the worker read them are built once they are.
        self._debouncer.requeue(outcome.fields.get("unsettled", ()), self.clock())
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

    def _on_build_wait(self) -> float | None:
        self._pacer.ping()
        return self.notifier.watchdog_interval

    # --- reload and shutdown --------------------------------------------------------------

    def _reload(self) -> None:
        self._reloads.begin()
        self.notifier.reloading("reloading configuration")
        config = reload.load_new(self.config)
        if config is None:
            self.notifier.ready(self._status_text())
            return
        old, self.config = self.config, network.usable(config)
        config = self.config
        if config.log != old.log:
            logs.configure(fmt=config.log.format, level=config.log.level)
            self.log = get_logger()
        self.log.info("config_reloaded", path=str(config.path))
        if config.metrics != old.metrics:
            self.log.warning(
                "config_restart_needed",
                keys=["metrics.listen"],
                reason="the metrics endpoint is started, moved or stopped only by a restart",
            )
        if config.watch != old.watch:
            self._debouncer = self._new_debouncer()
        if config.frozen_dir != old.frozen_dir:
            self._start_watcher()
        self.notifier.ready(self._status_text())
        self._build(trigger="reload", skip_unchanged_files=True)

    def _start_watcher(self) -> None:
        self._keeper.start(self.config.frozen_dir, [self.config.path], self.clock())

    def _shutdown(self) -> None:
        self._keeper.stop()
        if self.metrics is not None:
            self.metrics.close()
        self._runner.close()
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
        self._wakeup.close()

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
    daemon = Daemon(config, notifier=notifier, runner=WorkerRunner, watcher=FolderWatcher)
    try:
        daemon.install_signal_handlers()
        return daemon.serve()
    finally:
        signal.set_wakeup_fd(-1)
        daemon.close()
        lock.release()
