"""The serving folder: versions, staging, atomic publish, history files, pruning, rollback.

TensorFlow Serving polls the base path and loads any child whose whole name parses as an
integer as soon as it sees it, with no readiness marker. So a version is built under a name
that is not an integer (``.staging-<build id>``), synced, and renamed into place in one
rename(2). No TensorFlow here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfmerge.folders.fs import atomic_write, fsync_dir, fsync_tree, publish_lock
from tfmerge.folders.state import Store, high_water
from tfmerge.models import AcceptedModel

STAGING_PREFIX = ".staging-"
MANIFEST = Path("assets.extra") / "tfmerge.json"
_VERSION = re.compile(r"^[0-9]+$")
_INT64_MAX = 2**63 - 1


class PublishError(Exception):
    pass


def versions(serving_dir: Path) -> dict[int, Path]:
    """Children TensorFlow Serving counts as versions (``0001`` is version 1)."""
    found: dict[int, Path] = {}
    try:
        children = list(serving_dir.iterdir())
    except FileNotFoundError:
        return found
    for child in children:
        if _VERSION.match(child.name) and int(child.name) <= _INT64_MAX and child.is_dir():
            found[int(child.name)] = child
    return dict(sorted(found.items()))


def newest(serving_dir: Path) -> tuple[int, Path] | None:
    found = versions(serving_dir)
    if not found:
        return None
    number = max(found)
    return number, found[number]


def read_manifest(version_dir: Path) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads((version_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value


def staging_path(serving_dir: Path, build_id: str) -> Path:
    return serving_dir / f"{STAGING_PREFIX}{build_id}"


def remove_stale_staging(serving_dir: Path) -> list[str]:
    """Remove staging folders a stopped or killed build left behind (only ever ours)."""
    removed = []
    if serving_dir.is_dir():
        for child in sorted(serving_dir.iterdir()):
            if child.name.startswith(STAGING_PREFIX) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
                removed.append(child.name)
    return removed


def next_version(serving_dir: Path, high_water: int = 0) -> int:
    """One more than any version ever published here, even one moved out since."""
    existing = versions(serving_dir)
    return max([high_water, *existing]) + 1


def publish(staging: Path, serving_dir: Path, version: int) -> Path:
    """Sync staging and rename it to ``serving_dir/<version>``; sync the folder."""
    target = serving_dir / str(version)
    if target.exists() or version in versions(serving_dir):
        raise PublishError(f"version {version} already exists in {serving_dir}")
    fsync_tree(staging)
    # TensorFlow Serving usually runs as another user and must be able to read the version.
    os.chmod(staging, 0o755)  # noqa: S103 - a served model is meant to be world-readable
    os.rename(staging, target)
    fsync_dir(serving_dir)
    return target


@dataclass(frozen=True)
class HistoryLine:
    version: int
    new_signatures: Sequence[str]
    message: str

    def render(self) -> str:
        text = self.message.replace('"', "'").replace("\n", " ")
        return f'{self.version}\t{",".join(self.new_signatures)}\t"{text}"\n'


def write_history(serving_dir: Path, line: HistoryLine, signatures: Iterable[str]) -> None:
    """Update ``current_version`` (newest line first) and ``exported_models`` atomically."""
    current = serving_dir / "current_version"
    try:
        previous = current.read_text(encoding="utf-8")
    except FileNotFoundError:
        previous = ""
    atomic_write(current, (line.render() + previous).encode())
    atomic_write(
        serving_dir / "exported_models", "".join(f"{s}\n" for s in sorted(signatures)).encode()
    )


def prune(serving_dir: Path, keep: int, protect: Iterable[int] = ()) -> list[int]:
    """Remove all but the newest ``keep`` versions (never fewer than two)."""
    keep = max(keep, 2)
    found = versions(serving_dir)
    doomed = [v for v in sorted(found)[:-keep] if v not in set(protect)]
    for number in doomed:
        # Rename out of the integer namespace first so the server never sees a half-deleted version.
        trash = serving_dir / f"{STAGING_PREFIX}prune-{number}"
        os.rename(found[number], trash)
        shutil.rmtree(trash)
    if doomed:
        fsync_dir(serving_dir)
    return doomed


def copy_version(source: Path, staging: Path, manifest_update: Mapping[str, Any]) -> None:
    """Copy a published version into staging for a rollback, updating its manifest."""
    shutil.copytree(source, staging, symlinks=False)
    manifest = read_manifest(staging)
    manifest.update(manifest_update)
    (staging / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def move_out(serving_dir: Path, version: int, destination: Path) -> Path:
    """Move a version out of the base path (a failed load is not retried while it exists)."""
    source = serving_dir / str(version)
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / str(version)
    suffix = 0
    while target.exists():
        suffix += 1
        target = destination / f"{version}.{suffix}"
    shutil.move(source, target)
    fsync_dir(serving_dir)
    return target


def publish_version(
    serving_dir: Path,
    store: Store,
    staging: Path,
    *,
    keep_versions: int,
    models: Sequence[AcceptedModel],
    new_signatures: Sequence[str],
    message: str,
    hold: str | None = None,
    stage: Callable[[], None] | None = None,
) -> tuple[int, list[int]]:
    """The one transaction by which every version is published, built or rolled back.

    Under the publish lock: ``stage`` fills staging if given, staging is synced and renamed
    to the next version number, the history files, the accepted ``models`` and the rollback
    ``hold`` are recorded, and old versions are pruned, never the last one reported live.
    Returns the new version and the pruned ones.
    """
    with publish_lock(store.root):
        if stage is not None:
            stage()
        version = next_version(serving_dir, high_water(store))
        publish(staging, serving_dir, version)
        store.raise_high_water(version)
        write_history(
            serving_dir,
            HistoryLine(version, new_signatures, message),
            (m.signature for m in models),
        )
        store.record_accepted(models)
        store.set_hold(hold)
        live = store.live()
        pruned = prune(serving_dir, keep_versions, protect=[] if live is None else [live])
    return version, pruned
