"""End to end: the real daemon in a subprocess, uploads the way scp, rsync and sftp make them."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

from tfmerge import exitcodes

import graphgen
from daemonlib import PATIENCE, DaemonProcess, NotifyListener, wait_until
from graphgen import FrozenModel
from projectlib import Project, model_entry
from servinglib import assert_outputs_match, highest, manifest, run_signatures, versions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ABSL_PREFIX = re.compile(r"^([IWEF])\d{4} ")
ABSL_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("daemon-models")
    return {
        f"m{i}": graphgen.write_dense(root / f"m{i}.pb", seed=20 + i, in_dim=6, hidden=64)
        for i in range(6)
    }


#: The quiet period of tests in which several writes must make one batch: far longer than any
#: pause a busy machine puts between two writes of one upload, or into the daemon's reading
#: of their events.
GROUPING_QUIET_SECONDS = 1.0


def start(project: Project, **env: str) -> DaemonProcess:
    daemon = DaemonProcess(project.config, env=env)
    daemon.wait_ready()
    return daemon


def scp_like(source: Path, target: Path, chunks: int = 8) -> None:
    """Write in place, in several writes, then close: what scp does."""
    data = source.read_bytes()
    step = max(1, len(data) // chunks)
    with target.open("wb") as handle:
        for offset in range(0, len(data), step):
            handle.write(data[offset : offset + step])
            handle.flush()
            os.fsync(handle.fileno())


def assert_serves(version: Path, served: dict[str, FrozenModel]) -> None:
    feeds = {sig: {"x": np.asarray(m.sample["x"], dtype=np.float32)} for sig, m in served.items()}
    published = run_signatures(version, feeds)
    for sig, model in served.items():
        # Discovery serves only the sinks (`classes`), a declaration may serve more.
        outputs = {k: v for k, v in model.outputs.items() if k in published[sig]}
        assert outputs
        expected = graphgen.run_frozen(model.path, {model.inputs["x"]: feeds[sig]["x"]}, outputs)
        assert_outputs_match(published[sig], expected)


def test_uploads_like_scp_rsync_and_sftp_each_publish_one_version(
    tmp_path: Path, models: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    project.configure(discover=True, quiet_seconds=GROUPING_QUIET_SECONDS)
    project.add(models["m0"], "m0.pb")
    # TensorFlow's C++ runtime at its chattiest: its lines must come out as JSON events too.
    with start(project, TF_CPP_MIN_LOG_LEVEL="0") as daemon:
        assert sorted(versions(project.serving)) == [1]

        # scp: several files, each written in place in chunks.
        mark = daemon.mark()
        for name in ("m1", "m2"):
            scp_like(models[name].path, project.frozen / f"{name}.pb")
        daemon.wait_for("build_finished", since=mark, where=lambda e: e["outcome"] == "published")
        assert sorted(versions(project.serving)) == [1, 2]
        assert len(daemon.named("build_started", mark)) == 1
        assert_serves(highest(project.serving), {n: models[n] for n in ("m0", "m1", "m2")})

        # rsync: a dotted temporary name, renamed into place at the end.
        mark = daemon.mark()
        temporary = project.frozen / ".m3.pb.Xy12Ab"
        scp_like(models["m3"].path, temporary)
        temporary.rename(project.frozen / "m3.pb")
        daemon.wait_for("build_finished", since=mark, where=lambda e: e["outcome"] == "published")
        assert sorted(versions(project.serving)) == [1, 2, 3]
        assert len(daemon.named("build_started", mark)) == 1

        # sftp: write elsewhere in the folder, hard-link to the final name, delete the temporary.
        mark = daemon.mark()
        temporary = project.frozen / "m4.pb.filepart"
        scp_like(models["m4"].path, temporary)
        os.link(temporary, project.frozen / "m4.pb")
        temporary.unlink()
        finished = daemon.wait_for(
            "build_finished", since=mark, where=lambda e: e["outcome"] == "published"
        )
        assert finished["added"] == ["m4"]
        assert sorted(versions(project.serving)) == [1, 2, 3, 4]
        assert len(daemon.named("build_started", mark)) == 1
        assert_serves(highest(project.serving), {f"m{i}": models[f"m{i}"] for i in range(5)})
        assert daemon.stop() == exitcodes.OK
    assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]
    # Every line the daemon and its workers wrote, on stdout and on stderr, is a JSON event.
    assert daemon.not_json == []
    assert daemon.stderr_lines == []
    relayed = daemon.named("worker_output")
    assert relayed
    for event in relayed:
        prefix = ABSL_PREFIX.match(event["text"])
        if prefix:
            # A failed GPU probe is expected on a host without a GPU: info, whatever absl says.
            gpu_probe = "failed call to cuInit" in event["text"]
            assert event["level"] == ("info" if gpu_probe else ABSL_LEVELS[prefix[1]]), event


def test_an_upload_cut_off_half_way_is_refused_until_completed(
    tmp_path: Path, models: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    project.add(models["m0"], "m0.pb")
    project.configure([model_entry("m0", "m0.pb", models["m0"])])
    with start(project) as daemon:
        mark = daemon.mark()
        data = models["m1"].path.read_bytes()
        (project.frozen / "m0.pb").write_bytes(data[: len(data) // 2])
        rejected = daemon.wait_for("model_rejected", since=mark)
        assert rejected["file"] == "m0.pb"
        assert rejected["code"] in ("unparseable", "invalid_graph")
        daemon.wait_for("model_kept", since=mark, where=lambda e: e["signature"] == "m0")
        daemon.wait_for("build_finished", since=mark)
        assert sorted(versions(project.serving)) == [1]
        assert_serves(highest(project.serving), {"m0": models["m0"]})

        mark = daemon.mark()
        scp_like(models["m1"].path, project.frozen / "m0.pb")
        finished = daemon.wait_for(
            "build_finished", since=mark, where=lambda e: e["outcome"] == "published"
        )
        assert finished["updated"] == ["m0"]
        assert_serves(highest(project.serving), {"m0": models["m1"]})


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(
    tmp_path: Path, models: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    project.add(models["m0"], "m0.pb")
    project.add(models["m1"], "m1.pb")
    project.configure(
        [model_entry("m0", "m0.pb", models["m0"])], quiet_seconds=GROUPING_QUIET_SECONDS
    )
    with start(project) as daemon:
        assert set(manifest(highest(project.serving))["signatures"]) == {"m0"}
        good = project.config.read_text()
        mark = daemon.mark()
        project.config.write_text(good + "\nthis is not toml\n")
        daemon.process.send_signal(signal.SIGHUP)
        failed = daemon.wait_for("config_reload_failed", since=mark)
        assert failed["path"] == str(project.config)

        mark = daemon.mark()
        project.configure(
            [model_entry("m0", "m0.pb", models["m0"]), model_entry("m1", "m1.pb", models["m1"])],
            quiet_seconds=GROUPING_QUIET_SECONDS,
        )
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded", since=mark)
        finished = daemon.wait_for(
            "build_finished", since=mark, where=lambda e: e["outcome"] == "published"
        )
        assert finished["added"] == ["m1"]

        # Editing the file reloads too, once, after the writes have settled.
        mark = daemon.mark()
        project.add(models["m2"], "m2.pb")
        entries = [model_entry(f"m{i}", f"m{i}.pb", models[f"m{i}"]) for i in range(3)]
        project.configure(entries, quiet_seconds=GROUPING_QUIET_SECONDS)
        with project.config.open("a") as handle:
            handle.write("\n# touched in a second write\n")
        finished = daemon.wait_for(
            "build_finished", since=mark, where=lambda e: e["outcome"] == "published"
        )
        assert finished["added"] == ["m2"]
        assert len(daemon.named("config_changed", mark)) == 1
        assert len(daemon.named("config_reloaded", mark)) == 1
        assert daemon.stop() == exitcodes.OK


def test_second_instance_refuses_and_notify_protocol(
    tmp_path: Path, models: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    project.add(models["m0"], "m0.pb")
    project.configure(discover=True)
    address = str(tmp_path / "notify.sock")
    with NotifyListener(address) as listener:
        daemon = DaemonProcess(
            project.config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
        )
        with daemon:

            def alive() -> bool:
                return daemon.process.poll() is None

            ready = listener.wait_for("READY=1", alive=alive)
            assert "STATUS=idle: serving version 1" in ready
            before_ready = listener.messages[: listener.messages.index(ready)]
            assert any(m.startswith("STATUS=building") for m in before_ready)
            listener.wait_for("WATCHDOG=1", alive=alive)

            second = DaemonProcess(project.config)
            with second:
                assert second.process.wait(timeout=PATIENCE) == exitcodes.LOCKED
                refused = second.wait_for("another_instance")
                assert refused["holder_pid"] == daemon.process.pid
            assert daemon.stop() == exitcodes.OK
            listener.wait_for("STOPPING=1", alive=lambda: False)


def test_sigterm_during_a_build_leaves_no_staging(
    tmp_path: Path, models: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    project.add(models["m0"], "m0.pb")
    project.configure(discover=True)
    with start(project) as daemon:
        mark = daemon.mark()
        project.add(models["m1"], "m1.pb")
        daemon.wait_for("build_started", since=mark)
        wait_until(lambda: bool(daemon.worker_pids()))
        assert daemon.stop() == exitcodes.OK
        assert daemon.named("build_aborted", mark) or daemon.named("build_finished", mark)
    assert not [p for p in project.serving.iterdir() if p.name.startswith(".staging")]
    assert sorted(versions(project.serving)) in ([1], [1, 2])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_endpoint(tmp_path: Path, models: dict[str, FrozenModel]) -> None:
    project = Project(tmp_path)
    project.add(models["m0"], "m0.pb")
    project.configure(discover=True, quiet_seconds=GROUPING_QUIET_SECONDS)
    port = free_port()
    with project.config.open("a") as handle:
        handle.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    with start(project) as daemon:
        values = scrape(port)
        assert values['tfmerge_builds_total{outcome="published"}'] == 1
        assert values["tfmerge_published_version"] == 1
        assert values["tfmerge_signatures_served"] == 1
        assert values["tfmerge_rejected_inputs"] == 0
        assert values["tfmerge_last_publish_timestamp_seconds"] > 0

        mark = daemon.mark()
        scp_like(models["m1"].path, project.frozen / "m1.pb")
        (project.frozen / "broken.pb").write_bytes(b"\x0a\xff\xff")
        daemon.wait_for("build_finished", since=mark, where=lambda e: e["outcome"] == "published")
        # The supervisor counts a build just after it logged build_finished.
        wait_until(lambda: scrape(port)['tfmerge_builds_total{outcome="published"}'] == 2)
        values = scrape(port)
        assert values["tfmerge_published_version"] == 2
        assert values["tfmerge_signatures_served"] == 2
        assert values["tfmerge_rejected_inputs"] == 1
        assert values["tfmerge_time_to_live_seconds_count"] == 1
        assert daemon.stop() == exitcodes.OK
