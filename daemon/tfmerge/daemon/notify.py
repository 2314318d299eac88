"""The systemd notify protocol (sd_notify(3)), standard library only.

systemd passes ``$NOTIFY_SOCKET``: a unix datagram socket path, or an abstract socket when it starts
with ``@``. A notification is one datagram of newline-separated ``KEY=VALUE`` assignments. Outside
systemd (no ``$NOTIFY_SOCKET``) every call is a no-op that returns False, so the daemon can call
these unconditionally.

After a SIGHUP reload the daemon calls :meth:`Notifier.reloading` first and :meth:`Notifier.ready`
once the new configuration is in force: with ``Type=notify-reload`` systemd waits for that
``READY=1`` to finish the reload job.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self

__all__ = ["DEFAULT_SEND_TIMEOUT", "MAX_DATAGRAM_BYTES", "Notifier"]

#: systemd reads notifications into a PIPE_BUF sized buffer and drops longer datagrams whole.
MAX_DATAGRAM_BYTES: Final = 4096

# systemd splits a notification at either line break, and a NUL ends it (it is read as a C string).
_SEPARATORS: Final = str.maketrans({"\n": " ", "\r": " ", "\0": " "})

# systemd's own client blocks on a full socket queue; a stalled manager must not stall the daemon.
DEFAULT_SEND_TIMEOUT: Final = 5.0

# sun_path is 108 bytes on Linux and must keep room for the terminating NUL of a filesystem path.
_SUN_PATH_BYTES: Final = 108


def _socket_address(value: str) -> str | bytes:
    """The address to send to for a ``$NOTIFY_SOCKET`` value; ValueError if unusable."""
    if value.startswith("@"):
        # Abstract sockets have no terminating NUL: the address is exactly the bytes given.
        address = b"\0" + os.fsencode(value[1:])
        if len(address) > _SUN_PATH_BYTES:
            raise ValueError(f"abstract socket name too long: {value!r}")
        return address
    if value.startswith("/"):
        if len(os.fsencode(value)) >= _SUN_PATH_BYTES:
            raise ValueError(f"socket path too long: {value!r}")
        return value
    # systemd also knows vsock: addresses, used only for notifications out of a virtual machine.
    raise ValueError(f"unsupported NOTIFY_SOCKET address: {value!r}")


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """The watchdog timeout systemd asks for, as sd_watchdog_enabled(3) reads it."""
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        # The variables are inherited: a child of the main process must not feed the watchdog.
        try:
            if int(pid_text) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    return usec if usec > 0 else None


def _status_value(text: str) -> str:
    return text.translate(_SEPARATORS)


def _encode(assignments: list[tuple[str, str]]) -> bytes:
    message = "\n".join(f"{key}={value}" for key, value in assignments)
    # A file name in a status can carry surrogate escapes; systemd ignores STATUS that is not UTF-8.
    data = message.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_DATAGRAM_BYTES:
        return data
    # Only free text (STATUS) can be long, and it is always last: shorten it rather than lose it.
    cut = data[: MAX_DATAGRAM_BYTES - 3].decode("utf-8", "ignore")
    return (cut + "...").encode("utf-8")


class Notifier:
    """Sends sd_notify messages over one lazily connected datagram socket.

    Every method returns True when the datagram was sent and False otherwise (notify disabled, or
    a send error, kept in :attr:`last_error`); none raises, since a dead notify socket must never
    take the daemon down. Safe to use from several threads (a watchdog pinger and the main loop).
    """

    def __init__(
        self,
        address: str | bytes | None,
        *,
        watchdog_usec: int | None = None,
        unusable_reason: str | None = None,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        self._address = address
        self._send_timeout = send_timeout
        self._watchdog_usec = watchdog_usec
        self._unusable_reason = unusable_reason
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.last_error: OSError | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, pid: int | None = None
    ) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; ``pid`` defaults to ours."""
        own_pid = os.getpid() if pid is None else pid
        watchdog_usec = _watchdog_usec(environ, own_pid)
        value = environ.get("NOTIFY_SOCKET")
        if not value:
            return cls(None, watchdog_usec=watchdog_usec)
        try:
            address = _socket_address(value)
        except ValueError as exc:
            return cls(None, watchdog_usec=watchdog_usec, unusable_reason=str(exc))
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None and not self._closed

    @property
    def unusable_reason(self) -> str | None:
        """Why a ``$NOTIFY_SOCKET`` that was set cannot be used (worth a log line), else None."""
        return self._unusable_reason

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) says."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> bool:
        """Startup, or a reload, is complete."""
        return self._send([("READY", "1"), *self._status(status)])

    def status(self, text: str) -> bool:
        return self._send([("STATUS", _status_value(text))])

    def watchdog(self) -> bool:
        return self._send([("WATCHDOG", "1")])

    def stopping(self, status: str | None = None) -> bool:
        return self._send([("STOPPING", "1"), *self._status(status)])

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; follow with :meth:`ready` when it is done.

        ``Type=notify-reload`` (systemd 253) matches the reload against the job by the
        CLOCK_MONOTONIC timestamp; older versions ignore the field.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(
            [("RELOADING", "1"), ("MONOTONIC_USEC", str(now_usec)), *self._status(status)]
        )

    def close(self) -> None:
        """Close the socket; later calls return False. Safe to call twice."""
        with self._lock:
            self._closed = True
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _status(status: str | None) -> list[tuple[str, str]]:
        return [] if status is None else [("STATUS", _status_value(status))]

    def _send(self, assignments: list[tuple[str, str]]) -> bool:
        if not self.enabled:
            return False
        data = _encode(assignments)
        with self._lock:
            if self._closed or self._address is None:
                return False
            try:
                if self._socket is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(self._send_timeout)
                    try:
                        sock.connect(self._address)
                    except OSError:
                        sock.close()
                        raise
                    self._socket = sock
                self._socket.send(data)
            except OSError as exc:
                # The receiver may come back (a restarted manager binds the same path): reconnect
                # on the next call instead of keeping a socket connected to nothing.
                if self._socket is not None:
                    self._socket.close()
                    self._socket = None
                self.last_error = exc
                return False
            self.last_error = None
            return True
