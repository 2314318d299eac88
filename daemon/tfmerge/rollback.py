"""``tfmerge rollback``: serve an older version again, as a new highest version.

TensorFlow Serving serves the highest version, and a version it failed to load is not loaded
again while it exists, so a rollback never renames backwards: it copies the older version to
the next number. No TensorFlow here.
"""

from __future__ import annotations

import shutil
import time

from tfmerge import exitcodes, publish, specs
from tfmerge.config import Config
from tfmerge.logs import get_logger
from tfmerge.store import AcceptedModel, Store, high_water, new_build_id


class RollbackError(Exception):
    pass


def rollback(config: Config, target: int | None) -> int:
    """``tfmerge rollback [--to N]``: an exit code; events say what happened."""
    log = get_logger()
    try:
        republish(config, target, reason="requested")
    except RollbackError as exc:
        log.error("rollback_failed", reason=str(exc))
        return exitcodes.FAILED
    return exitcodes.OK


def republish(
    config: Config, target: int | None, *, reason: str, allow_newest: bool = False
) -> int:
    """Copy version target (default: the one before the newest) to a new highest version.

    allow_newest: after a failed version was moved out, the last live version may be the
    newest left; it is still republished, so the number TensorFlow Serving follows moves on.
    """
    build_id = new_build_id()
    log = get_logger(build_id=build_id)
    store = Store(config.state_dir)
    found = publish.versions(config.serving_dir)
    if target is None:
        if len(found) < 2:
            raise RollbackError(f"no older version to roll back to (versions {sorted(found)})")
        target = sorted(found)[-2]
    if target not in found:
        raise RollbackError(f"version {target} does not exist (versions {sorted(found)})")
    newest = max(found)
    if target == newest and not allow_newest:
        raise RollbackError(f"version {target} is already the newest")
    staging = publish.staging_path(config.serving_dir, build_id)
    try:
        with publish.publish_lock(config.state_dir):
            publish.copy_version(
                found[target],
                staging,
                {
                    "rolled_back_from": target,
                    "build_id": build_id,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            version = publish.next_version(config.serving_dir, high_water(store))
            publish.publish(staging, config.serving_dir, version)
            store.raise_high_water(version)
            manifest = publish.read_manifest(config.serving_dir / str(version))
            signatures = manifest.get("signatures", {})
            publish.write_history(
                config.serving_dir,
                publish.HistoryLine(version, [], f"rollback to version {target}"),
                signatures,
            )
            store.record_accepted(AcceptedModel.from_dict(m) for m in signatures.values())
            # The inputs now on disk are what was rolled back: the daemon must not rebuild them.
            store.set_hold(specs.raw_fingerprint(config, specs.resolve(config)))
            live = store.live()
            protect = [version] if live is None else [version, live]
            pruned = publish.prune(config.serving_dir, config.keep_versions, protect=protect)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("rollback_published", version=version, restored=target, replaced=newest, reason=reason)
    for number in pruned:
        log.info("version_pruned", version=number)
    return version
