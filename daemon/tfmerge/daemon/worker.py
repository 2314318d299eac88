"""The process boundary: every build runs in a child process that imports TensorFlow.

A crash, a leak, an out-of-memory kill or a hostile graph ends the child, never the
supervisor. The child is started with ``spawn`` (no inherited threads or locks) and talks to
the supervisor over one pipe: it reports ``ready`` once TensorFlow is imported, receives one
build request and answers with one result.

A warm worker is simply a child started before it is needed: it imports TensorFlow while the
daemon is idle, so the next build skips that cost (see docs/benchmarks.md for what it costs
in memory). This module does not import TensorFlow.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from tfmerge import logs, progress
from tfmerge.config import Config
from tfmerge.daemon.output import OutputRelay
from tfmerge.daemon.wakeup import drain
from tfmerge.specs import Resolution

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from tfmerge.models import BuildResult

#: errno values worth a retry: the file system is busy, full or failing, not the input bad.
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EIO, errno.EBUSY, errno.EAGAIN, errno.EDQUOT, errno.ENOMEM, errno.EINTR}
)
_TERMINATE_GRACE_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1


class WorkerError(Exception):
    """A build that ended without a result. ``transient`` ones are worth a retry."""

    outcome = "error"

    def __init__(
        self, kind: str, message: str, *, transient: bool, error: OSError | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.transient = transient
        #: The worker's OSError, rebuilt with its errno and path, when that is what ended it.
        self.error = error


class ModelFailed(Exception):
    """The worker died, or overran a step, while it checked one model (tfmerge.progress)."""

    def __init__(self, step: progress.Step, kind: str, message: str, *, signal: int | None):
        super().__init__(message)
        self.step = step
        #: "crashed" or "timeout".
        self.kind = kind
        #: The signal that ended the worker, if one did.
        self.signal = signal


class BuildAborted(Exception):
    """The supervisor was asked to stop while a build ran; the child was ended."""

    #: The build_finished outcome of a build that ended this way.
    outcome = "aborted"


@dataclass(frozen=True)
class BuildRequest:
    """What a worker is asked to build: the arguments of ``tfmerge.build.run.run_build``."""

    config: Config
    resolution: Resolution
    staging: str
    build_id: str
    newest_fingerprint: str | None
    raw_fingerprint: str | None
    #: Refusals an earlier worker of the same build logged already: (file, signature, code).
    reported: frozenset[tuple[Any, ...]] = frozenset()


class _OncePerBuild:
    """Drops a ``model_rejected`` line an earlier worker of the build wrote already, and tells
    the supervisor of every one it lets through."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.seen: set[tuple[Any, ...]] = set()

    def __call__(self, _logger: Any, _name: str, event: Any) -> Any:
        if event.get("event") != "model_rejected":
            return event
        key = (event.get("file"), event.get("signature"), event.get("code"))
        if key in self.seen:
            raise structlog.DropEvent
        self.seen.add(key)
        self._conn.send(("reported", key))
        return event


def _child_main(
    conn: Connection, output: Connection, log_format: str, log_level: str, supervisor: int
) -> None:
    """Entry point of the worker process."""
    # Before TensorFlow loads: its C++ runtime writes to fd 2, which the supervisor relays.
    os.dup2(output.fileno(), 2)
    output.close()
    # The supervisor handles SIGINT for the whole process group; a terminal's Ctrl-C must not
    # kill a build half-way before the supervisor decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGIO, signal.SIG_IGN)  # a lease break (tfmerge.snapshot) is polled
    _die_with_parent(supervisor)
    # A crash inside TensorFlow leaves the Python stack of every thread on stderr.
    faulthandler.enable()
    once = _OncePerBuild(conn)
    logs.configure(fmt=log_format, level=log_level, screen=once)  # type: ignore[arg-type]
    progress.report_to(lambda step: conn.send(("step", step)))
    from tfmerge.build.run import run_build

    conn.send(("ready", os.getpid()))
    try:
        request: BuildRequest = conn.recv()
    except EOFError:
        return
    once.seen.update(request.reported)
    try:
        result = run_build(
            request.config,
            request.resolution,
            Path(request.staging),
            request.build_id,
            newest_fingerprint=request.newest_fingerprint,
            raw_fingerprint=request.raw_fingerprint,
        )
    except OSError as exc:
        transient = exc.errno in TRANSIENT_ERRNOS
        conn.send(
            ("error", "os_error", f"{exc}", transient, (exc.errno, exc.strerror, exc.filename))
        )
    except Exception as exc:  # noqa: BLE001 - the child must always answer; the supervisor logs it
        conn.send(("error", "exception", f"{type(exc).__name__}: {exc}", False, None))
    else:
        conn.send(("result", result))
    conn.close()


def _die_with_parent(supervisor: int) -> None:
    """Ask the kernel to SIGKILL this process when the supervisor dies, however it dies.

    A worker outliving a killed supervisor would go on writing into a staging folder that the
    restarted supervisor is removing.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # the supervisor died before the request took effect
        os._exit(1)


class Worker:
    """One child process; used for exactly one build."""

    def __init__(self, config: Config) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        output_read, output_write = context.Pipe(duplex=False)
        self._conn = parent
        self._process: BaseProcess = context.Process(
            target=_child_main,
            args=(child, output_write, config.log.format, config.log.level, os.getpid()),
            name="tfmerge-worker",
            daemon=True,
        )
        try:
            self._process.start()
        except BaseException:
            for end in (parent, output_read):
                end.close()
            raise
        finally:
            child.close()
            output_write.close()
        self._output = OutputRelay(
            output_read, ended=self._process.sentinel, worker_pid=self._process.pid
        )
        self._output.start()
        self.started = time.monotonic()
        #: The step of a model's check the worker last reported, and when it must end.
        self._step: progress.Step | None = None
        self._step_deadline: float | None = None
        #: The refusals this worker logged (_OncePerBuild).
        self.reported: set[tuple[Any, ...]] = set()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.is_alive()

    def run(
        self,
        request: BuildRequest,
        *,
        timeout: float,
        wake_fd: int | None,
        should_abort: Callable[[], bool],
        on_wait: Callable[[], float | None] = lambda: None,
        started: float | None = None,
    ) -> BuildResult:
        """Send the request and wait for the result, a crash, a timeout or an abort.

        ``on_wait`` runs each time the wait wakes (it pings the systemd watchdog) and returns
        how long the next wait may last at most. The timeout counts from ``started`` (a
        time.monotonic() value; default now), for a build that an earlier worker began.
        """
        deadline = (time.monotonic() if started is None else started) + timeout
        self._output.context = {"build_id": request.build_id}
        try:
            self._conn.send(request)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.stop()
            raise WorkerError("crashed", self._describe_exit(), transient=True) from None
        watch: list[Any] = [self._conn, self._process.sentinel]
        if wake_fd is not None:
            watch.append(wake_fd)
        while True:
            if should_abort():
                self.stop()
                raise BuildAborted("the daemon is stopping")
            now = time.monotonic()
            if self._step_deadline is not None and now >= self._step_deadline:
                self._overrun()
            remaining = deadline - now
            if remaining <= 0:
                self.stop()
                raise WorkerError(
                    "timeout", f"the build took longer than {timeout:g} s", transient=False
                )
            if self._step_deadline is not None:
                remaining = min(remaining, self._step_deadline - now)
            limit = on_wait()
            ready = wait(watch, timeout=remaining if limit is None else min(remaining, limit))
            if wake_fd is not None and wake_fd in ready:
                drain(wake_fd)
            if self._conn in ready:
                message = self._receive()
                if message is None:
                    continue
                return message
            if self._process.sentinel in ready and not self._conn.poll():
                self._crashed()

    def _receive(self) -> BuildResult | None:
        try:
            message = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self._crashed()
        if message[0] == "ready":
            return None
        if message[0] == "reported":
            self.reported.add(message[1])
            return None
        if message[0] == "step":
            self._step = message[1]
            self._step_deadline = (
                None if self._step is None else time.monotonic() + progress.allowed(self._step)
            )
            return None
        self.stop()
        if message[0] == "result":
            result: BuildResult = message[1]
            return result
        _, kind, text, transient, error = message
        raise WorkerError(
            kind, text, transient=transient, error=None if error is None else OSError(*error)
        )

    def _crashed(self) -> NoReturn:
        """The worker is gone: on the model it was checking, if it was checking one."""
        self.stop()
        reason = self._describe_exit()
        code = self._process.exitcode
        if self._step is not None:
            raise ModelFailed(
                self._step, "crashed", reason, signal=-code if code and code < 0 else None
            )
        raise WorkerError("crashed", reason, transient=True)

    def _overrun(self) -> NoReturn:
        assert self._step is not None  # noqa: S101 - a step deadline is set with its step
        step = self._step
        self.stop()
        raise ModelFailed(
            step,
            "timeout",
            f"the worker was ended after {progress.allowed(step):.0f} s on the {step.step} step "
            f"of this model's check, which may take {step.seconds:.0f} s",
            signal=None,
        )

    def _describe_exit(self) -> str:
        self._process.join(timeout=_TERMINATE_GRACE_SECONDS)
        code = self._process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = (
                " (the kernel's out-of-memory killer sends SIGKILL)"
                if code == -signal.SIGKILL
                else ""
            )
            return f"the worker was killed by {name}{hint}"
        return f"the worker exited with status {code} without a result"

    def stop(self) -> None:
        """End the child: SIGTERM, then SIGKILL after a grace period; relay the last of its
        output. Idempotent."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(_TERMINATE_GRACE_SECONDS)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        else:
            self._process.join()
        self._conn.close()
        self._output.join()
