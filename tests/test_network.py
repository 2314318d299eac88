"""IP settings the sandbox refuses are set aside with an event, not a crash or a long wait.

The refusal is real: the child process loads the seccomp filter systemd builds from
``RestrictAddressFamilies=AF_UNIX`` (the shipped unit without its network drop-in), with
libseccomp, the way ``tests/test_systemd_unit.py`` does.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tfmerge.config import load
from tfmerge.daemon import network

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import json, socket, sys
from pathlib import Path
import test_systemd_unit as unit
unit._install_unit_filters(
    {"address_families": [int(socket.AF_UNIX)], "deny_write_execute": False,
     "allowed_calls": None, "error_number": None, "probes_path": ""}
)
from structlog.testing import capture_logs
from tfmerge.config import load
from tfmerge.daemon import network
with capture_logs() as events:
    config = network.usable(load(Path(sys.argv[1])))
print(json.dumps({"events": events, "rest_url": config.serving.rest_url,
                  "listen": config.metrics.listen, "model_name": config.serving.model_name}))
"""


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "tfmerge.toml"
    path.write_text(
        'frozen_dir = "frozen"\nserving_dir = "serving"\nstate_dir = "state"\n'
        '[serving]\nrest_url = "http://127.0.0.1:8501"\nmodel_name = "kws"\n'
        '[metrics]\nlisten = "[::1]:9464"\n'
    )
    return path


@pytest.mark.skipif(
    ctypes.util.find_library("seccomp") is None,
    reason="libseccomp (Debian package libseccomp2) is needed to refuse IP sockets for real",
)
def test_without_ip_sockets_rest_url_and_metrics_are_set_aside_with_an_event(
    tmp_path: Path,
) -> None:
    path = os.pathsep.join([str(REPO / "tests"), str(REPO / "daemon")])
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(write_config(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["events"] == [
        {
            "keys": ["metrics.listen", "serving.rest_url"],
            "errno": ["EAFNOSUPPORT"],
            "reason": "this process may not open IP sockets (under systemd, install the "
            "unit's network drop-in: systemd/tfmerge-network.conf), so publishes are not "
            "followed and no metrics are served",
            "event": "network_unavailable",
            "log_level": "warning",
        }
    ]
    assert (answer["rest_url"], answer["listen"]) == (None, None)
    assert answer["model_name"] == "kws"  # everything else stays as configured


def test_where_ip_sockets_may_be_opened_the_config_stays_and_nothing_is_said(
    tmp_path: Path,
) -> None:
    config = load(write_config(tmp_path))
    with capture_logs() as events:
        assert network.usable(config) is config
    assert events == []
