"""The machine a benchmark ran on, read without importing TensorFlow."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.sets import ROOT, WORK


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def _filesystem(path: Path) -> str:
    """The type of the mount holding path, as the kernel names it in /proc/self/mounts.

    (``stat -f`` reads the statfs magic number, which ext2, ext3 and ext4 share.)
    """
    target = path.resolve()
    best, kind = -1, "unknown"
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Spaces and other odd characters are written as octal escapes (\040).
        mount = Path(fields[1].encode().decode("unicode_escape"))
        if target.is_relative_to(mount) and len(mount.parts) > best:
            best, kind = len(mount.parts), fields[2]
    return kind


def describe() -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "daemon"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_bytes": _mem_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tensorflow": importlib.metadata.version("tensorflow"),
        "tfmerge": importlib.metadata.version("tfmerge"),
        "commit": commit + (" (daemon/ modified)" if dirty else ""),
        "filesystem": _filesystem(WORK),
        "load_start": os.getloadavg(),
    }
