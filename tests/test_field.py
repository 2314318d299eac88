"""Real architectures and graphs frozen in the field, published and compared with their sources
through the Python loader and through the C++ loader TensorFlow Serving runs (tests/capi.py).

One set of graphs (tests/fieldgraphs.py, "small") is generated once, and one build publishes
it all: a Keras application, a text model with its lookup table, TF1 graphs with v1 while
loops (two GRUs, two tables filled by loops), a graph pinned to GPU, a graph whose loop body
holds an 8 MiB constant, and a graph with a GPU-only kernel, which alone is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfmerge import cli, exitcodes
from tfmerge.build.constants import SHARD_CONSTANT_BYTES
from tfmerge.build.probe import check_session_config

import capi
import fieldgraphs
from projectlib import Project, named, one, parse_events
from servinglib import (
    assert_close_across_settings,
    assert_outputs_match,
    highest,
    manifest,
    run_signatures,
    run_signatures_together,
)

pytestmark = pytest.mark.timeout(600)

MiB = 1 << 20
Models = dict[str, dict[str, Any]]


@pytest.fixture(scope="session")
def field_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Models]:
    root = tmp_path_factory.mktemp("field")
    models = fieldgraphs.write_set(root, "small")
    return root / "frozen", {m["signature"]: m for m in models}


def declaration(entry: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    declared = {k: entry[k] for k in ("signature", "frozen", "inputs", "outputs")}
    if "sample" in entry:
        declared["sample"] = entry["sample"]
    return declared | extra


def build(project: Project, models: list[dict[str, Any]], **top: Any) -> tuple[int, list[Any]]:
    """`tfmerge build` in this process, for module-scoped fixtures (no capsys there)."""
    project.configure(models, **top)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["build", "-c", str(project.config)])
    return code, parse_events(out.getvalue())


@dataclass(frozen=True)
class Published:
    version: Path
    code: int
    events: list[Any]
    feeds: dict[str, dict[str, np.ndarray]]
    #: What each source graph computes on feeds, run alone with the check's session settings.
    expected: dict[str, dict[str, np.ndarray]]
    inputs_bytes: int


def run_source(frozen: Path, entry: Mapping[str, Any], feeds: Mapping[str, Any]) -> Any:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((frozen / entry.get("unpinned", entry["frozen"])).read_bytes())
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph, config=check_session_config()) as session:
            for op in entry.get("init_ops", ()):
                session.run(op)
            fetches = dict(entry["outputs"])
            feed_dict = {entry["inputs"][key]: value for key, value in feeds.items()}
            return {k: np.asarray(v) for k, v in session.run(fetches, feed_dict).items()}


@pytest.fixture(scope="module")
def published(
    field_set: tuple[Path, Models], tmp_path_factory: pytest.TempPathFactory
) -> Published:
    frozen, models = field_set
    project = Project(tmp_path_factory.mktemp("field-project"))
    for entry in models.values():
        shutil.copyfile(frozen / entry["frozen"], project.frozen / entry["frozen"])
    code, events = build(project, [declaration(m) for m in models.values()])
    served = {name: m for name, m in models.items() if name != "cudnn"}
    feeds = {name: fieldgraphs.example_feeds(m, seed=1) for name, m in served.items()}
    expected = {name: run_source(frozen, m, feeds[name]) for name, m in served.items()}
    inputs = sum((frozen / m["frozen"]).stat().st_size for m in served.values())
    return Published(highest(project.serving), code, events, feeds, expected, inputs)


def test_every_graph_publishes_but_the_gpu_only_kernel_which_says_why(
    published: Published,
) -> None:
    assert published.code == exitcodes.FAILED, published.events
    assert one(published.events, "build_finished")["outcome"] == "published"
    refused = one(published.events, "model_rejected")
    assert (refused["signature"], refused["code"]) == ("cudnn", "no_kernel")
    assert "CudnnRNNV3" in refused["reason"]
    assert "GPU" in refused["reason"]
    assert "sample" not in refused["reason"]
    cleared = one(published.events, "devices_cleared")
    assert cleared["signature"] == "gpu_text"
    assert set(cleared["devices"]) == {fieldgraphs.GPU}
    assert set(manifest(published.version)["signatures"]) == set(published.feeds)


def test_the_python_loader_serves_what_the_sources_compute(published: Published) -> None:
    outputs = run_signatures(published.version, published.feeds, check_session_config())
    for name, expected in published.expected.items():
        assert_outputs_match(outputs[name], expected)


def test_the_cpp_loader_serves_what_the_sources_compute(published: Published) -> None:
    """The loader TensorFlow Serving runs, in a process without TensorFlow's Python package:
    with the check's settings the outputs are the sources' own; with the server's defaults
    (Grappler on) they are within the numeric contract. All signatures also run in one run."""
    settings = check_session_config().SerializeToString()
    answers = capi.run_in_child(
        capi.Request(
            str(published.version),
            configs=(settings, None),
            feeds=published.feeds,
            together=True,
        )
    )
    same, server, modules = answers
    assert modules == {"tensorflow_modules": []}
    assert set(same["signatures"]) == set(published.expected)
    for name, expected in published.expected.items():
        assert_outputs_match(same["outputs"][name], expected)
        assert_outputs_match(same["together"][name], expected)
        assert_close_across_settings(server["outputs"][name], expected)
        assert_close_across_settings(server["together"][name], expected)


def test_two_tf1_loop_graphs_run_in_one_session_run(published: Published) -> None:
    """Two dynamic_rnn GRUs and two tables whose initializers run v1 loops: every loop frame
    is its model's own, so one run (and the init op, which fills both tables) reaches them all."""
    loops = ("gru_a", "gru_b", "table_loop_a", "table_loop_b")
    feeds = {name: published.feeds[name] for name in loops}
    outputs = run_signatures_together(published.version, feeds, check_session_config())
    for name in loops:
        assert_outputs_match(outputs[name], published.expected[name])
    frames = _frame_names(published.version)
    assert frames == {
        f"{name}/{frame}"
        for name, frame in (
            ("gru_a", "rnn/while/while_context"),
            ("gru_b", "rnn/while/while_context"),
            ("table_loop_a", "while/while_context"),
            ("table_loop_b", "while/while_context"),
        )
    }


def _frame_names(version: Path) -> set[str]:
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((version / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    return {n.attr["frame_name"].s.decode() for n in graph.node if n.op == "Enter"}


def test_a_constant_in_a_loop_body_moves_out_of_saved_model_pb(published: Published) -> None:
    lifted = one(published.events, "function_constants_lifted")
    assert lifted["signature"] == "loop_const"
    assert [c["bytes"] for c in lifted["constants"]] == [8 * MiB]
    assert not named(published.events, "function_constants_kept")
    # Every graph of the set together: the 8 MiB are restored from variables/.
    assert (published.version / "saved_model.pb").stat().st_size < 1 * MiB


def test_no_byte_of_an_input_that_is_a_data_shard_is_stored_twice(published: Published) -> None:
    """The Keras model and the loop graph are their constants' data files; their constants of
    SHARD_CONSTANT_BYTES or more are restored from there, not stored in saved_model.pb too."""
    stats = manifest(published.version)["stats"]
    assert (stats["data_shards"], stats["inputs_linked"]) == (2, 2)
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((published.version / "saved_model.pb").read_bytes())
    inline = [
        node.name
        for node in saved.meta_graphs[0].graph_def.node
        if node.name.startswith(("mobilenet/", "loop_const/"))
        and len(node.attr["value"].tensor.tensor_content) >= SHARD_CONSTANT_BYTES
    ]
    assert inline == []
    # Stored twice still: a shard input's nodes without their constants, a few per cent of a
    # model this small (0.8% at full size, docs/benchmarks-field.md); before, also every
    # constant under 1 MiB, here 10% more.
    files = [p for p in published.version.rglob("*") if p.is_file()]
    model_bytes = sum(p.stat().st_size for p in files if "assets.extra" not in p.parts)
    assert model_bytes <= 1.04 * published.inputs_bytes


def test_keep_devices_keeps_the_pins_and_this_host_refuses_them(
    field_set: tuple[Path, Models], tmp_path: Path
) -> None:
    frozen, models = field_set
    project = Project(tmp_path)
    shutil.copyfile(frozen / "gpu_text.pb", project.frozen / "gpu_text.pb")
    pinned = declaration(models["gpu_text"], keep_devices=True)

    code, events = build(project, [pinned])

    assert code == exitcodes.FAILED
    refused = one(events, "model_rejected")
    assert refused["code"] == "device_unavailable"
    assert fieldgraphs.GPU in refused["reason"]
    assert "keep_devices" in refused["reason"]
    assert not named(events, "devices_cleared")

    # Kept for every model but this one, which clears them.
    code, events = build(project, [{**pinned, "keep_devices": False}], keep_devices=True)
    assert code == exitcodes.OK, events
    assert one(events, "devices_cleared")["signature"] == "gpu_text"


def test_inspect_reports_device_pins(
    field_set: tuple[Path, Models], capsys: pytest.CaptureFixture[str]
) -> None:
    frozen, _ = field_set
    assert cli.main(["inspect", str(frozen / "gpu_text.pb"), "--json"]) == exitcodes.OK
    devices = json.loads(capsys.readouterr().out)["devices"]
    assert list(devices) == [fieldgraphs.GPU]
    assert devices[fieldgraphs.GPU] > 50
    assert cli.main(["inspect", str(frozen / "gpu_text.pb")]) == exitcodes.OK
    assert (
        f"device pins (cleared when merged; keep_devices = true keeps them): {fieldgraphs.GPU}"
        in (capsys.readouterr().out)
    )
    assert cli.main(["inspect", str(frozen / "text_lstm.pb"), "--json"]) == exitcodes.OK
    assert json.loads(capsys.readouterr().out)["devices"] == {}
