"""When a failed build is tried again, and how long the daemon waits before it. No TensorFlow here.

Only what is transient is retried: a worker that died (a signal, the out-of-memory killer)
or an ``OSError`` of a busy, full or failing file system. A bad input is never retried: a
corrupt graph is corrupt on the third try too. The waits grow 1 s, 2 s, 4 s … up to 60 s.
"""

from __future__ import annotations

from collections.abc import Callable

import tenacity

from tfmerge.daemon.worker import WorkerError
from tfmerge.logs import get_logger

WAIT_MAX_SECONDS = 60.0


def retrying(
    retries: int, *, stopping: Callable[[], bool], sleep: Callable[[float], None]
) -> tenacity.Retrying:
    """Up to ``retries`` more tries, none once ``stopping``; ``sleep`` waits between tries
    (the daemon's sleep, which a stop request cuts short)."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(retries + 1) | _StopWhen(stopping),
        wait=tenacity.wait_exponential(multiplier=1, min=1, max=WAIT_MAX_SECONDS),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, WorkerError) and e.transient),
        sleep=sleep,
        before_sleep=_log_retry,
        reraise=True,
    )


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    get_logger().warning(
        "build_retry", attempt=state.attempt_number, wait_seconds=wait, reason=str(exc)
    )


class _StopWhen(tenacity.stop.stop_base):
    """Stop retrying as soon as the daemon is asked to stop."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._predicate()
