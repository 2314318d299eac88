"""Run the real daemon as a subprocess and follow its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Event = Mapping[str, Any]

#: Seconds a wait on real processes gets before it counts as a hang. Only a hang may reach it:
#: a daemon start with its TensorFlow import takes seconds on an idle machine and a minute or
#: two on one busy many times over, and pytest-timeout still bounds every test.
PATIENCE = 240.0


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
        timeout: float = PATIENCE,
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

    def wait_ready(self, timeout: float = PATIENCE) -> dict[str, Any]:
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = PATIENCE) -> int:
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


class NotifyListener:
    """Plays systemd's side of sd_notify: a bound datagram socket drained by a reader thread.

    The kernel queues only a few datagrams per socket (net.unix.max_dgram_qlen, often 10), and
    a daemon with a watchdog sends WATCHDOG=1 every half period: a socket read only now and then
    fills up, and later messages, such as STOPPING=1, are dropped. Reading all the time keeps
    every message, whatever the machine's load.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[str] = []
        self._changed = threading.Condition()
        self._reading = threading.Lock()
        self._stop = threading.Event()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.bind("\0" + address[1:] if address.startswith("@") else address)
        # The reader wakes this often to notice close(); messages wake it at once.
        self._socket.settimeout(0.1)
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if not self._receive():
                return

    def _receive(self) -> bool:
        """One datagram into messages, if one comes within the socket's timeout; False once
        the socket is closed."""
        # Held from recv() to append, so that _drain() sees every datagram already received.
        with self._reading:
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                return True
            except OSError:
                return False
            with self._changed:
                self.messages.append(data.decode())
                self._changed.notify_all()
        return True

    def _drain(self) -> None:
        """Read whatever is queued: after the sender is gone, nothing more can come."""
        with self._reading:
            while True:
                try:
                    data = self._socket.recv(4096)
                except (TimeoutError, OSError):
                    return
                with self._changed:
                    self.messages.append(data.decode())

    def _find(self, line: str) -> str | None:
        return next((m for m in self.messages if line in m.splitlines()), None)

    def lines(self) -> list[str]:
        with self._changed:
            return [line for message in self.messages for line in message.splitlines()]

    def wait_for(
        self,
        line: str,
        *,
        timeout: float = PATIENCE,
        alive: Callable[[], bool] = lambda: True,
    ) -> str:
        """The first message with this line. Fails at the deadline, or once alive() is false
        (the sender has exited) and no such message was sent."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                found = self._find(line)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining > 0 and alive():
                    self._changed.wait(min(remaining, 0.5))
                    continue
            self._drain()
            with self._changed:
                found = self._find(line)
                if found is not None:
                    return found
                raise AssertionError(f"no {line} within {timeout} s; got {self.messages[-5:]}")

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(
    predicate: Callable[[], bool], *, timeout: float = PATIENCE, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(interval)
