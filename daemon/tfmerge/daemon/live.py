"""After a publish: follow the version until TensorFlow Serving reports it live, or undo it.

A version the server fails to load is never retried by the server while it exists, so it is
moved out of the base path (into ``state_dir/failed/``) and the last version that went live is
republished under a new highest number. No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tfmerge.config import Config
from tfmerge.daemon import tfserving
from tfmerge.folders import publish, rollback
from tfmerge.folders.state import Store
from tfmerge.logs import get_logger


def _report(result: tfserving.LiveResult, version: int, store: Store) -> None:
    """One event for the outcome of a wait: live, unconfirmed (no verdict) or failed."""
    log = get_logger()
    seconds = round(result.seconds, 3)
    if result.live:
        store.record_live(version, result.seconds)
        log.info("version_live", version=version, seconds=seconds)
        return
    event, method = (
        ("version_unconfirmed", log.warning)
        if result.interrupted
        else ("version_failed", log.error)
    )
    method(event, version=version, state=result.state, reason=result.reason, seconds=seconds)


def follow(config: Config, version: int, wait: Callable[[float], bool]) -> dict[str, Any]:
    """Wait for version to go live; on failure roll back. Returns fields for the summary line."""
    log = get_logger()
    store = Store(config.state_dir)
    result = tfserving.wait_until_live(config.serving, version, wait=wait)
    fields: dict[str, Any] = {"live": result.live, "live_seconds": round(result.seconds, 3)}
    _report(result, version, store)
    if result.live or result.interrupted or not config.serving.rollback_on_failure:
        return fields
    moved = publish.move_out(config.serving_dir, version, config.state_dir / "failed")
    log.warning("version_moved_out", version=version, path=str(moved))
    last_live = store.live()
    if last_live is None or last_live not in publish.versions(config.serving_dir):
        why = (
            "no version has been reported live yet"
            if last_live is None
            else f"the last live version {last_live} is no longer in serving_dir"
        )
        log.error("rollback_failed", version=version, reason=f"{why}; nothing to restore")
        return fields
    try:
        restored = rollback.republish(
            config,
            last_live,
            reason=f"version {version} failed to load: {result.reason}",
            allow_newest=True,
        )
    except (rollback.RollbackError, OSError) as exc:
        log.error("rollback_failed", version=version, reason=str(exc))
        return fields
    fields["restored"] = restored
    _report(tfserving.wait_until_live(config.serving, restored, wait=wait), restored, store)
    return fields
