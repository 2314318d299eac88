"""Following a publish until TensorFlow Serving reports it live, against a local REST server.

The server answers ``GET /v1/models/NAME[/versions/N]`` with the documented
GetModelStatusResponse JSON, from a script of states per version.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tfmerge import cli, exitcodes

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import manifest, versions

pytestmark = pytest.mark.timeout(300)

OK = {"error_code": "OK", "error_message": ""}


class FakeServing:
    """Scripted model status: each version walks through its list of answers, then stays."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.script: dict[int, list[dict[str, Any] | None]] = {}
        self.seen: dict[int, list[dict[str, Any]]] = {}
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append(self.path)
                status, body = fake.answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-serving")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        prefix = f"/v1/models/{self.model}"
        if path == prefix:
            entries = [e for states in self.seen.values() for e in states[-1:]]
            return (
                (200, {"model_version_status": entries})
                if entries
                else (404, {"error": "no versions"})
            )
        if not path.startswith(prefix + "/versions/"):
            return 404, {"error": f"Servable not found for request: {path}"}
        version = int(path.rsplit("/", 1)[1])
        script = self.script.get(version, [None])
        entry = script.pop(0) if len(script) > 1 else script[0]
        if entry is None:
            return 404, {
                "error": f"Servable not found for request: Specific({self.model}, {version})"
            }
        state = {"version": str(version), **entry}
        self.seen.setdefault(version, []).append(state)
        return 200, {"model_version_status": [state]}

    def __enter__(self) -> FakeServing:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def fake_serving() -> Iterator[FakeServing]:
    with FakeServing("merged") as server:
        yield server


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[FrozenModel]:
    root = tmp_path_factory.mktemp("live-models")
    return [graphgen.write_dense(root / f"m{i}.pb", seed=60 + i) for i in range(2)]


def configure(project: Project, models: list[FrozenModel], server: FakeServing, count: int) -> None:
    entries = []
    for index in range(count):
        project.add(models[index], f"m{index}.pb")
        entries.append(model_entry(f"m{index}", f"m{index}.pb", models[index]))
    project.configure(entries, default_signature="m0")
    with project.config.open("a") as handle:
        handle.write(
            f'\n[serving]\nrest_url = "{server.url}"\nmodel_name = "merged"\nlive_timeout_seconds = 20\n'
        )


def test_a_failed_version_is_moved_out_and_the_last_live_one_republished(
    tmp_path: Path,
    models: list[FrozenModel],
    fake_serving: FakeServing,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = Project(tmp_path)
    fake_serving.script[1] = [
        None,
        {"state": "LOADING", "status": OK},
        {"state": "AVAILABLE", "status": OK},
    ]
    configure(project, models, fake_serving, 1)
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK, events
    live = one(events, "version_live")
    assert live["version"] == 1
    assert live["seconds"] > 0
    assert one(events, "build_finished")["live"] is True
    assert "/v1/models/merged/versions/1" in fake_serving.requests

    failure = {"error_code": "INVALID_ARGUMENT", "error_message": "Failed to load the SavedModel"}
    fake_serving.script[2] = [
        {"state": "LOADING", "status": OK},
        {"state": "END", "status": failure},
    ]
    fake_serving.script[3] = [{"state": "AVAILABLE", "status": OK}]
    configure(project, models, fake_serving, 2)
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    failed = one(events, "version_failed")
    assert failed["version"] == 2
    assert "Failed to load the SavedModel" in failed["reason"]
    assert one(events, "version_moved_out")["path"] == str(project.state / "failed" / "2")
    rolled = one(events, "rollback_published")
    assert (rolled["version"], rolled["restored"]) == (3, 1)
    assert [e["version"] for e in named(events, "version_live")] == [3]
    assert sorted(versions(project.serving)) == [1, 3]
    assert manifest(project.serving / "3")["rolled_back_from"] == 1
    assert (project.state / "failed" / "2" / "saved_model.pb").exists()
    assert one(events, "build_finished")["live"] is False

    # The inputs that failed are held: the daemon's start-up check does not rebuild them.
    assert cli.main(["status", "--json", "-c", str(project.config)]) == exitcodes.OK
    report = json.loads(capsys.readouterr().out)
    assert report["last_live"] == 3
    assert report["hold"] is not None
    states = {s["version"]: s["state"] for s in report["server"]["versions"]}
    assert states == {1: "AVAILABLE", 2: "END", 3: "AVAILABLE"}


def test_no_verdict_within_the_timeout_takes_nothing_away(
    tmp_path: Path,
    models: list[FrozenModel],
    fake_serving: FakeServing,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = Project(tmp_path)
    fake_serving.script[1] = [{"state": "LOADING", "status": OK}]
    configure(project, models, fake_serving, 1)
    project.config.write_text(
        project.config.read_text().replace("live_timeout_seconds = 20", "live_timeout_seconds = 1")
    )
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    unconfirmed = one(events, "version_unconfirmed")
    assert unconfirmed["state"] == "LOADING"
    assert "not AVAILABLE after" in unconfirmed["reason"]
    assert not named(events, "version_failed")
    assert not named(events, "version_moved_out")
    assert sorted(versions(project.serving)) == [1]


def test_status_says_when_the_server_is_unreachable(
    tmp_path: Path, models: list[FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models[0], "m0.pb")
    project.configure([model_entry("m0", "m0.pb", models[0])])
    with project.config.open("a") as handle:
        handle.write('\n[serving]\nrest_url = "http://127.0.0.1:9"\n')
    assert cli.main(["status", "--json", "-c", str(project.config)]) == exitcodes.OK
    report = json.loads(capsys.readouterr().out)
    assert "127.0.0.1:9" in report["server"]["error"]
