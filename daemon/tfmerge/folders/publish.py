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

from tfmerge.folders.fs import atomic_write, fsync_dir, fsync_tree, lock_folder, publish_lock
from tfmerge.folders.state import Store, high_water
from tfmerge.models import AcceptedModel

STAGING_PREFIX = ".staging-"
MANIFEST = Path("assets.extra") / "tfmerge.json"
_SERVER_VERSION = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*")
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


class PublishError(Exception):
    pass


class ForeignVersion(PublishError):
    """Entries TensorFlow Serving takes for versions above the one to publish, that are not
    versions it can load (a regular file ``99``): it would aspire to them, never to ours."""

    event = "foreign_version"

    def __init__(self, serving_dir: Path, version: int, paths: Sequence[Path]) -> None:
        self.version = version
        self.paths = [str(path) for path in paths]
        names = ", ".join(_describe(path) for path in paths)
        super().__init__(
            f"TensorFlow Serving takes {names} in {serving_dir} for a version above {version} "
            f"and serves only the highest version, so it would never serve version {version}: "
            f"remove {' and '.join(path.name for path in paths)} from {serving_dir}"
        )

    def fields(self) -> dict[str, Any]:
        return {"version": self.version, "paths": self.paths}


class AlreadyPublished(Exception):
    """The newest version was built from the very same inputs (by a concurrent build)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"version {version} was built from the same inputs")
        self.version = version


def _describe(path: Path) -> str:
    if path.is_symlink():
        return f"{path.name!r} (a symlink to {str(path.readlink())!r})"
    kind = "a regular file" if path.is_file() else "not a folder"
    return f"{path.name!r} ({kind})"


def server_version(name: str) -> int | None:
    """The version number TensorFlow Serving reads in a child's name, or None.

    Its parser (absl::SimpleAtoi) takes the whole name: ASCII whitespace around an optional
    sign and decimal digits, within int64. It looks at the name only, not at what it names.
    """
    match = _SERVER_VERSION.fullmatch(name)
    if match is None:
        return None
    number = int(match.group(1))
    return number if _INT64_MIN <= number <= _INT64_MAX else None


def server_entries(serving_dir: Path) -> list[tuple[int, Path]]:
    """Every child TensorFlow Serving takes for a version, folder or not, by number."""
    try:
        children = list(serving_dir.iterdir())
    except FileNotFoundError:
        return []
    found = [(server_version(child.name), child) for child in children]
    return sorted((number, child) for number, child in found if number is not None)


def versions(serving_dir: Path) -> dict[int, Path]:
    """The versions in serving_dir: the folders TensorFlow Serving counts (``0001`` is 1),
    numbered from 0 as tfmerge numbers them."""
    return {
        number: path
        for number, path in server_entries(serving_dir)
        if number >= 0 and path.is_dir()
    }


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


class Staging:
    """A build's staging folder, locked for as long as its build runs.

    A killed build leaves its staging folder behind; the next build (of any process) removes
    it, but must leave alone the folder of a build still running. The lock tells them apart:
    the kernel drops it when its holder dies, however it dies.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, serving_dir: Path, state_dir: Path, build_id: str) -> Staging:
        path = staging_path(serving_dir, build_id)
        # Under the publish lock, as every sweep is: none sees it created and not yet locked.
        with publish_lock(state_dir):
            path.mkdir()
            return cls(path, lock_folder(path))

    def close(self) -> None:
        """Remove the folder unless it was published (renamed away), then unlock it."""
        try:
            if self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def clear_staging(staging: Path) -> None:
    """Empty a staging folder for another try of the same build; its lock stays held."""
    for child in list(staging.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_writable(serving_dir: Path) -> None:
    """Raise the OSError a publish would meet in a read-only serving_dir, before any build."""
    probe = staging_path(serving_dir, f"probe-{os.getpid()}")
    probe.mkdir()
    probe.rmdir()


def remove_stale_staging(serving_dir: Path, state_dir: Path) -> list[str]:
    """Remove the staging folders of builds that were stopped or killed (only ever ours).

    A folder whose build still runs (in this process or another) is locked, and stays.
    """
    removed: list[str] = []
    if not serving_dir.is_dir():
        return removed
    with publish_lock(state_dir):
        for child in sorted(serving_dir.iterdir()):
            ours = child.name.startswith(STAGING_PREFIX) and not child.is_symlink()
            if not ours or not child.is_dir():
                continue
            try:
                fd = lock_folder(child)
            except BlockingIOError:
                continue
            try:
                shutil.rmtree(child)
            finally:
                os.close(fd)
            removed.append(child.name)
    return removed


def next_version(serving_dir: Path, high_water: int = 0) -> int:
    """One more than any version ever published here, even one moved out since."""
    existing = versions(serving_dir)
    return max([high_water, *existing]) + 1


def publish(staging: Path, serving_dir: Path, version: int) -> Path:
    """Sync staging and rename it to ``serving_dir/<version>``; sync the folder."""
    target = serving_dir / str(version)
    entries = server_entries(serving_dir)
    if os.path.lexists(target) or version in versions(serving_dir):
        raise PublishError(f"version {version} already exists in {serving_dir}")
    foreign = [path for number, path in entries if number >= version and not path.is_dir()]
    if foreign:
        raise ForeignVersion(serving_dir, version, foreign)
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
        text = self.message.replace('"', "'").replace("\n", " ").replace("\t", " ")
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
    # A symlinked version is someone else's: neither it nor what it points to is removed.
    doomed = [
        v for v in sorted(found)[:-keep] if v not in set(protect) and not found[v].is_symlink()
    ]
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
    shutil.copytree(source, staging, symlinks=False, dirs_exist_ok=True)
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
    fingerprint: str | None = None,
) -> tuple[int, list[int]]:
    """The one transaction by which every version is published, built or rolled back.

    Under the publish lock: if the newest version has ``fingerprint`` (a concurrent build of
    the same inputs published first), AlreadyPublished; else ``stage`` fills staging if given,
    staging is synced and renamed to the next version number, the history files, the
    accepted ``models`` and the rollback ``hold`` are recorded, and old versions are pruned,
    never the last one reported live. Returns the new version and the pruned ones.
    """
    with publish_lock(store.root):
        if fingerprint is not None:
            found = newest(serving_dir)
            if found is not None and read_manifest(found[1]).get("fingerprint") == fingerprint:
                raise AlreadyPublished(found[0])
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
