"""``tfmerge rollback``: serve an older version again, as a new highest version.

TensorFlow Serving serves the highest version, and a version it failed to load is not loaded
again while it exists, so a rollback never renames backwards: it copies the older version to
the next number. No TensorFlow here.
"""

from __future__ import annotations

import shutil
import time

from tfmerge import exitcodes, pipeline, publish, specs
from tfmerge.config import Config
from tfmerge.logs import get_logger
from tfmerge.store import AcceptedModel, Store


def rollback(config: Config, target: int | None) -> int:
    build_id = pipeline.new_build_id()
    log = get_logger(build_id=build_id)
    store = Store(config.state_dir)
    found = publish.versions(config.serving_dir)
    if len(found) < 1 or (target is None and len(found) < 2):
        log.error(
            "rollback_failed", reason="no older version to roll back to", versions=sorted(found)
        )
        return exitcodes.FAILED
    newest = max(found)
    if target is None:
        target = sorted(found)[-2]
    if target not in found:
        log.error(
            "rollback_failed", reason=f"version {target} does not exist", versions=sorted(found)
        )
        return exitcodes.FAILED
    if target == newest:
        log.error("rollback_failed", reason=f"version {target} is already the newest")
        return exitcodes.FAILED
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
            version = publish.next_version(config.serving_dir, pipeline.high_water(store))
            publish.publish(staging, config.serving_dir, version)
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
            last = store.last_build()
            store.record_last_build(
                {**last, "high_water": max(version, pipeline.high_water(store))}
            )
            pruned = publish.prune(config.serving_dir, config.keep_versions, protect=[version])
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("rollback_published", version=version, restored=target, replaced=newest)
    for number in pruned:
        log.info("version_pruned", version=number)
    return exitcodes.OK
