"""`tfmerge smoke`: a live server answers every published signature as its source graph does."""

from __future__ import annotations

import base64
import dataclasses
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tfmerge import cli, exitcodes
from tfmerge.build.predict import outputs_from_json, to_json
from tfmerge.build.smoke import ATTEMPTS, smoke
from tfmerge.config import Config
from tfmerge.config import load as load_config

import graphgen
from graphgen import FrozenModel
from grpcserving import (
    PredictionService,
    RestServer,
    ServedModel,
    ServingError,
    grpc_server,
    predict_json,
)
from projectlib import Project, model_entry

pytestmark = pytest.mark.timeout(600)

MODEL_NAME = "merged"
SIGNATURES = ["dense", "dense_probs", "flow", "table"]
# Every wait of one signature's retries: 0.5 s doubling, capped at 4 s.
ALL_WAITS = [0.5, 1.0, 2.0, 4.0][: ATTEMPTS - 1]


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, tf2_pair: tuple[FrozenModel, FrozenModel]
) -> Project:
    """One published version: a dense graph behind two signatures, a table with string
    input and output, and a TF2 graph of functions."""
    root = tmp_path_factory.mktemp("smoke")
    dense = graphgen.write_dense(root / "dense.pb", seed=0)
    table = graphgen.write_table_model(root / "table.pb")
    flow = tf2_pair[0]
    project = Project(root / "project")
    for model, name in ((dense, "dense.pb"), (table, "table.pb"), (flow, "flow.pb")):
        project.add(model, name)
    project.configure(
        [
            model_entry("dense", "dense.pb", dense, sample=dense.sample),
            # One output: TensorFlow Serving answers it over REST as a bare value.
            model_entry(
                "dense_probs", "dense.pb", dense, outputs={"probs": dense.outputs["probs"]}
            ),
            model_entry("table", "table.pb", table, sample=table.sample),
            # No sample: its probe is made from the input's type.
            model_entry("flow", "flow.pb", flow),
        ]
    )
    assert cli.main(["build", "-c", str(project.config)]) == exitcodes.OK
    return project


def configured(project: Project, tables: str = "", **serving: str) -> Config:
    """The project's config with a [serving] table and any further tables, loaded from the
    file as the command does."""
    base = project.config.read_text().split("\n[serving]\n")[0]
    settings = {"model_name": MODEL_NAME, **serving}
    table = "".join(f'{key} = "{value}"\n' for key, value in settings.items())
    project.config.write_text(f"{base}\n[serving]\n{table}{tables}")
    return load_config(project.config)


@pytest.fixture
def served(project: Project) -> Iterator[ServedModel]:
    model = ServedModel(project.serving, MODEL_NAME)
    try:
        yield model
    finally:
        model.close()


def run_smoke(config: Config, **options: Any) -> tuple[int, list[dict[str, Any]], list[float]]:
    waits: list[float] = []
    # Context bound for the whole command (via, version) is part of every event.
    with capture_logs(processors=[merge_contextvars]) as events:
        code = smoke(config, sleep=waits.append, **options)
    return code, events, waits


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def finished(events: list[dict[str, Any]]) -> dict[str, Any]:
    (event,) = named(events, "smoke_finished")
    return event


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on: bound, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_every_signature_answers_over_grpc_as_its_source(
    project: Project, served: ServedModel
) -> None:
    service = PredictionService(served)
    with grpc_server(service) as target:
        config = configured(project, grpc_target=target)
        code, events, waits = run_smoke(config)

    assert code == exitcodes.OK, events
    passed = named(events, "smoke_passed")
    assert [e["signature"] for e in passed] == SIGNATURES
    assert all(e["version"] == 1 and e["via"] == "grpc" and e["seconds"] >= 0 for e in passed)
    # The front end loads the version with TensorFlow's defaults, as the server does, so floats
    # may differ from the unoptimised source's in the last bits, never by more than the contract.
    for event in passed:
        assert 0.0 <= event["max_abs_diff"] <= 1e-3, event
        assert event["max_rel_diff"] >= 0.0, event
    assert finished(events) == {
        "event": "smoke_finished",
        "log_level": "info",
        "command": "smoke",
        "via": "grpc",
        "version": 1,
        "target": target,
        "passed": SIGNATURES,
        "failed": [],
    }
    assert waits == []
    assert not named(events, "smoke_failed")
    # One request per signature, for the exact version, under the configured model name.
    specs = [
        (r.model_spec.name, r.model_spec.signature_name, r.model_spec.version.value)
        for r in service.requests
    ]
    assert specs == [(MODEL_NAME, sig, 1) for sig in SIGNATURES]
    # The probe is the declared sample, strings as bytes.
    table_request = service.requests[SIGNATURES.index("table")]
    words = table_request.inputs["words"].string_val
    assert list(words) == [b"the", b"unknown-word", b"jumps"]


class WrongDense(PredictionService):  # type: ignore[misc]
    """A server whose `dense` signature is off by one in its float output."""

    def answer(
        self, version: int, signature: str, feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        outputs = super().answer(version, signature, feeds)
        if signature == "dense":
            outputs["probs"] = outputs["probs"] + np.float32(1.0)
        return outputs


def test_a_wrong_answer_fails_its_signature_and_names_the_output(
    project: Project, served: ServedModel
) -> None:
    with grpc_server(WrongDense(served)) as target:
        code, events, waits = run_smoke(configured(project), target=target)

    assert code == exitcodes.FAILED
    (failure,) = named(events, "smoke_failed")
    assert failure["signature"] == "dense"
    assert failure["version"] == 1
    assert failure["via"] == "grpc"
    assert failure["reason"].startswith(
        "output 'probs': 8 of 8 values differ from the source by more than rtol 0.001, atol 0.001"
        " (max abs difference 1, max rel difference "
    )
    assert failure["max_abs_diff"] == pytest.approx(1.0, abs=1e-6)
    assert failure["max_rel_diff"] > 1.0
    # The same graph behind another signature answers correctly: only `dense` is wrong.
    assert [e["signature"] for e in named(events, "smoke_passed")] == [
        "dense_probs",
        "flow",
        "table",
    ]
    assert finished(events)["failed"] == ["dense"]
    assert waits == []


class NearlyDense(PredictionService):  # type: ignore[misc]
    """A server whose `dense` probabilities are a few ulps off, as another kernel path gives."""

    def answer(
        self, version: int, signature: str, feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        outputs = super().answer(version, signature, feeds)
        if signature == "dense":
            outputs["probs"] = outputs["probs"] * np.float32(1 + 2e-6)
        return outputs


def test_floats_a_few_ulps_off_pass_within_the_configured_tolerance(
    project: Project, served: ServedModel
) -> None:
    with grpc_server(NearlyDense(served)) as target:
        code, events, _ = run_smoke(configured(project), target=target)
        assert code == exitcodes.OK, events
        passed = {e["signature"]: e for e in named(events, "smoke_passed")}
        assert 0 < passed["dense"]["max_abs_diff"] < 2e-6
        assert passed["dense"]["max_rel_diff"] == pytest.approx(2e-6, rel=0.1)

        exact = "[smoke.tolerance]\nfloat32 = { rtol = 0, atol = 0 }\n"
        code, events, _ = run_smoke(configured(project, exact), target=target)

    assert code == exitcodes.FAILED
    # Only `dense` is sure to fail: the other float outputs may or may not come out bit for bit
    # equal on this CPU.
    failure = {e["signature"]: e for e in named(events, "smoke_failed")}["dense"]
    assert "by more than rtol 0, atol 0" in failure["reason"]
    assert failure["max_rel_diff"] == pytest.approx(2e-6, rel=0.1)


def test_server_down_fails_every_signature_and_waits_only_once(project: Project) -> None:
    target = f"127.0.0.1:{closed_port()}"
    code, events, waits = run_smoke(configured(project, grpc_target=target))

    assert code == exitcodes.FAILED
    failures = named(events, "smoke_failed")
    assert [e["signature"] for e in failures] == SIGNATURES
    assert all(e["reason"].startswith("UNAVAILABLE: ") for e in failures), failures
    # The backoff is spent on the first signature; the others get one try each.
    assert waits == ALL_WAITS
    retries = named(events, "smoke_retry")
    assert [(e["signature"], e["attempt"], e["wait_seconds"]) for e in retries] == [
        ("dense", attempt, wait) for attempt, wait in enumerate(ALL_WAITS, start=1)
    ]
    assert finished(events)["passed"] == []
    assert finished(events)["failed"] == SIGNATURES


class LoadingFirst(PredictionService):  # type: ignore[misc]
    """A server that answers NOT_FOUND to its first calls, as while it loads a new version."""

    def __init__(self, model: ServedModel, loading_calls: int) -> None:
        super().__init__(model)
        self.loading_calls = loading_calls

    def answer(
        self, version: int, signature: str, feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if self.loading_calls > 0:
            self.loading_calls -= 1
            raise ServingError(
                "NOT_FOUND", f"Servable not found for request: Specific({MODEL_NAME}, {version})"
            )
        return super().answer(version, signature, feeds)


def test_a_version_still_loading_is_retried_with_backoff(
    project: Project, served: ServedModel
) -> None:
    with grpc_server(LoadingFirst(served, loading_calls=2)) as target:
        code, events, waits = run_smoke(configured(project, grpc_target=target))

    assert code == exitcodes.OK, events
    assert waits == [0.5, 1.0]
    retries = named(events, "smoke_retry")
    assert [(e["signature"], e["attempt"]) for e in retries] == [("dense", 1), ("dense", 2)]
    assert all("NOT_FOUND: Servable not found" in e["reason"] for e in retries)
    assert finished(events)["passed"] == SIGNATURES


def test_a_model_name_the_server_does_not_serve_is_reported(
    project: Project, served: ServedModel
) -> None:
    with grpc_server(PredictionService(served)) as target:
        config = configured(project, grpc_target=target, model_name="other")
        code, events, waits = run_smoke(config)

    assert code == exitcodes.FAILED
    reasons = {e["reason"] for e in named(events, "smoke_failed")}
    assert reasons == {"NOT_FOUND: Servable not found for request: Specific(other, 1)"}
    assert waits == ALL_WAITS


def test_every_signature_answers_over_rest_with_base64_strings(
    project: Project, served: ServedModel
) -> None:
    rest = RestServer(served)
    with rest.serving() as url:
        code, events, waits = run_smoke(configured(project, rest_url=url), via="rest")

    assert code == exitcodes.OK, events
    assert [e["signature"] for e in named(events, "smoke_passed")] == SIGNATURES
    assert all(e["via"] == "rest" for e in named(events, "smoke_passed"))
    assert waits == []
    paths = [path for path, _ in rest.requests]
    assert paths == [f"/v1/models/{MODEL_NAME}/versions/1:predict"] * len(SIGNATURES)
    bodies = {body["signature_name"]: body for _, body in rest.requests}
    words = [base64.b64decode(w["b64"]) for w in bodies["table"]["inputs"]["words"]]
    assert words == [b"the", b"unknown-word", b"jumps"]
    assert bodies["table"]["inputs"]["weights"] == [1.0, 2.0, 0.5]


def test_rest_server_down_is_retried_then_reported(project: Project) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    code, events, waits = run_smoke(configured(project), via="rest", target=url)

    assert code == exitcodes.FAILED
    failures = named(events, "smoke_failed")
    assert [e["signature"] for e in failures] == SIGNATURES
    assert all("Connection refused" in e["reason"] for e in failures), failures
    assert waits == ALL_WAITS


def test_a_source_missing_from_the_state_folder_fails_its_signatures(
    project: Project, served: ServedModel, tmp_path: Path
) -> None:
    config = dataclasses.replace(configured(project), state_dir=tmp_path / "empty-state")
    with grpc_server(PredictionService(served)) as target:
        code, events, _ = run_smoke(config, target=target)

    assert code == exitcodes.FAILED
    failures = named(events, "smoke_failed")
    assert [e["signature"] for e in failures] == SIGNATURES
    assert all("is gone from" in e["reason"] for e in failures)


@pytest.mark.parametrize(
    ("options", "serving", "reason"),
    [
        ({}, {}, "no server to ask: pass a target or set [serving] grpc_target"),
        ({"via": "rest"}, {}, "no server to ask: pass a target or set [serving] rest_url"),
        (
            {"via": "rest", "target": "127.0.0.1:8501"},
            {},
            "a REST target is an http:// or https:// URL",
        ),
        ({"via": "carrier-pigeon", "target": "x:1"}, {}, "via must be one of grpc, rest"),
        ({"version": 7}, {"grpc_target": "127.0.0.1:1"}, "version 7 is not in"),
    ],
)
def test_nothing_to_ask_is_a_usage_error(
    project: Project, options: dict[str, Any], serving: dict[str, str], reason: str
) -> None:
    code, events, waits = run_smoke(configured(project, **serving), **options)

    assert code == exitcodes.USAGE
    (event,) = events
    assert event["event"] == "smoke_not_run"
    assert reason in event["reason"]
    assert waits == []


def test_nothing_published_fails(tmp_path: Path) -> None:
    empty = Project(tmp_path)
    empty.configure()
    code, events, _ = run_smoke(configured(empty, grpc_target="127.0.0.1:1"))

    assert code == exitcodes.FAILED
    assert [e["event"] for e in events] == ["smoke_not_run"]
    assert events[0]["reason"].startswith("no version in ")


@pytest.mark.parametrize(
    "value",
    [
        np.array([[0.1, -2.5e-8, 3.4e38], [np.nan, np.inf, -0.0]], dtype=np.float32),
        np.array([1.0 / 3.0, 1e-300], dtype=np.float64),
        np.array([[-(2**62), 7]], dtype=np.int64),
        np.array([True, False]),
        np.array([b"plain", b"caf\xc3\xa9", b"\xff\xfe not utf-8"], dtype=object),
        np.zeros((0, 3), dtype=np.float32),
        np.float32(0.7),
    ],
    ids=["float32", "float64", "int64", "bool", "bytes", "empty", "scalar"],
)
@pytest.mark.parametrize("key", ["out", "out_bytes"])
def test_rest_answers_parse_back_to_the_same_array(value: Any, key: str) -> None:
    like = np.asarray(value)
    # Alone (a bare value) and beside another output (an object keyed by output).
    for outputs in ({key: like}, {key: like, "other": np.arange(2)}):
        parsed = outputs_from_json(predict_json(outputs), outputs)
        assert set(parsed) == set(outputs)
        for name, array in outputs.items():
            assert parsed[name].dtype == array.dtype
            assert parsed[name].shape == array.shape
            assert np.array_equal(parsed[name], array, equal_nan=array.dtype.kind == "f")


def test_string_inputs_are_sent_as_base64() -> None:
    sent = to_json(np.array([[b"a\xff"], [b""]], dtype=object))
    assert sent == [[{"b64": "Yf8="}], [{"b64": ""}]]
    assert to_json(np.array([1.5, 2.0], dtype=np.float32)) == [1.5, 2.0]
