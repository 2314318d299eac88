"""How long a batch waits for an upload, and the upload's time to live, for two daemons.

Two uploads that the order of inotify events alone misjudges, each over an existing graph
of the same architecture (about 1 MiB) in a fresh daemon:

* ``rsync --inplace -t``: writes in place, closes, then sets the file's times (an attribute
  change with no close after it);
* a slow in-place upload: a writer that ``pwrite``s the new bytes over the old ones at a
  fixed rate for longer than ``max_wait_seconds``, then cuts the file to length and closes it
  (what OpenSSH's scp does on a slow link).

For each: ``settled`` is from the end of the upload (the uploader's exit) to the
``batch_settled`` of the batch whose build publishes the new bytes; ``ttl`` is from the end
of the upload to that version's ``version_published``; ``builds`` counts the builds started
from the start of the upload to that publish (a build at ``max_wait`` while the file is still
open refuses it, and publishes nothing new). Wall-clock times, as bench/daemon.py takes them.

``--before TREE`` runs the same uploads against the package in TREE (a worktree of an earlier
commit: ``git worktree add /tmp/uploads-before <commit>``), with this checkout's interpreter.

Usage: python -m bench.uploads [--before TREE] [--max-wait 20] [--out PAGE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.daemon import QUIET_SECONDS, event_time, wait_warm_worker
from bench.launch import QUIET_TF
from bench.sets import ROOT

#: The slow writer's pace: 1 MiB takes about 26 s at this rate.
RATE_BYTES_PER_SECOND = 40 * 1024

_SLOW_WRITER = """
import os, sys, time
path, source, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
data = open(source, "rb").read()
fd = os.open(path, os.O_WRONLY)  # no O_TRUNC: new bytes over the old ones
chunk, started = 16384, time.monotonic()
for offset in range(0, len(data), chunk):
    os.pwrite(fd, data[offset : offset + chunk], offset)
    time.sleep(max(0.0, started + (offset + chunk) / rate - time.monotonic()))
os.ftruncate(fd, len(data))
os.close(fd)
"""


@dataclass(frozen=True)
class Result:
    tree: str
    upload: str
    upload_seconds: float
    settled_seconds: float
    ttl_seconds: float
    builds: int
    reasons: list[str]


def _models(work: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    import graphgen

    old = graphgen.write_dense(work / "old.pb", seed=61, in_dim=64, hidden=4096).path
    new = graphgen.write_dense(work / "new.pb", seed=62, in_dim=64, hidden=4096).path
    return old, new


def _config(project: Path, max_wait: float) -> Path:
    for name in ("frozen", "serving", "state"):
        (project / name).mkdir(parents=True)
    config = project / "tfmerge.toml"
    config.write_text(
        'frozen_dir = "frozen"\nserving_dir = "serving"\nstate_dir = "state"\ndiscover = true\n'
        f"[watch]\nquiet_seconds = {QUIET_SECONDS}\nmax_wait_seconds = {max_wait}\n"
        '[log]\nformat = "json"\nlevel = "info"\n'
    )
    return config


def _upload(kind: str, target: Path, new: Path) -> None:
    if kind == "rsync --inplace -t":
        subprocess.run(["rsync", "--inplace", "-t", str(new), str(target)], check=True)
    else:
        script = [sys.executable, "-c", _SLOW_WRITER, str(target), str(new)]
        subprocess.run([*script, str(RATE_BYTES_PER_SECOND)], check=True)


def run_one(
    tree: str, package: Path, kind: str, models: tuple[Path, Path], work: Path, max_wait: float
) -> Result:
    from daemonlib import DaemonProcess

    old, new = models
    project = work / f"{tree}-{kind.split(maxsplit=1)[0]}"
    shutil.rmtree(project, ignore_errors=True)
    config = _config(project, max_wait)
    target = project / "frozen" / "m.pb"
    shutil.copyfile(old, target)
    os.utime(new, (1_600_000_000, 1_600_000_000))  # rsync's quick check sees a change
    env = {**QUIET_TF, "PYTHONPATH": str(package)}
    with DaemonProcess(config, env=env) as daemon:
        daemon.wait_ready(timeout=300)
        wait_warm_worker(daemon)  # a build then costs what it costs, not a TensorFlow import
        mark = daemon.mark()
        started = time.time()
        _upload(kind, target, new)
        ended = time.time()
        finished = daemon.wait_for(
            "build_finished",
            since=mark,
            where=lambda e: e.get("outcome") == "published" and e.get("updated") == ["m"],
            timeout=max_wait * 3 + 120,
        )
        upto = daemon.events.index(finished)
        settled = [e for e in daemon.events[mark:upto] if e.get("event") == "batch_settled"]
        (published,) = [
            e for e in daemon.events[mark:upto] if e.get("event") == "version_published"
        ]
        builds = [e for e in daemon.events[mark:upto] if e.get("event") == "build_started"]
        daemon.stop()
    return Result(
        tree=tree,
        upload=kind,
        upload_seconds=round(ended - started, 2),
        settled_seconds=round(event_time(settled[-1]) - ended, 2),
        ttl_seconds=round(event_time(published) - ended, 2),
        builds=len(builds),
        reasons=[e["reason"] for e in settled],
    )


def _page(results: list[Result], max_wait: float, command: str) -> str:
    rows = "\n".join(
        f"| {r.upload} | {r.tree} | {r.upload_seconds:.1f} | {r.settled_seconds:.2f} | "
        f"{r.ttl_seconds:.2f} | {r.builds} | {', '.join(r.reasons)} |"
        for r in results
    )
    return f"""# Uploads: how long a batch waits, and the time to live

Two uploads over an existing graph of the same architecture (1.1 MiB), each in a fresh
daemon with `quiet_seconds = {QUIET_SECONDS}` and `max_wait_seconds = {max_wait}`:
`rsync --inplace -t` (writes in place, closes, then sets the times), and a slow in-place
upload (a writer that `pwrite`s the new bytes over the old ones at
{RATE_BYTES_PER_SECOND // 1024} KiB/s, longer than `max_wait_seconds`, then cuts the file to
length and closes it, as OpenSSH's scp does on a slow link). *settled*: from the end of the
upload to the `batch_settled` of the build that publishes the new bytes; *time to live*: to
that version's `version_published` (the warm worker has imported TensorFlow before each
upload starts); *builds*: started from the start of the upload to that publish. *events
only* is the daemon that told a file being written from the order of inotify events;
*kernel* asks the kernel (a read lease) whether the file is open for writing.

| upload | daemon | upload (s) | settled (s) | time to live (s) | builds | batch reasons |
|---|---|---:|---:|---:|---:|---|
{rows}

Regenerate with:

```sh
{command}
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.uploads", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--before", type=Path, help="a checkout of the earlier package to compare")
    parser.add_argument("--max-wait", type=float, default=20.0)
    parser.add_argument("--out", type=Path, help="write the Markdown page here")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    trees = [("kernel", ROOT / "daemon")]
    if args.before is not None:
        trees.insert(0, ("events only", args.before.resolve() / "daemon"))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tfmerge-bench-uploads-") as scratch:
        work = Path(scratch)
        models = _models(work)
        for kind in ("rsync --inplace -t", "slow in place"):
            for tree, package in trees:
                result = run_one(tree, package, kind, models, work, args.max_wait)
                print(json.dumps(asdict(result)), flush=True)
                results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if args.out is not None:
        before = ["--before", str(args.before)] if args.before is not None else []
        options = [*before, "--max-wait", f"{args.max_wait:g}", "--out", str(args.out)]
        command = "python -m bench.uploads " + " ".join(options)
        if args.before is not None:
            command = f"git worktree add {args.before} <an earlier commit>\n{command}"
        args.out.write_text(_page(results, args.max_wait, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
