"""The warmup file and serving_default: read back with TensorFlow Serving's own protos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from tfmerge import exitcodes

import graphgen
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one
from servinglib import assert_outputs_match, highest, manifest, signature_names

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("warmup-models")
    return {
        "dense": graphgen.write_dense(root / "dense.pb", seed=5),
        "table": graphgen.write_table_model(root / "table.pb"),
    }


def read_warmup(version: Path) -> list[prediction_log_pb2.PredictionLog]:
    path = version / "assets.extra" / "tf_serving_warmup_requests"
    records = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        record = prediction_log_pb2.PredictionLog()
        record.ParseFromString(raw)
        records.append(record)
    return records


def test_warmup_requests_replay_through_the_loader(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["dense"], "dense.pb")
    project.add(models["table"], "table.pb")
    project.configure(
        [
            model_entry("dense", "dense.pb", models["dense"]),
            model_entry("lookup", "table.pb", models["table"], sample=models["table"].sample),
        ],
        default_signature="dense",
    )
    assert project.cli(capsys, "build")[0] == exitcodes.OK
    version = highest(project.serving)
    records = read_warmup(version)
    assert [r.predict_log.request.model_spec.signature_name for r in records] == ["dense", "lookup"]
    assert manifest(version)["stats"]["warmup_requests"] == 2

    sources = {"dense": models["dense"], "lookup": models["table"]}
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(version))
        for record in records:
            request = record.predict_log.request
            signature = meta.signature_def[request.model_spec.signature_name]
            inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
            feed = {signature.inputs[k].name: v for k, v in inputs.items()}
            fetch = {k: v.name for k, v in signature.outputs.items()}
            answer = session.run(fetch, feed_dict=feed)
            source = sources[request.model_spec.signature_name]
            expected = graphgen.run_frozen(
                source.path,
                {source.inputs[k]: v for k, v in inputs.items()},
                source.outputs,
                source.init_ops,
            )
            assert_outputs_match({k: np.asarray(v) for k, v in answer.items()}, expected)


def test_serving_default_alias_and_the_warning_without_it(
    tmp_path: Path, models: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(models["dense"], "dense.pb")
    entry = model_entry("dense", "dense.pb", models["dense"])
    project.configure([entry])
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK
    assert one(events, "no_default_signature")["signatures"] == ["dense"]
    assert "serving_default" not in signature_names(highest(project.serving))

    project.configure([entry], default_signature="dense")
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK
    assert not named(events, "no_default_signature")
    version = highest(project.serving)
    assert signature_names(version) == {"dense", "serving_default"}
    assert manifest(version)["stats"]["aliases"] == {"serving_default": "dense"}

    project.configure([entry], default_signature="nope")
    code, events = project.cli(capsys, "build")
    assert one(events, "default_signature_missing")["signature"] == "nope"
    assert one(events, "no_default_signature")
