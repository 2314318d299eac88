"""The systemd unit and its sysusers/tmpfiles files, checked by systemd's own tools.

systemd-analyze verifies the unit inside a tmp root that holds the paths the unit
names, and rates its exposure. systemd-sysusers and systemd-tmpfiles build the
install layout inside a tmp root. Last, the real daemon (`tfmerge run`) publishes a
merge under the unit's own seccomp filters, read-only file system, /proc subset and
environment, set up with libseccomp and a mount namespace the way systemd 252 sets
them up: no running systemd is needed, so the check runs here and in CI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tfmerge import exitcodes
from tfmerge.folders import publish

from daemonlib import PATIENCE, NotifyListener

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "tfmerge.service"
NETWORK_DROP_IN = SYSTEMD_DIR / "tfmerge-network.conf"
SYSUSERS = SYSTEMD_DIR / "tfmerge.sysusers"
TMPFILES = SYSTEMD_DIR / "tfmerge.tmpfiles"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)

FROZEN_DIR = "/srv/tfmerge/frozen"
SERVING_DIR = "/srv/tfmerge/serving"
STATE_DIR = "/srv/tfmerge/state"
# The unit's one writable path: versions hard-link the inputs kept in the state folder, and a
# hard link cannot cross the mount each ReadWritePaths= entry is inside the unit.
WRITABLE_ROOT = "/srv/tfmerge"
SAMPLE_CONFIG = REPO / "config" / "etc" / "tfmerge.toml"
MAX_EXPOSURE = 1.0
# What the unit leaves exposed on purpose, each with the reason (systemd/README.md says the same).
ACCEPTED_EXPOSURES = {
    "AmbientCapabilities=": "CAP_LEASE: a read lease on uploads other users own",
    "CapabilityBoundingSet=~CAP_LEASE": "the same CAP_LEASE, and no other capability",
    "PrivateUsers=": "a capability counts only in the initial user namespace",
    "RestrictAddressFamilies=~AF_UNIX": "sd_notify and journald speak AF_UNIX",
    "UMask=": "TensorFlow Serving, another user, must read the published versions",
    "DeviceAllow=": "ProtectClock= adds char-rtc read access",
    "RootDirectory=/RootImage=": "the daemon runs from the host's virtualenv",
}
# With the network drop-in (sites that set [serving] rest_url or [metrics] listen).
NETWORK_MAX_EXPOSURE = 1.2
NETWORK_EXPOSURES = {
    "PrivateNetwork=": "TensorFlow Serving's REST port on localhost is to be polled",
    "IPAddressDeny=": "the allow list keeps localhost for that same port",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "[serving] rest_url and [metrics] listen, on localhost",
}


# ---------------------------------------------------------------- unit file reading


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) pairs; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


@cache
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def values(section: str, key: str) -> list[str]:
    return [v for k, v in unit()[section] if k == key]


def single(section: str, key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120, **kwargs)


# ---------------------------------------------------------------- systemd-analyze verify


def _verify_root(tmp_path: Path, unit_text: str) -> Path:
    """A tmp root holding the unit, the executables it names and systemd's own units.

    `--root=` makes verify resolve every path inside the root, so the unit is
    checked unchanged: the venv's entry point is a stub at its real path, the other
    executables (/bin/kill) are copied from the host, and the host's unit directory
    is copied so the default dependencies (sysinit.target, ...) load.
    """
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "tfmerge.service").write_text(unit_text)
    service = parse_unit(unit_text)["Service"]
    for key, value in service:
        if not key.startswith("Exec"):
            continue
        program = value.lstrip("-@:+!").split()[0]
        target = root / program.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if key == "ExecStart":
            target.write_text("#!/bin/sh\nexit 0\n")
            target.chmod(0o755)
        else:
            shutil.copy2(program, target)
    # /lib is a link to /usr/lib on merged-/usr systems: copy each real directory once.
    for host in {Path(d).resolve() for d in ("/usr/lib/systemd/system", "/lib/systemd/system")}:
        if host.is_dir():
            shutil.copytree(host, root / host.relative_to("/"), symlinks=True)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return run(
        [
            SYSTEMD_ANALYZE,
            "verify",
            f"--root={root}",
            "--man=no",
            "--generators=no",
            "/etc/systemd/system/tfmerge.service",
        ]
    )


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = _verify(_verify_root(tmp_path, UNIT.read_text()))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "tfmerge" in line] == []


@needs_systemd_analyze
def test_verify_in_that_root_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above would see a typo: verify warns (exit 0) and the test reads the output."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=bogus\nProtectClok=yes")
    result = _verify(_verify_root(tmp_path, broken))
    output = result.stdout + result.stderr
    assert "Failed to parse kill mode specification, ignoring: bogus" in output
    assert "Unknown key 'ProtectClok'" in output


# ---------------------------------------------------------------- systemd-analyze security


def _security(*options: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", *options, str(UNIT)])


@needs_systemd_analyze
def test_exposure_rating_is_at_most_one() -> None:
    result = _security()
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for tfmerge\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    # systemd-analyze's own gate agrees (its threshold is the level times ten).
    assert _security(f"--threshold={int(MAX_EXPOSURE * 10)}").returncode == 0


@needs_systemd_analyze
def test_only_the_accepted_exposures_remain() -> None:
    result = _security("--json=short")
    assert result.returncode == 0, result.stderr
    exposed = {item["name"] for item in json.loads(result.stdout) if item["exposure"]}
    assert exposed == set(ACCEPTED_EXPOSURES)


def _root_with_network_drop_in(tmp_path: Path) -> Path:
    root = _verify_root(tmp_path, UNIT.read_text())
    drop_ins = root / "etc/systemd/system/tfmerge.service.d"
    drop_ins.mkdir()
    shutil.copyfile(NETWORK_DROP_IN, drop_ins / "network.conf")
    return root


@needs_systemd_analyze
def test_the_network_drop_in_allows_ip_to_localhost_only(tmp_path: Path) -> None:
    root = _root_with_network_drop_in(tmp_path)
    verified = _verify(root)
    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    assert [line for line in output.splitlines() if "tfmerge" in line] == []
    assert SYSTEMD_ANALYZE is not None
    security = [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", f"--root={root}"]
    rated = run([*security, "tfmerge.service"])
    assert rated.returncode == 0, rated.stderr
    match = re.search(r"Overall exposure level for tfmerge\.service: (\d+\.\d+)", rated.stdout)
    assert match, rated.stdout
    assert float(match.group(1)) <= NETWORK_MAX_EXPOSURE, rated.stdout
    listed = run([*security, "--json=short", "tfmerge.service"])
    exposed = {item["name"] for item in json.loads(listed.stdout) if item["exposure"]}
    assert exposed == set(ACCEPTED_EXPOSURES) | set(NETWORK_EXPOSURES)
    drop_in = parse_unit(NETWORK_DROP_IN.read_text())["Service"]
    assert ("RestrictAddressFamilies", "") in drop_in  # clears the unit's list first
    assert ("IPAddressAllow", "localhost") in drop_in
    assert [k for k, _ in drop_in].count("IPAddressDeny") == 0  # the unit's deny=any stays


def test_every_drop_in_directive_says_why() -> None:
    previous = ""
    for number, raw in enumerate(NETWORK_DROP_IN.read_text().splitlines(), start=1):
        line = raw.strip()
        if "=" in line and not line.startswith("#"):
            assert previous.startswith("#"), f"line {number} has no comment above it: {line}"
        previous = line


# ---------------------------------------------------------------- what the daemon relies on


def test_daemon_contract_directives() -> None:
    assert single("Service", "Type") == "notify"
    assert single("Service", "NotifyAccess") == "main"
    assert single("Service", "ExecStart") == (
        "/opt/tfmerge/venv/bin/tfmerge run -c /etc/tfmerge/tfmerge.toml"
    )
    assert single("Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert single("Service", "Restart") == "on-failure"
    prevent = " ".join(values("Service", "RestartPreventExitStatus")).split()
    assert str(exitcodes.CONFIG) in prevent
    assert str(exitcodes.FOLDER) in prevent
    assert single("Service", "KillMode") == "mixed"
    assert single("Service", "OOMPolicy") == "continue"
    assert values("Service", "StateDirectory") == []
    assert single("Service", "UMask") == "0022"
    assert single("Service", "User") == single("Service", "Group") == "tfmerge"
    read_write = " ".join(values("Service", "ReadWritePaths")).split()
    assert read_write == [WRITABLE_ROOT]
    sample = tomllib.loads(SAMPLE_CONFIG.read_text())
    folders = [sample[key] for key in ("frozen_dir", "serving_dir", "state_dir")]
    assert folders == [FROZEN_DIR, SERVING_DIR, STATE_DIR]
    assert single("Service", "ProtectSystem") == "strict"


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("key", "low", "high"), [("WatchdogSec", 5, 120), ("TimeoutStopSec", 10, 300)]
)
def test_time_bounds(key: str, low: int, high: int) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = run([SYSTEMD_ANALYZE, "timespan", single("Service", key)])
    assert result.returncode == 0, result.stderr
    micros = re.search(r"μs: (\d+)", result.stdout)
    assert micros, result.stdout
    assert low <= int(micros.group(1)) / 1e6 <= high


def test_write_execute_memory_is_denied_with_onednn_off() -> None:
    """oneDNN's JIT maps W+X memory: under MemoryDenyWriteExecute its convolutions fail."""
    assert single("Service", "MemoryDenyWriteExecute") == "yes"
    assert "TF_ENABLE_ONEDNN_OPTS=0" in " ".join(values("Service", "Environment")).split()


def test_denied_system_calls_fail_instead_of_killing() -> None:
    """OpenBLAS calls mbind() (in @resources): SIGSYS, the default action, would kill the worker."""
    assert any(v.startswith("~") for v in values("Service", "SystemCallFilter"))
    assert single("Service", "SystemCallErrorNumber") == "EPERM"


def test_every_directive_says_why() -> None:
    previous = ""
    for number, raw in enumerate(UNIT.read_text().splitlines(), start=1):
        line = raw.strip()
        if "=" in line and not line.startswith("#"):
            assert previous.startswith("#"), f"line {number} has no comment above it: {line}"
        previous = line


def test_unit_sysusers_and_tmpfiles_agree() -> None:
    user_line = _entries(SYSUSERS)
    assert [fields[:2] for fields in user_line] == [["u", single("Service", "User")]]
    assert user_line[0][4] == STATE_DIR
    owned = {fields[1]: fields for fields in _entries(TMPFILES)}
    for path in (FROZEN_DIR, SERVING_DIR, STATE_DIR):
        assert owned[path][3:5] == ["tfmerge", "tfmerge"]
    mounts = " ".join(values("Unit", "RequiresMountsFor")).split()
    assert mounts == [FROZEN_DIR, SERVING_DIR, STATE_DIR]


def _entries(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    # The GECOS field is quoted and may hold spaces.
    return [re.findall(r'"[^"]*"|\S+', line) for line in lines]


# ---------------------------------------------------------------- sysusers and tmpfiles


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed (Debian package systemd)",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must chown to the new user")
def test_sysusers_and_tmpfiles_build_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    made = run(["systemd-sysusers", f"--root={root}", str(SYSUSERS)])
    assert made.returncode == 0, made.stderr
    # It reports what it creates on stderr; anything else is a complaint about the file.
    assert [line for line in made.stderr.splitlines() if not line.startswith("Creating ")] == []
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    _, _, uid, gid, _, home, shell = passwd["tfmerge"]
    assert int(uid) < 1000, "a system user"
    assert (home, shell) == (STATE_DIR, "/usr/sbin/nologin")
    group = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    assert group["tfmerge"][2] == gid

    # tmpfiles resolves "tfmerge" through the root's /etc/passwd just written.
    created = run(["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)])
    assert (created.returncode, created.stderr) == (0, ""), created.stderr
    expected = {
        "srv/tfmerge": (0o755, 0, 0),
        "srv/tfmerge/frozen": (stat.S_ISGID | 0o770, int(uid), int(gid)),
        "srv/tfmerge/serving": (0o755, int(uid), int(gid)),
        "srv/tfmerge/state": (0o750, int(uid), int(gid)),
    }
    for relative, (mode, owner, owner_group) in expected.items():
        info = (root / relative).stat()
        assert stat.S_ISDIR(info.st_mode), relative
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, owner, owner_group)


# ---------------------------------------------------------------- the sandbox, for real
#
# systemd 252 turns these directives into seccomp filters (src/shared/seccomp-util.c):
# - MemoryDenyWriteExecute=: mmap() with PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect()
#   adding PROT_EXEC, shmat() with SHM_EXEC fail with EPERM;
# - RestrictAddressFamilies= (allow list): socket() of any other family fails with
#   EAFNOSUPPORT;
# - SystemCallFilter= (allow list, @default always in) with SystemCallErrorNumber=:
#   every other call fails with that errno (kills the process without it);
# - SystemCallArchitectures=native: a filter for the native ABI only, as below.
# ProtectSystem=strict, ReadWritePaths= and ProcSubset=/ProtectProc= are mounts in the
# unit's mount namespace; the test builds the same with unshare(1) and mount(8).

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_KILL_PROCESS = 0x80000000
_SCMP_CMP_EQ = 4
_SCMP_CMP_GT = 6
_SCMP_CMP_LT = 2
_SCMP_CMP_MASKED_EQ = 7
_SHM_EXEC = 0o100000


def _scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


class _Seccomp:
    """One libseccomp filter context, loaded into this process by load()."""

    def __init__(self, default_action: int) -> None:
        self.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.ctx = self.lib.seccomp_init(default_action)
        assert self.ctx, "seccomp_init failed"

    def rule(self, action: int, name: str, *conditions: _ArgCmp) -> None:
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a call of this architecture (mmap2, _llseek, ...): systemd skips it too
        array = (_ArgCmp * max(1, len(conditions)))(*conditions)
        result = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(conditions), array)
        if result < 0:
            raise OSError(-result, f"seccomp rule for {name}")

    def load(self) -> None:
        result = self.lib.seccomp_load(self.ctx)
        if result < 0:
            raise OSError(-result, "seccomp_load")


def _install_unit_filters(spec: dict[str, Any]) -> None:
    families = spec["address_families"]
    if families:
        only = _Seccomp(_SCMP_ACT_ALLOW)
        refuse = _scmp_act_errno(errno.EAFNOSUPPORT)
        only.rule(refuse, "socket", _ArgCmp(0, _SCMP_CMP_LT, min(families), 0))
        only.rule(refuse, "socket", _ArgCmp(0, _SCMP_CMP_GT, max(families), 0))
        for family in set(range(min(families), max(families))) - set(families):
            only.rule(refuse, "socket", _ArgCmp(0, _SCMP_CMP_EQ, family, 0))
        only.load()
    if spec["deny_write_execute"]:
        wx = _Seccomp(_SCMP_ACT_ALLOW)
        eperm = _scmp_act_errno(errno.EPERM)
        write_exec = mmap.PROT_WRITE | mmap.PROT_EXEC
        wx.rule(eperm, "mmap", _ArgCmp(2, _SCMP_CMP_MASKED_EQ, write_exec, write_exec))
        for name in ("mprotect", "pkey_mprotect"):
            wx.rule(eperm, name, _ArgCmp(2, _SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        wx.rule(eperm, "shmat", _ArgCmp(2, _SCMP_CMP_MASKED_EQ, _SHM_EXEC, _SHM_EXEC))
        wx.load()
    if spec["allowed_calls"] is not None:
        # Last: the allow list itself has no seccomp() in it.
        errno_number = spec["error_number"]
        default = _SCMP_ACT_KILL_PROCESS if errno_number is None else _scmp_act_errno(errno_number)
        allow = _Seccomp(default)
        for name in spec["allowed_calls"]:
            allow.rule(_SCMP_ACT_ALLOW, name)
        allow.load()


def _answer(attempt: Callable[[], object]) -> str:
    """ "allowed", or the name of the errno the sandbox answered with."""
    try:
        attempt()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error))
    return "allowed"


def _make_and_remove(directory: Path) -> None:
    directory.mkdir()
    directory.rmdir()


def _probe_sandbox() -> dict[str, str]:
    """What the sandbox refuses, tried for real: proof the emulation is in force."""
    wx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    return {
        "wx_mmap": _answer(lambda: mmap.mmap(-1, mmap.PAGESIZE, prot=wx).close()),
        "packet_socket": _answer(lambda: socket.socket(socket.AF_PACKET).close()),
        "sched_setaffinity": _answer(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
        "write_venv": _answer(lambda: _make_and_remove(Path(sys.prefix) / ".tfmerge-ro-probe")),
        "proc_cpuinfo": "visible" if Path("/proc/cpuinfo").exists() else "hidden",
    }


def _exec_sandboxed(spec_path: str, argv: list[str]) -> None:
    """Load the unit's filters into this process, record the probes, then exec the daemon.

    seccomp filters survive execve(2) and are inherited by every child, so the daemon
    and its TensorFlow worker run under them as they would under systemd.
    """
    spec = json.loads(Path(spec_path).read_text())
    _install_unit_filters(spec)
    Path(spec["probes_path"]).write_text(json.dumps(_probe_sandbox()))
    os.execv(argv[0], argv)  # noqa: S606 - argv is the test's own interpreter and arguments


def _write_conv_net(path: str) -> None:
    """A frozen conv net: Conv2D is the op whose oneDNN kernel needs W+X memory."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    rng = np.random.default_rng(7)
    kernel = tf.Variable(rng.standard_normal((3, 3, 3, 8)).astype(np.float32))
    dense = tf.Variable(rng.standard_normal((8 * 8 * 8, 5)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")])
    def classify(image: Any) -> Any:
        features = tf.nn.relu(tf.nn.conv2d(image, kernel, 1, "SAME"))
        pooled = tf.nn.max_pool2d(features, 2, 2, "VALID")
        return tf.nn.softmax(tf.reshape(pooled, [-1, 8 * 8 * 8]) @ dense)

    frozen = convert_variables_to_constants_v2(classify.get_concrete_function())
    Path(path).write_bytes(frozen.graph.as_graph_def().SerializeToString())


@cache
def _syscall_group(name: str) -> frozenset[str]:
    """The system calls of a systemd group such as @system-service, nested groups expanded."""
    assert SYSTEMD_ANALYZE is not None
    listing = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        calls |= _syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def _expand(entries: Iterable[str]) -> set[str]:
    calls: set[str] = set()
    for entry in entries:
        calls |= _syscall_group(entry) if entry.startswith("@") else {entry}
    return calls


def _allowed_calls() -> list[str] | None:
    """The allow list systemd builds from the unit's SystemCallFilter= lines, in order."""
    lines = values("Service", "SystemCallFilter")
    if not lines:
        return None
    assert not lines[0].startswith("~"), "the unit is meant to use an allow list"
    allowed = _expand(["@default"])
    for line in lines:
        if line.startswith("~"):
            allowed -= _expand(line[1:].split())
        else:
            allowed |= _expand(line.split())
    return sorted(allowed)


def _sandbox_spec(probes_path: Path) -> dict[str, Any]:
    families = [
        int(getattr(socket, name)) for name in single("Service", "RestrictAddressFamilies").split()
    ]
    error_name = values("Service", "SystemCallErrorNumber")
    return {
        "address_families": families,
        "deny_write_execute": single("Service", "MemoryDenyWriteExecute") == "yes",
        "allowed_calls": _allowed_calls(),
        "error_number": getattr(errno, error_name[0]) if error_name else None,
        "probes_path": str(probes_path),
    }


# ProtectSystem=strict with ReadWritePaths=: each writable path a bind mount of its own
# (space-separated in $1), every other mount read-only. ProcSubset=pid with
# ProtectProc=invisible: a /proc of its own. Then no capabilities.
_MOUNTS_SCRIPT = r"""
read_write="$1"; shift
if [ "$PROC_SUBSET" = pid ]; then
    mount -t proc -o subset=pid,hidepid=invisible proc /proc
fi
for path in $read_write; do mount --bind "$path" "$path"; done
findmnt --raw --noheadings --output TARGET | sort -r | while read -r target; do
    keep=
    for path in $read_write; do
        case "$target" in "$path"|"$path"/*) keep=1 ;; esac
    done
    case "$target" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) keep=1 ;; esac
    [ -n "$keep" ] || mount -o remount,bind,ro "$target"
done
exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "$@"
"""


def _python_path() -> dict[str, str]:
    """This module (run in child interpreters) and the package, installed or not."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "daemon")])}


def _sandbox_environment(state_dir: Path, tmp_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "PYTHON"))}
    for assignment in " ".join(values("Service", "Environment")).split():
        key, _, value = assignment.partition("=")
        env[key] = value
    env.update(_python_path())
    env["HOME"] = str(state_dir)  # the service user's home is the state folder (sysusers)
    env["TMPDIR"] = str(tmp_dir)  # PrivateTmp=: scratch space of its own
    env["PROC_SUBSET"] = single("Service", "ProcSubset")
    return env


def _wait_for_version(process: subprocess.Popen[bytes], version: Path, log: Path) -> None:
    deadline = time.monotonic() + PATIENCE
    while not version.is_dir():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {version.name} published:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


@pytest.mark.slow
@needs_systemd_analyze
@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace and a new /proc need root")
@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("unshare", "setpriv", "findmnt")),
    reason="unshare, setpriv and findmnt (Debian package util-linux) are needed",
)
@pytest.mark.skipif(
    ctypes.util.find_library("seccomp") is None,
    reason="libseccomp (Debian package libseccomp2) is needed to load the unit's filters",
)
@pytest.mark.timeout(400)
def test_the_daemon_runs_inside_the_unit_sandbox(tmp_path: Path) -> None:
    """`tfmerge run` publishes a merged conv net, a TF1 classifier and a model whose input is
    its own constants' data file under the unit's restrictions, in the shipped layout, where
    versions link the inputs their constants are read from."""
    import graphgen  # numpy: not for the child interpreters that import this module

    conv, classifier, big = (tmp_path / f"{n}.pb" for n in ("conv", "classifier", "big"))
    _write_conv_net(str(conv))
    graphgen.write_tf1_classifier(classifier)
    graphgen.write_big_dense(big, target_bytes=3 << 20)

    # The unit's paths and the sample config's folders, under a root of this test's own.
    root = tmp_path / "root"
    sample = tomllib.loads(SAMPLE_CONFIG.read_text())
    frozen, serving, state = (
        root / sample[key].lstrip("/") for key in ("frozen_dir", "serving_dir", "state_dir")
    )
    scratch = tmp_path / "tmp"  # PrivateTmp=: a mount of its own too
    for directory in (frozen, serving, state, scratch):
        directory.mkdir(parents=True)
    read_write = [root / p.lstrip("/") for p in values("Service", "ReadWritePaths")]
    config = tmp_path / "tfmerge.toml"  # outside: read-only to the daemon, like /etc
    config.write_text(
        f"frozen_dir = {str(frozen)!r}\nserving_dir = {str(serving)!r}\n"
        f"state_dir = {str(state)!r}\ndiscover = true\n"
        '[watch]\nquiet_seconds = 0.3\nmax_wait_seconds = 10.0\n[log]\nformat = "json"\n'
    )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_sandbox_spec(scratch / "probes.json")))

    address = f"@tfmerge-sandbox-test-{os.getpid()}"
    env = {**_sandbox_environment(state, scratch), "NOTIFY_SOCKET": address}
    env["WATCHDOG_USEC"] = "2000000"
    launch = "import sys, test_systemd_unit as t; t._exec_sandboxed(sys.argv[1], sys.argv[2:])"
    daemon = [sys.executable, "-m", "tfmerge", "run", "-c", str(config)]
    command = [
        *("unshare", "--mount", "--propagation", "private", "--"),
        *("sh", "-euc", _MOUNTS_SCRIPT, "sh", " ".join(map(str, [*read_write, scratch]))),
        *(sys.executable, "-c", launch, str(spec), *daemon),
    ]
    log = tmp_path / "daemon.log"
    with NotifyListener(address) as listener, log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)

        def alive() -> bool:
            return process.poll() is None

        try:
            listener.wait_for("READY=1", alive=alive)
            for source in (conv, classifier, big):
                shutil.copyfile(source, frozen / source.name)
            _wait_for_version(process, serving / "1", log)
            listener.wait_for("WATCHDOG=1", alive=alive)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=PATIENCE) == exitcodes.OK, log.read_text()[-4000:]
            listener.wait_for("STOPPING=1", alive=alive)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert json.loads((scratch / "probes.json").read_text()) == {
        "wx_mmap": "EPERM",  # MemoryDenyWriteExecute=yes
        "packet_socket": "EAFNOSUPPORT",  # RestrictAddressFamilies=AF_UNIX
        "sched_setaffinity": "EPERM",  # ~@resources with SystemCallErrorNumber=EPERM
        "write_venv": "EROFS",  # ProtectSystem=strict
        "proc_cpuinfo": "hidden",  # ProcSubset=pid
    }
    recorded = publish.read_manifest(serving / "1")
    assert sorted(recorded.get("signatures", {})) == ["big", "classifier", "conv"]
    # big.pb is its own constants' data file: hard-linked from the state folder, not copied.
    assert recorded["stats"]["inputs_linked"] >= 1
    assert recorded["stats"]["inputs_copied"] == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e.get("level") == "error"] == []
