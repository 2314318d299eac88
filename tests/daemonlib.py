"""Run the real daemon as a subprocess and follow its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Event = Mapping[str, Any]


class DaemonProcess:
    """``tfmerge run`` in a child process; its stdout events collected by one reader thread."""

    def __init__(self, config: Path, *, env: Mapping[str, str] | None = None) -> None:
        inherited = {
            k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
        }
        environment = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tfmerge", "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            text=True,
            errors="backslashreplace",
        )
        self.events: list[dict[str, Any]] = []
        #: Lines on stdout that are not JSON objects, and every line on stderr.
        self.not_json: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="daemon-log-reader", daemon=True)
        self._reader.start()
        self._stderr_reader = threading.Thread(
            target=self._read_stderr, name="daemon-stderr-reader", daemon=True
        )
        self._stderr_reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self._changed:
                if isinstance(event, dict):
                    self.events.append(event)
                else:
                    self.not_json.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.stderr_lines.append(line)

    def named(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events[since:] if e.get("event") == name]

    def mark(self) -> int:
        with self._changed:
            return len(self.events)

    def wait_for(
        self,
        name: str,
        *,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """The first event called name (after index since) that matches; fails at the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[since:]:
                    if event.get("event") == name and where(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [e.get("event") for e in self.events[since:]]
                    raise AssertionError(f"no {name!r} event within {timeout} s; saw {names}")
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"daemon exited ({self.process.returncode}) before {name!r}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait_for("daemon_ready", timeout=timeout)

    def worker_pids(self) -> list[int]:
        """The daemon's build workers (not multiprocessing's resource tracker)."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            children = [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []
        workers = []
        for pid in children:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                workers.append(pid)
        return workers

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._close_streams()
        return code

    def kill(self) -> None:
        """SIGKILL the supervisor, then reap whatever it left (its worker dies with its pipe)."""
        children = self.worker_pids()
        self.process.kill()
        self.process.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        self._close_streams()

    def _close_streams(self) -> None:
        for reader, stream in (
            (self._reader, self.process.stdout),
            (self._stderr_reader, self.process.stderr),
        ):
            reader.join(timeout=10)
            if stream is not None:
                stream.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.stop()
        self.process.wait()
        self._close_streams()


def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 60.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(interval)
