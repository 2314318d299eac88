"""Is the new version live? TensorFlow Serving's model status over REST. No TensorFlow here.

``GET /v1/models/NAME/versions/N`` answers a GetModelStatusResponse in JSON::

    {"model_version_status": [{"version": "3", "state": "AVAILABLE",
                               "status": {"error_code": "OK", "error_message": ""}}]}

States run START, LOADING, AVAILABLE, UNLOADING, END. A version that failed to load ends in
END with an error status; a version the server has not seen yet answers 404.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tfmerge.config import ServingSettings

_POLL_SECONDS = 0.5
_REQUEST_TIMEOUT_SECONDS = 5.0


class ServingUnreachable(Exception):
    pass


@dataclass(frozen=True)
class VersionState:
    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""

    @property
    def failed(self) -> bool:
        return self.error_code not in ("OK", "0", "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state,
            "error_code": self.error_code,
            "error_message": self.error_message,
        }


def model_status(settings: ServingSettings, version: int | None = None) -> list[VersionState]:
    """The server's view of the model (or of one version); [] when it knows none of it yet."""
    if settings.rest_url is None:
        raise ServingUnreachable("no [serving] rest_url is configured")
    url = f"{settings.rest_url}/v1/models/{settings.model_name}"
    if version is not None:
        url += f"/versions/{version}"
    try:
        with urllib.request.urlopen(url, timeout=_REQUEST_TIMEOUT_SECONDS) as response:  # noqa: S310 - the operator's own server URL, http(s) checked by the config
            payload = json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise ServingUnreachable(f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServingUnreachable(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    states = []
    for entry in payload.get("model_version_status", []):
        status = entry.get("status", {})
        states.append(
            VersionState(
                version=int(entry.get("version", -1)),
                state=str(entry.get("state", "UNKNOWN")),
                error_code=str(status.get("error_code", "OK")),
                error_message=str(status.get("error_message", "")),
            )
        )
    return states


@dataclass(frozen=True)
class LiveResult:
    live: bool
    seconds: float
    state: str | None
    reason: str
    #: No verdict: the wait timed out or was cut short by a stop request. Neither live nor
    #: failed, so nothing is undone.
    interrupted: bool = False


def wait_until_live(
    settings: ServingSettings,
    version: int,
    *,
    wait: Callable[[float], bool],
    clock: Callable[[], float] = time.monotonic,
) -> LiveResult:
    """Poll until version is AVAILABLE, failed, or live_timeout_seconds have passed.

    ``wait(seconds)`` sleeps and returns False when the caller is stopping.
    """
    started = clock()
    state: str | None = None
    last_problem = "the server has not reported the version yet"
    while True:
        try:
            states = [s for s in model_status(settings, version) if s.version == version]
        except ServingUnreachable as exc:
            states = []
            last_problem = str(exc)
        elapsed = clock() - started
        if states:
            current = states[0]
            state = current.state
            if current.failed:
                reason = f"{current.error_code}: {current.error_message}".strip(": ")
                return LiveResult(False, elapsed, state, reason)
            if state in ("AVAILABLE", "UNLOADING", "END"):
                # A version already unloading or ended without an error was live and replaced.
                return LiveResult(True, elapsed, state, "available")
            last_problem = f"state {state}"
        if elapsed >= settings.live_timeout_seconds:
            # No verdict from the server (unreachable, still loading, or another model name):
            # never a reason to take a version away, only to say it is unconfirmed.
            reason = f"not AVAILABLE after {elapsed:.0f} s ({last_problem})"
            return LiveResult(False, elapsed, state, reason, interrupted=True)
        if not wait(min(_POLL_SECONDS, settings.live_timeout_seconds - elapsed)):
            return LiveResult(
                False, clock() - started, state, "stopped while waiting", interrupted=True
            )
