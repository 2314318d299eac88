"""The service user leases uploads it does not own, inside the unit's sandbox.

The unit runs the daemon as its own user with one capability, ``CAP_LEASE``: Linux grants a
read lease on another user's file only with it, and a lease is how the daemon tells a file
still open for writing (an in-place ``scp``) from one at rest. Here the real daemon runs under
the unit's seccomp filters (loaded with libseccomp as in ``test_systemd_unit.py``), read-only
mounts, a /proc of its own and a network namespace of its own (``PrivateNetwork=yes``), as a
non-root user whose only capability is ``CAP_LEASE`` (ambient, inheritable and bounding), while
the uploads belong to another user. A file held open for writing by an uploader is not built,
and no lease is ever refused.
"""

from __future__ import annotations

import ctypes.util
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import test_systemd_unit as unit
from tfmerge import exitcodes
from uploaders import Uploader

import graphgen
from graphgen import FrozenModel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and other uids need root"),
    pytest.mark.skipif(
        unit.SYSTEMD_ANALYZE is None,
        reason="systemd-analyze is not installed (Debian package systemd)",
    ),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("unshare", "setpriv", "findmnt")),
        reason="unshare, setpriv and findmnt (Debian package util-linux) are needed",
    ),
    pytest.mark.skipif(
        ctypes.util.find_library("seccomp") is None,
        reason="libseccomp (Debian package libseccomp2) is needed to load the unit's filters",
    ),
]

CAP_LEASE = 28

# The unit's mounts (ProtectSystem=strict with ReadWritePaths=, ProcSubset=pid), then the
# service user with CAP_LEASE alone. The test's interpreter may live in a folder other users
# cannot enter (/root/.pyenv), where the unit's would be in /opt: a 0755 tmpfs is laid over
# that folder inside this namespace, with the interpreter's prefix bound back in.
_MOUNTS_SCRIPT = r"""
read_write="$1"; hidden="$2"; prefix="$3"; stash="$4"; uid="$5"; gid="$6"; shift 6
if [ -n "$hidden" ]; then
    mount --bind "$prefix" "$stash"
    mount -t tmpfs -o mode=0755 tmpfs "$hidden"
    mkdir -p "$prefix"
    mount --bind "$stash" "$prefix"
fi
if [ "$PROC_SUBSET" = pid ]; then
    mount -t proc -o subset=pid,hidepid=invisible proc /proc
fi
mount --bind "$read_write" "$read_write"
findmnt --raw --noheadings --output TARGET | sort -r | while read -r target; do
    case "$target" in
        /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|"$read_write"|"$read_write"/*) ;;
        *) mount -o remount,bind,ro "$target" ;;
    esac
done
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups \
    --inh-caps=-all,+lease --ambient-caps=+lease --bounding-set=-all,+lease \
    --no-new-privs "$@"
"""


def _free_ids(count: int) -> list[int]:
    """Ids that no user and no group has, for the service and its uploader."""
    found: list[int] = []
    for candidate in range(61000, 62000):
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
            continue
        except KeyError:
            found.append(candidate)
        if len(found) == count:
            return found
    pytest.fail("no free uid in 61000-61999")


def _hidden_folder(prefix: Path) -> Path | None:
    """The outermost folder on the way to prefix that other users cannot enter."""
    for folder in [*reversed(prefix.parents), prefix]:
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder every user may enter (pytest's own tmp folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="tfmerge-lease-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("lease-models")
    return {
        "old": graphgen.write_dense(root / "old.pb", seed=41),
        "new": graphgen.write_dense(root / "new.pb", seed=42),
    }


def _events(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _wait_for(
    process: subprocess.Popen[bytes], log: Path, what: str, where: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 240
    while True:
        for event in _events(log):
            if event.get("event") == what and where(event):
                return event
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def test_the_service_user_leases_uploads_it_does_not_own(
    base: Path, models: dict[str, FrozenModel]
) -> None:
    service, uploader = _free_ids(2)
    writable = base / "writable"  # the unit's one ReadWritePaths= root
    frozen, serving, state, scratch = (writable / n for n in ("frozen", "serving", "state", "tmp"))
    for directory, mode in ((frozen, 0o2770), (serving, 0o755), (state, 0o750), (scratch, 0o700)):
        directory.mkdir(parents=True)
        os.chown(directory, service, service)
        directory.chmod(mode)

    def upload(model: FrozenModel, name: str) -> Path:
        """A file the uploader owns, readable by the service's group (the setgid folder's)."""
        target = frozen / name
        shutil.copyfile(model.path, target)
        os.chown(target, uploader, service)
        target.chmod(0o640)
        return target

    upload(models["old"], "m.pb")
    upload(models["old"], "w.pb")
    config = base / "tfmerge.toml"  # read-only to the daemon, like /etc
    config.write_text(
        f"frozen_dir = {str(frozen)!r}\nserving_dir = {str(serving)!r}\n"
        f"state_dir = {str(state)!r}\ndiscover = true\n"
        '[watch]\nquiet_seconds = 0.3\nmax_wait_seconds = 3.0\n[log]\nformat = "json"\n'
    )
    spec = base / "spec.json"
    spec.write_text(json.dumps(unit._sandbox_spec(scratch / "probes.json")))
    prefix = Path(sys.base_prefix)
    hidden = _hidden_folder(prefix)
    stash = base / "stash"
    stash.mkdir()
    launch = "import sys, test_systemd_unit as t; t._exec_sandboxed(sys.argv[1], sys.argv[2:])"
    command = [
        *("unshare", "--mount", "--net", "--propagation", "private", "--"),
        *("sh", "-euc", _MOUNTS_SCRIPT, "sh", str(writable), str(hidden or ""), str(prefix)),
        *(str(stash), str(service), str(service)),
        *(sys.executable, "-c", launch, str(spec)),
        *(sys.executable, "-m", "tfmerge", "run", "-c", str(config)),
    ]
    env = unit._sandbox_environment(state, scratch)
    log = base / "daemon.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(process, log, "daemon_ready", lambda e: True)
        status = Path(f"/proc/{process.pid}/status").read_text()
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
        assert ids["Uid"][0] == str(service)
        assert int(ids["CapEff"][0], 16) == 1 << CAP_LEASE
        assert int(ids["CapBnd"][0], 16) == 1 << CAP_LEASE

        # An uploader overwrites w.pb in place and stalls; n.pb arrives meanwhile.
        with Uploader("inplace", frozen / "w.pb", models["new"].path) as writer:
            writer.wait_for("opened")
            writer.wait_for("half")
            upload(models["old"], "n.pb")
            built = _wait_for(process, log, "build_finished", lambda e: e.get("added") == ["n"])
            assert (built["outcome"], built["kept"]) == ("published", ["w"])
            writer.finish()
        updated = _wait_for(process, log, "build_finished", lambda e: e.get("updated") == ["w"])
        assert updated["outcome"] == "published"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == exitcodes.OK, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    events = _events(log)
    named = {
        name: [e for e in events if e.get("event") == name]
        for name in {e.get("event") for e in events}
    }
    assert named.get("input_lease_unavailable", []) == []
    assert named.get("lease_probe_unavailable", []) == []
    (held,) = named["batch_held"]
    assert (held["file"], held["open_for_writing"]) == ("w.pb", True)
    (refused,) = named["model_rejected"]
    assert (refused["file"], refused["code"]) == ("w.pb", "still_being_written")
    assert [e["event"] for e in events if e.get("level") == "error"] == []
    sources = {
        s["file"]: s["sha256"]
        for s in json.loads((serving / "3" / "assets.extra" / "tfmerge.json").read_text())[
            "sources"
        ]
    }
    assert sources["w.pb"] == hashlib.sha256(models["new"].path.read_bytes()).hexdigest()
    probes = json.loads((scratch / "probes.json").read_text())
    assert probes["packet_socket"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=AF_UNIX
    assert probes["write_venv"] == "EROFS"  # ProtectSystem=strict
