"""A folder tfmerge writes that cannot be written, said as one named event. No TensorFlow here.

``state_dir`` under a regular file, a read-only ``state_dir`` or ``serving_dir``, a full or
failing disk while a version is staged or published: each surfaces as an OSError somewhere
in the code that writes. Integrity never depends on where it is raised (nothing is renamed
into place before it is whole); what a person needs is which folder, which path and which
errno, in one event, and an exit status that does not make systemd start the daemon again
and again on a problem only a person can fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from tfmerge.config import Config

#: What each errno means for a folder tfmerge writes, and what to do about it.
_MEANINGS = {
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "the path is a file, not a folder",
    errno.EROFS: "the file system is mounted read-only",
    errno.EACCES: "tfmerge's user may not write there",
    errno.EPERM: "tfmerge's user may not write there",
    errno.ENOSPC: "the file system is full",
    errno.EDQUOT: "tfmerge's user is over its disk quota",
    errno.EIO: "the disk failed to read or write",
}


class FolderFailed(Exception):
    """An OSError on one of the folders tfmerge writes; ``event`` names the folder."""

    def __init__(self, folder: str, path: str, error: OSError) -> None:
        self.event = f"{folder}_failed"
        self.folder = folder
        self.path = path
        self.errno = error.errno or 0
        meaning = _MEANINGS.get(self.errno, error.strerror or str(error))
        name = errno.errorcode.get(self.errno, str(self.errno))
        super().__init__(f"{folder} {path}: {meaning} ({name}: {error.strerror})")

    def fields(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "errno": self.errno,
            "error": errno.errorcode.get(self.errno, str(self.errno)),
            "reason": str(self),
        }


def config_folders(config: Config) -> dict[str, Path]:
    return {
        "state_dir": config.state_dir,
        "serving_dir": config.serving_dir,
        "frozen_dir": config.frozen_dir,
    }


def folder_failure(error: BaseException, folders: dict[str, Path]) -> FolderFailed | None:
    """The folder an OSError is about, when it names a path in (or above) one of them."""
    if not isinstance(error, OSError) or error.errno is None:
        return None
    for raw in (error.filename, error.filename2):
        if raw is None:
            continue
        path = Path(os.fsdecode(raw)).absolute()
        for folder, root in folders.items():
            # A path above the folder: creating the folder failed on one of its parents.
            if path.is_relative_to(root) or root.is_relative_to(path):
                return FolderFailed(folder, str(path), error)
    return None
