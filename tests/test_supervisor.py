"""The supervisor never loads TensorFlow: not by import, not in the running daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import graphgen
from daemonlib import DaemonProcess
from projectlib import Project

SUPERVISOR_MODULES = [
    "tfmerge.cli",
    "tfmerge.service",
    "tfmerge.worker",
    "tfmerge.pipeline",
    "tfmerge.publish",
    "tfmerge.rollback",
    "tfmerge.store",
    "tfmerge.specs",
    "tfmerge.config",
    "tfmerge.debounce",
    "tfmerge.watch",
    "tfmerge.notify",
    "tfmerge.instance",
    "tfmerge.oppolicy",
    "tfmerge.logs",
    "tfmerge.results",
]


def test_supervisor_modules_do_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        f"for name in {SUPERVISOR_MODULES!r}:\n"
        "    __import__(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'numpy'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_running_daemon_has_no_tensorflow_mapped(tmp_path: Path) -> None:
    project = Project(tmp_path)
    graphgen.write_dense(project.frozen / "m.pb")
    project.configure(discover=True)
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()
        # A build has run: its result came back through the pipe and was unpickled here.
        assert daemon.named("build_finished")[0]["outcome"] == "published"
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
        assert "libtensorflow" not in maps
        assert "_pywrap_tensorflow" not in maps
