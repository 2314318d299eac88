"""The state folder: last accepted input of every model, current rejections, build records.

Layout (all written atomically: temporary file, fsync, rename, fsync of the folder)::

    state_dir/blobs/<sha256><.pb|.pbtxt>   exact bytes of every checked input (content-addressed;
                                           hard-linked into versions as their variables' data)
    state_dir/checks/*.pack                what the checks of inputs found (build/verdicts.py)
    state_dir/accepted.json                signature -> AcceptedModel, as last published
    state_dir/rejected.json                the inputs refused by the last build
    state_dir/last_build.json              fingerprint of what the last build saw on disk
    state_dir/hold.json                    set by rollback: do not rebuild these inputs
    state_dir/live.json                    the last version TensorFlow Serving reported live
    state_dir/verdicts.json                refusals remembered by input and declaration
    state_dir/failed/<N>                   versions moved out of the serving folder
    state_dir/tfmerge.lock                 held by the running daemon (one per state folder)
    state_dir/publish.lock                 held while a version is renamed into place

No TensorFlow here.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tfmerge.folders.fs import PendingFile, atomic_write
from tfmerge.folders.packs import Packs
from tfmerge.models import AcceptedModel, Rejection

#: How many remembered refusals state_dir keeps, the most recent ones.
_VERDICTS_KEPT = 256


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError):
        # A damaged record must not stop the daemon: the next publish rewrites it.
        return default


def new_build_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.blobs = state_dir / "blobs"
        self.checks = state_dir / "checks"

    def blob_path(self, sha256: str, suffix: str) -> Path:
        return self.blobs / f"{sha256}{suffix}"

    def has_blob(self, sha256: str, suffix: str, size: int) -> bool:
        """Whether the blob is in place with the right size (its bytes were synced first)."""
        try:
            return self.blob_path(sha256, suffix).stat().st_size == size
        except OSError:
            return False

    def start_blob(self) -> PendingFile:
        """A new blob under a temporary name, for the caller to fill; ``seal`` names it.

        A blob gets its name only once its bytes are on disk, so one that exists is whole: a
        build hard-links it into a version as it is.
        """
        return PendingFile.start(self.blobs, ".incoming.")

    def accepted(self) -> dict[str, AcceptedModel]:
        raw = read_json(self.root / "accepted.json", {})
        return {name: AcceptedModel.from_dict(entry) for name, entry in raw.items()}

    def record_accepted(self, models: Iterable[AcceptedModel]) -> None:
        write_json(self.root / "accepted.json", {m.signature: m.as_dict() for m in models})

    def rejections(self) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = read_json(self.root / "rejected.json", [])
        return value

    def record_rejections(self, rejections: Iterable[Rejection]) -> None:
        write_json(self.root / "rejected.json", [r.as_dict() for r in rejections])

    def verdict(self, key: str) -> dict[str, Any] | None:
        """The refusal remembered under key (tfmerge.limits.verdict_key), if any."""
        value = read_json(self.root / "verdicts.json", {})
        found = value.get(key) if isinstance(value, dict) else None
        return found if isinstance(found, dict) else None

    def record_verdict(self, key: str, record: Mapping[str, Any]) -> None:
        value = read_json(self.root / "verdicts.json", {})
        verdicts: dict[str, Any] = value if isinstance(value, dict) else {}
        verdicts[key] = dict(record)
        if len(verdicts) > _VERDICTS_KEPT:
            # Inputs that were replaced long ago: their verdicts are never asked for again.
            newest = sorted(verdicts, key=lambda k: verdicts[k].get("recorded", 0))
            verdicts = {k: verdicts[k] for k in newest[-_VERDICTS_KEPT:]}
        write_json(self.root / "verdicts.json", verdicts)

    def last_build(self) -> dict[str, Any]:
        value: dict[str, Any] = read_json(self.root / "last_build.json", {})
        return value

    def record_last_build(self, record: Mapping[str, Any]) -> None:
        write_json(self.root / "last_build.json", dict(record))

    def raise_high_water(self, version: int) -> None:
        """Record that version was published, so its number is never used again."""
        record = self.last_build()
        if version > high_water(self):
            self.record_last_build({**record, "high_water": version})

    def live(self) -> int | None:
        """The last version TensorFlow Serving reported AVAILABLE."""
        value = read_json(self.root / "live.json", {}).get("version")
        return value if isinstance(value, int) else None

    def record_live(self, version: int, seconds: float) -> None:
        write_json(self.root / "live.json", {"version": version, "seconds": round(seconds, 3)})

    def hold(self) -> str | None:
        value = read_json(self.root / "hold.json", {}).get("raw_fingerprint")
        return value if isinstance(value, str) else None

    def set_hold(self, raw_fingerprint: str | None) -> None:
        path = self.root / "hold.json"
        if raw_fingerprint is None:
            path.unlink(missing_ok=True)
        else:
            write_json(path, {"raw_fingerprint": raw_fingerprint})

    def collect_garbage(self, keep_sha256: Iterable[str]) -> list[str]:
        """Remove the blobs no accepted model or retained version needs, and the verdicts of
        their inputs; returns the blobs' names."""
        keep = set(keep_sha256)
        removed = []
        if self.blobs.is_dir():
            for blob in sorted(self.blobs.iterdir()):
                if blob.name.split(".", 1)[0] not in keep:
                    blob.unlink(missing_ok=True)
                    removed.append(blob.name)
        Packs(self.checks).prune(keep)
        return removed


def high_water(store: Store) -> int:
    """The highest version number ever published here, even one moved out since."""
    value = store.last_build().get("high_water", 0)
    return value if isinstance(value, int) else 0
