"""The supervisor's memory whatever lands in frozen_dir.

A daemon (``warm = false``, ``discover = true``) serves one small graph. Then, one after the
other, these land in frozen_dir, and after each the daemon's next ``build_finished`` (or, for
files that are no inputs, a quiet wait) is awaited:

* a sidecar of 17 MiB beside the graph (``small.toml``);
* a digest file of 17 MiB (``small.pb.sha256``);
* 2,000 files of 1 KiB that are no inputs, and 2,000 dotfiles (upload leftovers);
* a graph of 17 MiB that does not parse (the worker reads it, never the supervisor).

The supervisor's resident memory (VmRSS) and its peak (VmHWM) are read from /proc after each;
its workers are separate processes and not counted. The supervisor must stay under 60 MiB.

Usage: python -m bench.hostile [--out PAGE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import proc_status, start_daemon, write_config
from bench.sets import ROOT

_BIG = 17 << 20
_TARGET_MIB = 60


def _sample(pid: int, what: str) -> dict[str, Any]:
    status = proc_status(pid)
    return {"after": what, "rss_mib": status["VmRSS"] / 2**20, "hwm_mib": status["VmHWM"] / 2**20}


def _land(daemon: Any, what: str, action: Any, *, builds: bool) -> dict[str, Any]:
    since = daemon.mark()
    action()
    if builds:
        daemon.wait_for("build_finished", since=since, timeout=300)
    else:
        time.sleep(5.0)  # past the quiet period: nothing here is an input
    return _sample(daemon.process.pid, what)


def measure(work: Path) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "tests"))
    import graphgen

    project = work / "project"
    config = write_config(project, warm=False)
    frozen = project / "frozen"
    graphgen.write_dense(frozen / "small.pb")
    daemon = start_daemon(config)
    samples = []
    try:
        daemon.wait_for("version_published", timeout=300)
        samples.append(_sample(daemon.process.pid, "start-up, one model published"))

        def big_file(name: str, line: bytes) -> None:
            (frozen / name).write_bytes(line * (_BIG // len(line)))

        def many() -> None:
            for index in range(2000):
                (frozen / f"junk-{index}.bin").write_bytes(os.urandom(1024))
                (frozen / f".upload-{index}.part").write_bytes(b"x" * 1024)

        steps = [
            ("a 17 MiB sidecar", lambda: big_file("small.toml", b"# padding padding\n"), True),
            (
                "a 17 MiB digest file",
                lambda: big_file("small.pb.sha256", b"0" * 64 + b"  small.pb\n"),
                True,
            ),
            ("4,000 files that are no inputs", many, False),
            ("a 17 MiB graph that does not parse", lambda: big_file("junk.pb", b"\xff"), True),
        ]
        for what, action, builds in steps:
            samples.append(_land(daemon, what, action, builds=builds))
    finally:
        daemon.stop()
    return samples


def page(samples: list[dict[str, Any]], command: str) -> str:
    peak = max(s["hwm_mib"] for s in samples)
    lines = [
        "# Benchmark: the supervisor's memory whatever lands in frozen_dir",
        "",
        (
            f"Measured with `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            " (bench/hostile.py says how). The supervisor's resident memory after each landing,"
            " and its peak so far; its build workers are other processes."
        ),
        "",
        "| after | resident (MiB) | peak so far (MiB) |",
        "|---|---:|---:|",
        *(f"| {s['after']} | {s['rss_mib']:.1f} | {s['hwm_mib']:.1f} |" for s in samples),
        "",
        (
            f"Target: under {_TARGET_MIB} MiB. Peak: {peak:.1f} MiB, "
            f"**{'met' if peak < _TARGET_MIB else 'missed'}**. Sidecars and digest files over "
            "`max_sidecar_bytes` (1 MiB) are refused from their size alone, unread; files that "
            "are no inputs are never opened; a graph is read by the worker, not the supervisor."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--out", type=Path, help="the page to write")
    parser.add_argument("--json", type=Path, help="the raw samples")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tfmerge-hostile-"))
    try:
        samples = measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m bench.hostile " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(samples))
    if args.json is not None:
        args.json.write_text(json.dumps(samples, indent=1) + "\n")
    if args.out is not None:
        args.out.write_text(page(samples, command.strip()))
    return 0 if max(s["hwm_mib"] for s in samples) < _TARGET_MIB else 1


if __name__ == "__main__":
    raise SystemExit(main())
