"""End to end with OpenSSH itself: ``scp`` over a loopback ``sshd`` into a running daemon.

A throwaway sshd (keys only, no PAM) listens on a free loopback port, with its keys and config
in a tmp folder. The real ``scp`` uploads into ``frozen_dir``: in SFTP mode (the default since
OpenSSH 9.0), which overwrites an existing file in place and cuts it to length only at the end,
throttled and killed half-way with the graph's digest sent first; then in the legacy protocol
with ``-p`` (``scp -O -p``), which sets the file's times after its last close.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tfmerge import exitcodes

import graphgen
from daemonlib import DaemonProcess
from graphgen import FrozenModel
from projectlib import Project
from servinglib import highest, manifest, versions

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not (SSHD.is_file() and SFTP_SERVER.is_file() and shutil.which("scp")),
        reason="sshd and scp are not installed (Debian packages openssh-server, openssh-client)",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="sshd needs root (privilege separation, logins as root)"
    ),
]


class Sshd:
    """sshd on 127.0.0.1:<a free port>, accepting one key for root; ended on close."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        for key in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)],
                check=True,
                timeout=60,
            )
        shutil.copyfile(folder / "client_key.pub", folder / "authorized_keys.root")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = folder / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
            f"PidFile {folder / 'sshd.pid'}\nAuthorizedKeysFile {folder}/authorized_keys.%u\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"PermitRootLogin prohibit-password\nSubsystem sftp {SFTP_SERVER}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation folder
        with (folder / "sshd.log").open("wb") as log:
            self.process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 30
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text()}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def scp(self, *args: str, target: Path) -> list[str]:
        """An scp command that sends to root@127.0.0.1:target."""
        options = [
            *("-i", str(self.folder / "client_key"), "-P", str(self.port)),
            *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
            *("-o", "BatchMode=yes", "-o", "LogLevel=ERROR"),
        ]
        return ["scp", *options, *args, f"root@127.0.0.1:{target}"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path / "sshd")
    yield server
    server.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("scp-models")
    # About 1 MiB each: a throttled upload is still running when the test kills it.
    return {
        name: graphgen.write_dense(root / f"{name}.pb", seed=seed, in_dim=64, hidden=4096)
        for name, seed in (("old", 51), ("new", 52))
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scp_killed_half_way_is_refused_by_its_digest_and_scp_dash_p_publishes(
    tmp_path: Path, sshd: Sshd, models: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    project.configure(discover=True)
    text = project.config.read_text().replace("max_wait_seconds = 10.0", "max_wait_seconds = 30.0")
    project.config.write_text(text)
    good = project.add(models["old"], "good.pb")
    outbox = tmp_path / "outbox"  # the uploader's machine
    outbox.mkdir()
    shutil.copyfile(models["new"].path, outbox / "good.pb")
    with (outbox / "good.pb.sha256").open("w") as digest:
        subprocess.run(["sha256sum", "good.pb"], cwd=outbox, stdout=digest, check=True)
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()
        assert sorted(versions(project.serving)) == [1]

        # SFTP mode, throttled to 400 Kbit/s, the digest first; the connection is lost.
        mark = daemon.mark()
        files = [str(outbox / "good.pb.sha256"), str(outbox / "good.pb")]
        upload = subprocess.Popen(sshd.scp("-l", "400", *files, target=project.frozen))
        try:
            held = daemon.wait_for("batch_held", since=mark)
            assert (held["file"], held["open_for_writing"]) == ("good.pb", True)
        finally:
            upload.kill()
            upload.wait(timeout=60)
        # The build of the batch that holds the torn file (the digest may have had its own).
        settled = daemon.wait_for(
            "batch_settled", since=mark, where=lambda e: "good.pb" in e["paths"]
        )
        after = daemon.events.index(settled)
        rejected = daemon.wait_for("model_rejected", since=after)
        assert (rejected["file"], rejected["code"]) == ("good.pb", "digest_mismatch")
        assert rejected["declared_sha256"] == sha256(models["new"].path)
        finished = daemon.wait_for("build_finished", since=after)
        assert (finished["outcome"], finished["kept"]) == ("unchanged", ["good"])
        # In place: new bytes first, old ones after, the old length. It would have parsed.
        old, new, torn = (p.read_bytes() for p in (models["old"].path, models["new"].path, good))
        assert len(torn) == len(old)
        assert torn[:4096] == new[:4096]
        assert torn != new
        assert sorted(versions(project.serving)) == [1]
        assert {s["file"]: s["sha256"] for s in manifest(highest(project.serving))["sources"]} == {
            "good.pb": sha256(models["old"].path)
        }

        # The legacy protocol with -p: times set after the close hold nothing.
        mark = daemon.mark()
        sent = subprocess.run(
            sshd.scp("-O", "-p", str(outbox / "good.pb"), target=project.frozen),
            check=False,
            timeout=120,
        )
        assert sent.returncode == 0
        finished = daemon.wait_for(
            "build_finished", since=mark, where=lambda e: e["outcome"] == "published"
        )
        assert finished["updated"] == ["good"]
        assert [e["reason"] for e in daemon.named("batch_settled", mark)] == ["settled"]
        assert {s["file"]: s["sha256"] for s in manifest(highest(project.serving))["sources"]} == {
            "good.pb": sha256(models["new"].path)
        }
        assert daemon.stop() == exitcodes.OK
