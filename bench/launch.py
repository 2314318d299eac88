"""Run one command as a child process; measure its wall time and its peak resident memory.

``os.wait4`` returns the resource usage of exactly the child it reaps; on Linux its
``ru_maxrss`` is the largest of the child's own peak and those of the descendants it waited
for (the tfmerge worker, ``cp`` under ``sh``), in KiB.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: TensorFlow's C++ start-up chatter is noise; every measured process gets the same setting.
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Measured:
    wall_seconds: float
    peak_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str
    #: User and system CPU of the child and of the descendants it waited for: what the work
    #: cost, whatever else the host was running meanwhile.
    cpu_seconds: float = 0.0


class CommandFailed(Exception):
    def __init__(self, command: Sequence[str], measured: Measured) -> None:
        tail = (measured.stderr or measured.stdout)[-3000:]
        super().__init__(f"{' '.join(command)} exited {measured.returncode}:\n{tail}")
        self.measured = measured


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # A systemd watchdog or notify socket inherited from the caller must not reach a daemon.
    inherited = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    return {**inherited, **QUIET_TF, **(extra or {})}


def measure(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 3600.0,
) -> Measured:
    """Run command to completion and reap it with wait4.

    Output goes to temporary files rather than pipes, so that nobody has to read it while
    the child runs.
    """
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        started = time.monotonic()
        process = subprocess.Popen(
            list(command), cwd=cwd, env=environment(env), stdout=out_file, stderr=err_file
        )
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            killer.cancel()
        wall = time.monotonic() - started
        # Tell Popen the child is reaped, so that it never waits for it again.
        process.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        stdout = out_file.read().decode(errors="replace")
        stderr = err_file.read().decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    measured = Measured(wall, usage.ru_maxrss * 1024, process.returncode, stdout, stderr, cpu)
    if check and measured.returncode != 0:
        raise CommandFailed(command, measured)
    return measured
