"""Taking inputs from frozen_dir: one open without links, a read lease, identity, bounds.

No TensorFlow here: real files, real FIFOs and links, and real writer processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tfmerge import config as config_module
from tfmerge import snapshot, specs
from tfmerge.config import ConfigError
from tfmerge.inputs import FrozenDir, is_input_path
from tfmerge.models import ModelRejected
from uploaders import Uploader

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def frozen(tmp_path: Path) -> Path:
    folder = tmp_path / "frozen"
    folder.mkdir()
    return folder


def copied(frozen: Path, relpath: str) -> tuple[bytes, snapshot.Taken]:
    """relpath taken as a build takes it: opened under frozen_dir, copied under a lease."""
    target = frozen.parent / "copy"
    with FrozenDir(frozen) as root, root.open(relpath, 1 << 30) as opened:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            taken = snapshot.copy(opened, fd)
        finally:
            os.close(fd)
    return target.read_bytes(), taken


def refusal(call: Callable[[], object]) -> ModelRejected:
    with pytest.raises(ModelRejected) as caught:
        call()
    return caught.value


# --- read leases: a file with a writer is not taken ----------------------------------------


def test_a_file_held_open_for_writing_by_another_process_is_not_taken(frozen: Path) -> None:
    (frozen / "m.pb").write_bytes(b"old bytes")
    with Uploader("hold", frozen / "m.pb") as writer:
        writer.wait_for("opened")
        assert refusal(lambda: copied(frozen, "m.pb")).code == "still_being_written"
        writer.finish()
    data, taken = copied(frozen, "m.pb")
    assert data == b"old bytes"
    assert taken.lease_problem is None  # root may lease any file: the kernel decided


def test_an_in_place_upload_half_way_is_not_taken_and_its_end_is(
    frozen: Path, tmp_path: Path
) -> None:
    (frozen / "m.pb").write_bytes(b"o" * 4000)
    (tmp_path / "new.pb").write_bytes(b"n" * 3000)
    with Uploader("inplace", frozen / "m.pb", tmp_path / "new.pb") as writer:
        writer.wait_for("opened")
        writer.wait_for("half")
        # New bytes, then old ones, and the old length: a file that may well parse.
        assert (frozen / "m.pb").read_bytes() == b"n" * 1500 + b"o" * 2500
        assert refusal(lambda: copied(frozen, "m.pb")).code == "still_being_written"
        writer.process.send_signal(19)  # SIGSTOP: a stalled upload is still an open writer
        try:
            assert refusal(lambda: copied(frozen, "m.pb")).code == "still_being_written"
        finally:
            writer.process.send_signal(18)  # SIGCONT
        writer.finish()
    assert copied(frozen, "m.pb")[0] == b"n" * 3000


def test_a_writer_arriving_during_the_copy_discards_it_and_waits_only_for_that(
    frozen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (frozen / "m.pb").write_bytes(b"x" * 5000)
    real_copy = os.copy_file_range
    writers: list[Uploader] = []

    def copy_while_a_writer_opens(source: int, target: int, count: int) -> int:
        if not writers:
            writers.append(Uploader("open", frozen / "m.pb"))
            deadline = time.monotonic() + 30
            # The writer's open is held by the kernel until the lease is released.
            while fcntl.fcntl(source, fcntl.F_GETLEASE) == fcntl.F_RDLCK:
                assert time.monotonic() < deadline, "the writer's open never broke the lease"
                time.sleep(0.01)
        return real_copy(source, target, count)

    monkeypatch.setattr(os, "copy_file_range", copy_while_a_writer_opens)
    try:
        rejected = refusal(lambda: copied(frozen, "m.pb"))
        assert rejected.code == "still_being_written"
        assert "while it was read" in rejected.reason
        # Released at once: the writer gets its file long before lease-break-time (45 s).
        writers[0].wait_for("opened")
        writers[0].wait_for("closed")
        assert writers[0].process.wait(timeout=30) == 0
    finally:
        for writer in writers:
            writer.close()


def test_without_cap_lease_the_identity_check_still_holds(frozen: Path) -> None:
    """A service that may not lease its uploaders' files (EACCES) is told, and still refuses a
    file whose identity changes; measured with the capability really dropped."""
    (frozen / "m.pb").write_bytes(b"bytes of another user")
    os.chown(frozen / "m.pb", 65534, 65534)
    script = (
        "from pathlib import Path; import os, sys\n"
        "from tfmerge import snapshot\n"
        "from tfmerge.inputs import FrozenDir\n"
        "snapshot.ignore_lease_breaks()\n"
        "with FrozenDir(Path(sys.argv[1])) as root, root.open('m.pb', 1000) as opened:\n"
        "    fd = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "    print(snapshot.copy(opened, fd).lease_problem)\n"
        "    os.utime(opened.fd, ns=(1, 1))\n"
        "    os.lseek(opened.fd, 0, 0)\n"
        "    try:\n"
        "        snapshot.copy(opened, fd)\n"
        "    except Exception as exc:\n"
        "        print(exc.code)\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-lease",
            "--bounding-set=-lease",
            sys.executable,
            "-c",
            script,
            str(frozen),
            str(frozen.parent / "copy"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["EACCES", "changed_while_read"]


# --- identity: a file that changes while it is read is not used -----------------------------


def _during_copy(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    real_copy = os.copy_file_range
    done: list[bool] = []

    def copy_and_change(source: int, target: int, count: int) -> int:
        moved = real_copy(source, target, count)
        if not done:
            done.append(True)
            change()
        return moved

    monkeypatch.setattr(os, "copy_file_range", copy_and_change)


def test_a_file_renamed_over_during_the_copy_is_changed_while_read(
    frozen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (frozen / "m.pb").write_bytes(b"first")
    (frozen / ".m.pb.tmp").write_bytes(b"second")  # rsync's temporary, renamed into place
    _during_copy(monkeypatch, lambda: (frozen / ".m.pb.tmp").rename(frozen / "m.pb"))
    rejected = refusal(lambda: copied(frozen, "m.pb"))
    assert rejected.code == "changed_while_read"
    assert "replaced it" in rejected.reason


def test_a_file_touched_during_the_copy_is_changed_while_read(
    frozen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (frozen / "m.pb").write_bytes(b"bytes")
    # scp -p sets the times without opening the file: no lease break, a new ctime.
    _during_copy(monkeypatch, lambda: os.utime(frozen / "m.pb", ns=(10**9, 10**9)))
    assert refusal(lambda: copied(frozen, "m.pb")).code == "changed_while_read"


# --- opening: never through a link, never blocking ------------------------------------------


def test_links_fifos_and_folders_are_refused_and_never_followed(
    frozen: Path, tmp_path: Path
) -> None:
    (tmp_path / "outside.pb").write_bytes(b"outside")
    (frozen / "inside.pb").write_bytes(b"inside")
    (frozen / "team").mkdir()
    (frozen / "team" / "kws.pb").write_bytes(b"kws")
    (frozen / "escape.pb").symlink_to(tmp_path / "outside.pb")
    (frozen / "alias.pb").symlink_to("inside.pb")
    (frozen / "linked").symlink_to(frozen / "team")
    (frozen / "away").symlink_to(tmp_path)
    os.mkfifo(frozen / "pipe.pb")
    (frozen / "folder.pb").mkdir()
    expected = {
        "escape.pb": "path_escapes",
        "alias.pb": "not_a_file",
        "linked/kws.pb": "not_a_file",
        "away/outside.pb": "path_escapes",
        "pipe.pb": "not_a_file",
        "folder.pb": "not_a_file",
        "../outside.pb": "path_escapes",
        "team/../../outside.pb": "path_escapes",
        "gone.pb": "missing_file",
    }
    with FrozenDir(frozen) as root:
        for relpath, code in expected.items():
            assert refusal(lambda r=relpath: root.open(r, 1000)).code == code, relpath  # type: ignore[misc]
            assert specs.check_path(frozen, relpath).code == code  # type: ignore[union-attr]
        assert "links are never followed" in refusal(lambda: root.open("alias.pb", 1000)).reason
        with root.open("team/kws.pb", 1000) as opened:
            assert os.read(opened.fd, 100) == b"kws"


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(frozen: Path) -> None:
    (frozen / "z.pb").write_bytes(b"graph")
    with FrozenDir(frozen) as root:
        root.check("z.pb", 1000)
        (frozen / "z.pb").unlink()
        os.mkfifo(frozen / "z.pb")  # no writer will ever come: a plain open would block
        rejected = refusal(lambda: root.open("z.pb", 1000))
    assert (rejected.code, rejected.reason) == ("not_a_file", "is not a regular file (a FIFO)")


def test_digest_files_are_inputs_but_other_sha256_files_are_not() -> None:
    assert is_input_path("model.pb.sha256")
    assert is_input_path("team/kws.pbtxt.sha256")
    assert not is_input_path("notes.sha256")
    assert not is_input_path(".model.pb.sha256.XyZ12")


# --- resolution: digests, bounded reads -----------------------------------------------------


def configured(tmp_path: Path, text: str = "") -> config_module.Config:
    path = tmp_path / "tfmerge.toml"
    path.write_text('frozen_dir = "frozen"\nserving_dir = "serving"\nstate_dir = "state"\n' + text)
    return config_module.load(path)


def sha256sum(folder: Path, name: str) -> None:
    """What the person runs: sha256sum's own output into NAME.sha256."""
    with (folder / f"{name}.sha256").open("w") as out:
        subprocess.run(["sha256sum", name], cwd=folder, stdout=out, check=True)


def test_a_digest_file_declares_its_graphs_digest_in_any_upload_order(
    tmp_path: Path, frozen: Path
) -> None:
    config = configured(tmp_path)
    (tmp_path / "m.pb").write_bytes(b"graph bytes")
    sha256sum(tmp_path, "m.pb")
    (frozen / "m.pb.sha256").write_bytes((tmp_path / "m.pb.sha256").read_bytes())
    waiting = specs.resolve(config)  # the digest first: it waits for its graph
    assert (waiting.specs, waiting.rejections) == ((), ())
    (frozen / "m.pb").write_bytes(b"graph bytes")
    (spec,) = specs.resolve(config).specs
    assert spec.declared_sha256 == (("m.pb.sha256", hashlib.sha256(b"graph bytes").hexdigest()),)
    before = specs.raw_fingerprint(config, specs.resolve(config))
    (frozen / "m.pb.sha256").write_text(f"{'0' * 64}  m.pb\n")
    assert specs.raw_fingerprint(config, specs.resolve(config)) != before


def test_a_digest_file_naming_another_file_refuses_its_graph(tmp_path: Path, frozen: Path) -> None:
    config = configured(tmp_path)
    (frozen / "m.pb").write_bytes(b"graph bytes")
    (frozen / "m.pb.sha256").write_text(f"{'a' * 64}  other.pb\n")
    resolution = specs.resolve(config)
    assert resolution.specs == ()
    (rejection,) = resolution.rejections
    assert (rejection.code, rejection.file, rejection.signature) == (
        "bad_digest_file",
        "m.pb.sha256",
        "m",
    )
    assert "'other.pb'" in rejection.reason
    assert resolution.refused_signatures == {"m"}  # its last accepted input keeps serving


def test_an_entry_may_declare_the_sha256_of_its_graph(tmp_path: Path, frozen: Path) -> None:
    digest = "AB" * 32
    (frozen / "m.pb").write_bytes(b"graph bytes")
    (frozen / "m.toml").write_text(
        f'[[models]]\nsignature = "m"\nsha256 = "{digest}"\n'
        'inputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
    )
    (spec,) = specs.resolve(configured(tmp_path)).specs
    assert spec.declared_sha256 == (("sidecar m.toml models[0]", digest.lower()),)
    (frozen / "m.toml").write_text(
        '[[models]]\nsignature = "m"\nsha256 = "abc"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
    )
    (rejection,) = specs.resolve(configured(tmp_path)).rejections
    assert rejection.code == "bad_sidecar"
    assert "64 hexadecimal digits" in rejection.reason


def test_config_keys_of_this_checking(tmp_path: Path) -> None:
    config = configured(tmp_path, "max_sidecar_bytes = 4096\nallow_interface_change = true\n")
    assert (config.max_sidecar_bytes, config.allow_interface_change) == (4096, True)
    assert configured(tmp_path).max_sidecar_bytes == 1 << 20
    with pytest.raises(ConfigError) as caught:
        configured(
            tmp_path,
            'max_sidecar_bytes = 0\n[[models]]\nsignature = "m"\nfrozen = "m.pb"\n'
            'sha256 = "xyz"\nallow_interface_change = "yes"\n'
            'inputs = { x = "x:0" }\noutputs = { y = "y:0" }\n',
        )
    keys = sorted(p.key for p in caught.value.problems)
    assert keys == [
        "max_sidecar_bytes",
        "models[0].allow_interface_change",
        "models[0].sha256",
    ]


def test_a_huge_sidecar_is_refused_unread(tmp_path: Path, frozen: Path) -> None:
    config = configured(tmp_path)
    (frozen / "m.pb").write_bytes(b"graph bytes")
    entry = '[[models]]\nsignature = "m"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
    with (frozen / "m.toml").open("w") as out:
        out.write(entry)
        out.write(("# " + "x" * 1022 + "\n") * (17 * 1024))  # 17 MiB of valid TOML
    (frozen / "n.pb").write_bytes(b"graph bytes")
    (frozen / "n.pb.sha256").write_bytes(b"0" * (2 << 20))
    rchar_before = _bytes_read()
    tracemalloc.start()
    try:
        resolution = specs.resolve(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    read = _bytes_read() - rchar_before
    by_code = {r.code: r for r in resolution.rejections}
    assert sorted(by_code) == ["bad_digest_file", "bad_sidecar"]
    sidecar = by_code["bad_sidecar"]
    assert sidecar.file == "m.toml"
    assert f"{(frozen / 'm.toml').stat().st_size} bytes is over max_sidecar_bytes" in sidecar.reason
    assert dict(sidecar.details)["size"] == (frozen / "m.toml").stat().st_size
    assert resolution.refused_files == {"m.pb"}  # what it served keeps serving
    assert by_code["bad_digest_file"].signature == "n"
    assert peak < 1 << 20, peak
    assert read < 1 << 20, read


def _bytes_read() -> int:
    """Bytes this process has read with read(2) and the like, from /proc/self/io."""
    text = Path("/proc/self/io").read_text()
    return int(next(line for line in text.splitlines() if line.startswith("rchar")).split()[1])


def test_a_sidecar_still_being_written_keeps_its_model(tmp_path: Path, frozen: Path) -> None:
    config = configured(tmp_path)
    (frozen / "m.pb").write_bytes(b"graph bytes")
    (frozen / "m.toml").write_text(
        '[[models]]\nsignature = "m"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
    )
    with Uploader("hold", frozen / "m.toml") as writer:
        writer.wait_for("opened")
        resolution = specs.resolve(config)
        writer.finish()
    assert [(r.code, r.file) for r in resolution.rejections] == [("still_being_written", "m.toml")]
    assert resolution.refused_files == {"m.pb"}
    assert resolution.specs == ()
    assert [s.signature for s in specs.resolve(config).specs] == ["m"]


MOUNTS_SCRIPT = """
set -e
cd "$1"
mkdir layer upper work frozen
mount -t tmpfs tmpfs layer
echo graph > layer/layer.pb
# frozen_dir on an overlay whose layers are on two file systems: its files do not have the
# overlay's st_dev, yet they are inside it.
mount -t overlay overlay -o lowerdir=layer,upperdir=upper,workdir=work frozen
mkdir frozen/mounted
mount -t tmpfs tmpfs frozen/mounted
echo other > frozen/mounted/inner.pb
"$2" -c '
import os
from pathlib import Path
from tfmerge.inputs import FrozenDir
from tfmerge.models import ModelRejected
print(os.stat("frozen").st_dev != os.stat("frozen/layer.pb").st_dev)
with FrozenDir(Path("frozen")) as root:
    for relpath in ("layer.pb", "mounted/inner.pb"):
        try:
            root.open(relpath, 100).close()
            print("ok")
        except ModelRejected as exc:
            print(exc.code)
'
"""


def test_a_mount_inside_frozen_dir_is_refused_and_an_overlay_is_not(tmp_path: Path) -> None:
    """Compared by mount, not st_dev: an overlay's files may have the st_dev of a layer."""
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace for this test (unshare: {probe.stderr.decode()[:200]})")
    result = subprocess.run(
        [
            *("unshare", "-m", "--propagation", "private", "sh", "-c", MOUNTS_SCRIPT, "sh"),
            str(tmp_path),
            sys.executable,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "ok", "path_escapes"]
