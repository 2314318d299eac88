"""One build from start to publish, as the supervisor sees it. No TensorFlow here.

The TensorFlow part (``tfmerge.build.run_build``) is passed in as a callable, so the one-shot
``tfmerge build`` runs it in-process and the daemon runs it in a worker process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tfmerge import specs
from tfmerge.config import Config
from tfmerge.daemon import live
from tfmerge.folders import publish
from tfmerge.folders.state import Store, high_water, new_build_id
from tfmerge.logs import bound_context, get_logger
from tfmerge.models import AcceptedModel

if TYPE_CHECKING:  # importing tfmerge.build at run time would import TensorFlow
    from tfmerge.models import BuildResult


class BuildRunner(Protocol):
    def __call__(
        self,
        config: Config,
        resolution: specs.Resolution,
        staging: Path,
        build_id: str,
        *,
        newest_fingerprint: str | None,
        raw_fingerprint: str | None,
    ) -> BuildResult: ...


@dataclass(frozen=True)
class Outcome:
    """The summary of one build, also the ``build_finished`` log line."""

    build_id: str
    outcome: str  # published | unchanged | empty | failed | error
    version: int | None
    rejected: int
    fields: dict[str, Any]

    @property
    def ok(self) -> bool:
        live = self.fields.get("live", True)
        return self.outcome in ("published", "unchanged") and self.rejected == 0 and live


def newest_manifest(config: Config) -> tuple[int | None, dict[str, Any]]:
    found = publish.newest(config.serving_dir)
    if found is None:
        return None, {}
    return found[0], publish.read_manifest(found[1])


def _changes(
    previous: dict[str, AcceptedModel], models: tuple[AcceptedModel, ...]
) -> dict[str, list[str]]:
    current = {m.signature: m for m in models}
    added = sorted(s for s in current if s not in previous)
    updated = sorted(
        s
        for s, m in current.items()
        if s in previous
        and not m.kept
        and (m.sha256, dict(m.inputs), dict(m.outputs))
        != (previous[s].sha256, dict(previous[s].inputs), dict(previous[s].outputs))
    )
    return {
        "added": added,
        "updated": updated,
        "kept": sorted(s for s, m in current.items() if m.kept),
        "removed": sorted(s for s in previous if s not in current),
    }


def _message(changes: dict[str, list[str]]) -> str:
    parts = [f"{kind} {', '.join(names)}" for kind, names in changes.items() if names]
    return "; ".join(parts) if parts else "rebuilt"


def run_once(
    config: Config,
    runner: BuildRunner,
    *,
    trigger: str = "manual",
    settle_seconds: float | None = None,
    skip_unchanged_files: bool = False,
    warn_no_default: bool = True,
    wait: Callable[[float], bool] | None = None,
) -> Outcome:
    """Resolve, build (through runner), and publish when the result is new and verified.

    With skip_unchanged_files, files and declarations identical to those the newest version
    was built from end the build before TensorFlow is started (the daemon's start-up check).
    """
    build_id = new_build_id()
    with bound_context(build_id=build_id):
        return _run_once(
            config,
            runner,
            build_id,
            trigger=trigger,
            settle_seconds=settle_seconds,
            skip_unchanged_files=skip_unchanged_files,
            warn_no_default=warn_no_default,
            wait=wait,
        )


def _run_once(
    config: Config,
    runner: BuildRunner,
    build_id: str,
    *,
    trigger: str,
    settle_seconds: float | None,
    skip_unchanged_files: bool,
    warn_no_default: bool,
    wait: Callable[[float], bool] | None,
) -> Outcome:
    log = get_logger()
    store = Store(config.state_dir)
    started = time.monotonic()
    config.serving_dir.mkdir(parents=True, exist_ok=True)
    resolution = specs.resolve(config)
    # Hashing every file costs a read of all inputs: only the start-up check needs it before
    # the build; otherwise the worker derives the same fingerprint from the bytes it reads.
    raw = specs.raw_fingerprint(config, resolution) if skip_unchanged_files else None
    newest_version, manifest = newest_manifest(config)
    log.info("build_started", trigger=trigger, models=len(resolution.specs), newest=newest_version)
    if skip_unchanged_files and raw == manifest.get("raw_fingerprint") and raw:
        return _unchanged_files(build_id, store, newest_version, manifest, started)
    for name in publish.remove_stale_staging(config.serving_dir, config.state_dir):
        log.info("staging_removed", path=str(config.serving_dir / name))
    staging = publish.Staging.create(config.serving_dir, config.state_dir, build_id)
    try:
        result = runner(
            config,
            resolution,
            staging.path,
            build_id,
            newest_fingerprint=manifest.get("fingerprint"),
            raw_fingerprint=raw,
        )
        outcome, version, fields = _conclude(
            config, store, staging.path, result, newest_version, wait=wait or _sleep
        )
        if _lacks_default(config, result, warn=warn_no_default):
            fields["no_default_signature"] = True
        durations = fields["durations"]
        if settle_seconds is not None:
            durations["settle"] = round(settle_seconds, 4)
        durations["total"] = round(time.monotonic() - started, 4)
        if result.unsettled:
            # Files not at rest were not built as they are now: the next start must build.
            raw = None
            fields["unsettled"] = list(result.unsettled)
            log.info(
                "inputs_unsettled",
                files=list(result.unsettled),
                reason="still being written or changed while read; built again once at rest",
            )
        store.record_last_build(
            {
                "raw_fingerprint": raw or result.raw_fingerprint,
                "outcome": outcome,
                "build_id": build_id,
                "high_water": max(version or 0, high_water(store), newest_version or 0),
            }
        )
    except BaseException as exc:
        # Every build_started gets its build_finished, also when the build never returned.
        ending = getattr(exc, "outcome", "error")
        (log.warning if ending == "aborted" else log.error)(
            "build_finished",
            outcome=ending,
            version=None,
            reason=str(exc) or type(exc).__name__,
            durations={"total": round(time.monotonic() - started, 4)},
        )
        raise
    finally:
        staging.close()
    rejected = len(result.rejections)
    clean = outcome in ("published", "unchanged") and not rejected and fields.get("live", True)
    summary = {k: v for k, v in fields.items() if k != "published_at"}
    # Not published: the newest version stays, which a concurrent build may have published.
    shown = version if outcome == "published" else (newest_manifest(config)[0] or newest_version)
    (log.info if clean else log.warning)(
        "build_finished", outcome=outcome, version=shown, **summary
    )
    return Outcome(build_id, outcome, version, rejected, fields)


def _conclude(
    config: Config,
    store: Store,
    staging: Path,
    result: BuildResult,
    newest_version: int | None,
    *,
    wait: Callable[[float], bool],
) -> tuple[str, int | None, dict[str, Any]]:
    """Publish a built result (and follow it), or say why nothing is published."""
    durations = dict(result.timings)
    version: int | None = None
    outcome: str = result.outcome
    fields: dict[str, Any] = {}
    if result.outcome == "built":
        changes = _changes(store.accepted(), result.models)
        publish_started = time.monotonic()
        try:
            version = _publish(config, store, staging, result, changes)
        except publish.AlreadyPublished as exc:
            # Another build of the same inputs got the publish lock first.
            get_logger().info(
                "build_unchanged",
                version=exc.version,
                fingerprint=result.fingerprint,
                reason="a concurrent build published these inputs first",
            )
            outcome = "unchanged"
        else:
            outcome = "published"
            fields = dict(changes)
            fields["published_at"] = time.monotonic()
            durations["publish"] = round(fields["published_at"] - publish_started, 4)
            if config.serving.rest_url:
                fields.update(live.follow(config, version, wait))
    else:
        _log_unpublished(result, newest_version)
    if outcome != "published":
        # Nothing was published, so nothing was added, updated or removed.
        kept = sorted(m.signature for m in result.models if m.kept)
        fields = {"added": [], "updated": [], "kept": kept, "removed": []}
    store.record_rejections(result.rejections)
    fields["rejected"] = [r.as_dict() for r in result.rejections]
    fields["durations"] = durations
    fields["signatures"] = len(result.models)
    return outcome, version, fields


def _unchanged_files(
    build_id: str,
    store: Store,
    newest: int | None,
    manifest: dict[str, Any],
    started: float,
) -> Outcome:
    """The summary of a build ended before TensorFlow: newest was built from these very files."""
    log = get_logger()
    log.info("build_unchanged", version=newest, fingerprint=manifest.get("fingerprint"))
    rejections = store.rejections()
    fields = {
        "added": [],
        "updated": [],
        "kept": sorted(name for name, m in store.accepted().items() if m.kept),
        "removed": [],
        "rejected": rejections,
        "durations": {"total": round(time.monotonic() - started, 4)},
        "signatures": len(store.accepted()),
    }
    (log.warning if rejections else log.info)(
        "build_finished", outcome="unchanged", version=newest, **fields
    )
    return Outcome(build_id, "unchanged", None, len(rejections), fields)


def _log_unpublished(result: BuildResult, newest_version: int | None) -> None:
    log = get_logger()
    if result.outcome == "unchanged":
        log.info("build_unchanged", version=newest_version, fingerprint=result.fingerprint)
    elif result.outcome == "empty":
        log.warning("build_empty", reason="no model was accepted; nothing to publish")


def _lacks_default(config: Config, result: BuildResult, *, warn: bool) -> bool:
    """True (and a warning when warn) when clients naming no signature would fail."""
    names = sorted(m.signature for m in result.models)
    if not names or "serving_default" in names or config.default_signature in names:
        return False
    if warn:
        get_logger().warning(
            "no_default_signature",
            signatures=names,
            reason="requests that name no signature will fail; set default_signature",
        )
    return True


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def _publish(
    config: Config,
    store: Store,
    staging: Path,
    result: BuildResult,
    changes: dict[str, list[str]],
) -> int:
    version, pruned = publish.publish_version(
        config.serving_dir,
        store,
        staging,
        keep_versions=config.keep_versions,
        models=result.models,
        new_signatures=changes["added"],
        message=_message(changes),
        fingerprint=result.fingerprint,
    )
    log = get_logger()
    log.info(
        "version_published",
        version=version,
        path=str(config.serving_dir / str(version)),
        signatures=[m.signature for m in result.models],
    )
    for number in pruned:
        log.info("version_pruned", version=number)
    _collect_garbage(config, store)
    return version


def _collect_garbage(config: Config, store: Store) -> None:
    """Keep the blobs of accepted models and of every retained version's sources."""
    keep = {m.sha256 for m in store.accepted().values()}
    for path in publish.versions(config.serving_dir).values():
        keep.update(s.get("sha256", "") for s in publish.read_manifest(path).get("sources", []))
    store.collect_garbage(keep)
