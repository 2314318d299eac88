"""What the daemon's loop sleeps on, and the signals that cut its sleep short. No TensorFlow here.

One pipe: the watchdog observer thread, a stop request and, through ``signal.set_wakeup_fd``,
every signal write a byte to it; the loop waits in ``select`` until a byte or its next
deadline comes, so an idle daemon uses no CPU. Signal handlers only set flags: Python runs
them in the main thread between two bytecodes, and the loop does the work once awake.

Every sleep of the loop goes through :class:`Pacer`, which also pings the systemd watchdog
on time, however long the loop sleeps.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
from collections.abc import Callable

from tfmerge.daemon.notify import Notifier

#: Returns at the next wake-up or after the given seconds (None: no limit).
WaitForWakeup = Callable[[float | None], None]
#: Puts back the signal handlers and the wake-up fd that were in force before.
Restore = Callable[[], None]


class WakeupPipe:
    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def fd(self) -> int:
        """Readable while a wake-up is pending; a build's wait watches it too."""
        return self._read

    def wake(self) -> None:
        """Safe from any thread."""
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"w")

    def wait(self, timeout: float | None) -> None:
        """Return at the next wake-up, or after ``timeout`` seconds (None: no limit)."""
        readable, _, _ = select.select([self._read], [], [], timeout)
        if readable:
            drain(self._read)

    def install_signal_handlers(
        self, *, stop: Callable[[], None], reload: Callable[[], None]
    ) -> Restore:
        """SIGTERM and SIGINT call ``stop``, SIGHUP calls ``reload``; each signal wakes the loop.

        Main thread only (a limit of ``signal``).
        """
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {signum: signal.getsignal(signum) for signum in handled}
        previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda _signum, _frame: stop())
        signal.signal(signal.SIGINT, lambda _signum, _frame: stop())
        signal.signal(signal.SIGHUP, lambda _signum, _frame: reload())

        def restore() -> None:
            for signum, handler in previous.items():
                # None: a handler set outside Python, which Python cannot put back.
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            signal.set_wakeup_fd(previous_fd)

        return restore

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def drain(fd: int) -> None:
    """Empty a non-blocking wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class Pacer:
    """The loop's sleeps, with the watchdog pinged through them.

    ``clock`` gives monotonic seconds, ``wait`` returns at the next wake-up or after the
    seconds given; both are injected, so tests step the loop on a fake clock. ``stopping``
    says whether a stop was requested, which cuts a sleep short.
    """

    def __init__(
        self,
        notifier: Notifier,
        clock: Callable[[], float],
        wait: WaitForWakeup,
        *,
        stopping: Callable[[], bool],
    ) -> None:
        self._notifier = notifier
        self._clock = clock
        self._wait = wait
        self._stopping = stopping
        self._last_ping = -math.inf

    def ping(self) -> None:
        """Ping the watchdog when its interval has (all but) passed since the last ping."""
        interval = self._notifier.watchdog_interval
        if interval is None:
            return
        now = self._clock()
        if now - self._last_ping >= interval * 0.9:
            self._notifier.watchdog()
            self._last_ping = now

    def sleep_until(self, deadline: float | None) -> None:
        """Until ``deadline`` (None or infinity: no limit), a wake-up, or the next ping due."""
        if self._notifier.watchdog_interval is not None:
            # Wake for the next ping, whatever woke the loop since the last one.
            ping = self._last_ping + self._notifier.watchdog_interval
            deadline = ping if deadline is None else min(deadline, ping)
        timeout = None if deadline in (None, math.inf) else max(0.0, deadline - self._clock())
        self._wait(timeout)

    def sleep(self, seconds: float) -> None:
        """Sleep (pinging the watchdog); a stop request cuts it short."""
        deadline = self._clock() + seconds
        while not self._stopping() and self._clock() < deadline:
            self.ping()
            limit = deadline - self._clock()
            interval = self._notifier.watchdog_interval
            self._wait(max(0.0, min(limit, interval or limit)))
