"""``tfmerge rollback``: serve an older version again, as a new highest version.

TensorFlow Serving serves the highest version, and a version it failed to load is not loaded
again while it exists, so a rollback never renames backwards: it copies the older version to
the next number. No TensorFlow here.
"""

from __future__ import annotations

import shutil
import time

from tfmerge import exitcodes, specs
from tfmerge.config import Config
from tfmerge.folders import publish
from tfmerge.folders.state import Store, new_build_id
from tfmerge.logs import bound_context, get_logger
from tfmerge.models import AcceptedModel


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
    with bound_context(build_id=build_id):
        return _republish(config, target, build_id, reason=reason, allow_newest=allow_newest)


def _republish(
    config: Config, target: int | None, build_id: str, *, reason: str, allow_newest: bool
) -> int:
    log = get_logger()
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
    source = found[target]
    signatures = publish.read_manifest(source).get("signatures", {})
    staging = publish.staging_path(config.serving_dir, build_id)
    update = {
        "rolled_back_from": target,
        "build_id": build_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        version, pruned = publish.publish_version(
            config.serving_dir,
            store,
            staging,
            keep_versions=config.keep_versions,
            models=[AcceptedModel.from_dict(m) for m in signatures.values()],
            new_signatures=[],
            message=f"rollback to version {target}",
            # The inputs now on disk are what was rolled back: the daemon must not rebuild them.
            hold=specs.raw_fingerprint(config, specs.resolve(config)),
            # Under the lock, so that no concurrent publish prunes the source while it is read.
            stage=lambda: publish.copy_version(source, staging, update),
        )
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("rollback_published", version=version, restored=target, replaced=newest, reason=reason)
    for number in pruned:
        log.info("version_pruned", version=number)
    return version
