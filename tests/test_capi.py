"""tests/capi.py, the C API loader the other tests use: it reads what TensorFlow writes, and
a published version answers through it as through TensorFlow's Python loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tfmerge import cli, exitcodes

import capi
import graphgen
from projectlib import Project, model_entry
from servinglib import assert_outputs_match, highest, run_signatures

pytestmark = pytest.mark.timeout(300)


def test_config_proto_is_what_tensorflow_serialises() -> None:
    from tensorflow.core.protobuf import config_pb2

    proto = config_pb2.ConfigProto()
    proto.graph_options.optimizer_options.opt_level = config_pb2.OptimizerOptions.L0
    proto.graph_options.rewrite_options.disable_meta_optimizer = True
    assert capi.config_proto(grappler=False, graph_opts=False) == proto.SerializeToString()
    assert capi.config_proto() == b""


def test_signatures_are_read_as_tensorflow_wrote_them() -> None:
    from tensorflow.core.protobuf import meta_graph_pb2

    meta = meta_graph_pb2.MetaGraphDef()
    meta.graph_def.node.add(name="x", op="Placeholder")
    signature = meta.signature_def["scores"]
    signature.method_name = "tensorflow/serving/predict"
    image = signature.inputs["image"]
    image.name, image.dtype = "m/image:0", 1
    for size in (-1, 32, 3):
        image.tensor_shape.dim.add(size=size)
    words = signature.inputs["words"]
    words.name, words.dtype = "m/words:0", 7
    words.tensor_shape.unknown_rank = True
    scalar = signature.outputs["count"]
    scalar.name, scalar.dtype = "m/count:1", 9
    scalar.tensor_shape.SetInParent()

    parsed = capi.parse_signatures(meta.SerializeToString())

    assert parsed == {
        "scores": capi.Signature(
            "scores",
            {
                "image": capi.TensorSpec("m/image:0", 1, (-1, 32, 3)),
                "words": capi.TensorSpec("m/words:0", 7, None),
            },
            {"count": capi.TensorSpec("m/count:1", 9, ())},
            "tensorflow/serving/predict",
        )
    }


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("capi")
    project = Project(root / "project")
    dense = graphgen.write_dense(root / "dense.pb", seed=4)
    table = graphgen.write_table_model(root / "table.pb")
    project.add(dense, "dense.pb")
    project.add(table, "table.pb")
    project.configure(
        [model_entry("dense", "dense.pb", dense), model_entry("table", "table.pb", table)]
    )
    assert cli.main(["build", "-c", str(project.config)]) == exitcodes.OK
    return highest(project.serving)


def test_a_version_answers_through_the_c_api_as_through_python(version: Path) -> None:
    """Same settings (TensorFlow's defaults) on both sides: the same bytes, strings with
    trailing NULs and empty batches included, one signature at a time or all in one run."""
    feeds = {
        "dense": {"x": np.array([[0.5] * 8, [-1.0] * 8], np.float32)},
        "table": {
            "words": np.array([b"fox\x00", b"the", b"", "jumps"], dtype=object),
            "weights": np.array([1.0, 2.0, 3.0, 0.5], np.float32),
        },
    }
    empty = {"table": {"words": np.array([], object), "weights": np.zeros(0, np.float32)}}

    answer, modules = capi.run_in_child(capi.Request(str(version), feeds=feeds, together=True))
    (on_empty, _) = capi.run_in_child(capi.Request(str(version), feeds=empty))

    assert modules == {"tensorflow_modules": []}
    assert answer["signatures"] == ["dense", "table"]
    python = run_signatures(version, feeds)
    for name in feeds:
        assert_outputs_match(answer["outputs"][name], python[name])
        assert_outputs_match(answer["together"][name], python[name])
    assert answer["outputs"]["table"]["tokens_upper"][0] == b"FOX\x00"
    assert on_empty["outputs"]["table"]["ids"].shape == (0,)
    assert answer["load_seconds"] > 0


def test_load_and_run_errors_are_tensorflows(version: Path, tmp_path: Path) -> None:
    with pytest.raises(capi.TFError) as missing:
        capi.run_in_child(capi.Request(str(tmp_path / "no-such-version")))
    assert missing.value.code_name == "NOT_FOUND"
    wrong = {"dense": {"x": np.zeros((1, 8), np.float64)}}
    with pytest.raises(capi.TFError) as mistyped:
        capi.run_in_child(capi.Request(str(version), feeds=wrong))
    assert mistyped.value.code_name == "INVALID_ARGUMENT"
    assert "double" in mistyped.value.message
