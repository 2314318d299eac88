"""The fixture graphs are what the rest of the suite assumes they are."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphgen
from daemonlib import PATIENCE
from graphgen import FrozenModel
from servinglib import assert_close

REPO = Path(__file__).resolve().parent.parent


def _feeds(model: FrozenModel) -> dict[str, Any]:
    return {model.inputs[key]: value for key, value in model.sample.items()}


def _run_sample(model: FrozenModel) -> dict[str, np.ndarray]:
    return graphgen.run_frozen(model.path, _feeds(model), model.outputs, model.init_ops)


def _ops(path: Path) -> dict[str, str]:
    return {node.name: node.op for node in graphgen.load_graph_def(path).node}


def _const(path: Path, name: str) -> np.ndarray:
    import tensorflow as tf

    node = next(n for n in graphgen.load_graph_def(path).node if n.name == name)
    value: np.ndarray = tf.make_ndarray(node.attr["value"].tensor)
    return value


# --- dense ---------------------------------------------------------------------------


def test_dense_is_reproducible_and_seeded(tmp_path: Path) -> None:
    first = graphgen.write_dense(tmp_path / "a.pb", seed=7)
    again = graphgen.write_dense(tmp_path / "b.pb", seed=7)
    other = graphgen.write_dense(tmp_path / "c.pb", seed=8)

    assert first.path.read_bytes() == again.path.read_bytes()
    assert first.path.read_bytes() != other.path.read_bytes()


def test_dense_computes_a_softmax_classifier_from_its_constants(tmp_path: Path) -> None:
    model = graphgen.write_dense(tmp_path / "dense.pb", seed=3, in_dim=5, hidden=6, classes=3)

    result = _run_sample(model)

    x = np.asarray(model.sample["x"], dtype=np.float32)
    w1, b1, w2, b2 = (_const(model.path, f"dense/{n}") for n in ("w1", "b1", "w2", "b2"))
    assert w1.shape == (5, 6)
    assert w2.shape == (6, 3)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert_close(result["probs"], expected)
    assert result["classes"].dtype == np.int64
    np.testing.assert_array_equal(result["classes"], expected.argmax(axis=1))
    assert set(_ops(model.path).values()).isdisjoint({"VarHandleOp", "VariableV2"})


def test_dense_text_variant_is_the_same_graph_in_text_format(tmp_path: Path) -> None:
    from google.protobuf import text_format

    binary = graphgen.write_dense(tmp_path / "m.pb", seed=2)
    text = graphgen.write_dense(tmp_path / "m.pbtxt", seed=2, text=True)
    again = graphgen.write_dense(tmp_path / "again.pbtxt", seed=2, text=True)

    parsed = text_format.Parse(text.path.read_text(), type(graphgen.load_graph_def(binary.path))())
    assert parsed == graphgen.load_graph_def(binary.path)
    assert text.path.read_bytes() == again.path.read_bytes()
    np.testing.assert_array_equal(_run_sample(text)["probs"], _run_sample(binary)["probs"])


# --- lookup table --------------------------------------------------------------------


def test_table_model_keeps_its_initializer_in_the_frozen_graph(tmp_path: Path) -> None:
    model = graphgen.write_table_model(tmp_path / "table.pb")

    graph_def = graphgen.load_graph_def(model.path)
    ops = {node.name: node.op for node in graph_def.node}
    assert "HashTableV2" in ops.values()
    imports = [name for name, op in ops.items() if op == "LookupTableImportV2"]
    assert imports
    (init,) = (node for node in graph_def.node if node.name == graphgen.TABLE_INIT_OP)
    assert [f"^{name}" for name in imports] == list(init.input)
    assert model.init_ops == (graphgen.TABLE_INIT_OP,)


def test_table_model_fails_until_its_tables_are_initialized(tmp_path: Path) -> None:
    import tensorflow as tf

    model = graphgen.write_table_model(tmp_path / "table.pb")

    with pytest.raises(tf.errors.FailedPreconditionError, match="Table not initialized"):
        graphgen.run_frozen(model.path, _feeds(model), model.outputs)


def test_table_model_looks_words_up_once_initialized(tmp_path: Path) -> None:
    vocab = ("red", "green", "blue")
    model = graphgen.write_table_model(tmp_path / "table.pb", vocab=vocab, seed=4)
    words = ["blue", "mauve", "red", "green"]
    weights = [1.0, 2.0, 0.0, -1.0]

    result = graphgen.run_frozen(
        model.path,
        {"words:0": words, "weights:0": weights},
        model.outputs,
        model.init_ops,
    )

    np.testing.assert_array_equal(result["ids"], [2, -1, 0, 1])
    assert result["ids"].dtype == np.int64
    assert result["tokens_upper"].tolist() == [b"BLUE", b"MAUVE", b"RED", b"GREEN"]
    row_scores = _const(model.path, "row_scores")
    assert_close(result["scores"], np.float32(weights) * row_scores[[3, 0, 1, 2]])
    assert set(model.outputs) == {"ids", "scores", "tokens_upper"}
    assert set(model.inputs) == {"words", "weights"}


def test_table_model_is_reproducible_and_names_its_table_by_contents(tmp_path: Path) -> None:
    first = graphgen.write_table_model(tmp_path / "a.pb")
    again = graphgen.write_table_model(tmp_path / "b.pb")
    other = graphgen.write_table_model(tmp_path / "c.pb", vocab=("x", "y"))

    def shared_name(model: FrozenModel) -> bytes:
        graph_def = graphgen.load_graph_def(model.path)
        table = next(n for n in graph_def.node if n.op == "HashTableV2")
        return bytes(table.attr["shared_name"].s)

    assert first.path.read_bytes() == again.path.read_bytes()
    assert shared_name(first) != shared_name(other)


def test_table_model_refuses_a_repeated_word(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeats"):
        graphgen.write_table_model(tmp_path / "t.pb", vocab=("a", "b", "a"))


# --- TF1 classifier --------------------------------------------------------------------


def test_tf1_classifier_has_the_shape_of_a_tf1_frozen_graph(tmp_path: Path) -> None:
    model = graphgen.write_tf1_classifier(tmp_path / "classifier.pb")
    again = graphgen.write_tf1_classifier(tmp_path / "again.pb")

    graph_def = graphgen.load_graph_def(model.path)
    assert model.path.read_bytes() == again.path.read_bytes()
    assert set(_ops(model.path).values()) == {
        *("Placeholder", "Const", "Identity", "MatMul", "BiasAdd", "Relu"),
        *("Softmax", "TopKV2", "Squeeze"),
    }
    assert not graph_def.HasField("versions")
    functions = {f.signature.name for f in graph_def.library.function}
    assert len(functions) == 2
    called = {node.op for node in graph_def.node}
    called |= {n.op for f in graph_def.library.function for n in f.node_def}
    assert functions.isdisjoint(called), "the library's functions must be unreachable"


def test_tf1_classifier_answers_with_its_top_class(tmp_path: Path) -> None:
    model = graphgen.write_tf1_classifier(tmp_path / "classifier.pb", seed=5, in_dim=12)
    graph = {n.name: n for n in graphgen.load_graph_def(model.path).node}

    result = _run_sample(model)

    def const(name: str) -> np.ndarray:
        return _const(model.path, f"{graphgen.CLASSIFIER_SCOPE}/{name}")

    assert "_class" in graph[f"{graphgen.CLASSIFIER_SCOPE}/logits/weights/read"].attr
    x = np.asarray(model.sample["inputs"], dtype=np.float32)
    hidden = np.maximum(x @ const("fully_connected/weights") + const("fully_connected/biases"), 0)
    logits = hidden @ const("logits/weights") + const("logits/biases")
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert result["classes"].dtype == np.int32
    assert result["classes"].shape == (3,)
    assert_close(result["probs"], probs.max(axis=1))
    assert_close(result["classes"], probs.argmax(axis=1).astype(np.int32))


# --- graphs the op policy refuses ----------------------------------------------------


def test_file_reader_holds_a_readfile_node(tmp_path: Path) -> None:
    model = graphgen.write_file_reader(tmp_path / "reader.pb")
    again = graphgen.write_file_reader(tmp_path / "again.pb")

    assert "ReadFile" in _ops(model.path).values()
    assert model.path.read_bytes() == again.path.read_bytes()


@pytest.mark.skipif(
    not Path(graphgen.HOSTNAME_FILE).is_file(), reason=f"no {graphgen.HOSTNAME_FILE} to read"
)
def test_file_reader_reads_the_hostname_file_when_run(tmp_path: Path) -> None:
    model = graphgen.write_file_reader(tmp_path / "reader.pb")

    result = graphgen.run_frozen(model.path, {"x:0": [1.0, 2.0]}, model.outputs)

    size = len(Path(graphgen.HOSTNAME_FILE).read_bytes())
    np.testing.assert_array_equal(result["y"], [1.0 + size, 2.0 + size])


def test_py_func_graph_holds_a_pyfunc_node(tmp_path: Path) -> None:
    model = graphgen.write_py_func(tmp_path / "pyfunc.pb")
    again = graphgen.write_py_func(tmp_path / "again.pb")

    (node,) = (n for n in graphgen.load_graph_def(model.path).node if n.op == "PyFunc")
    assert node.attr["token"].s == graphgen.PY_FUNC_TOKEN.encode()
    assert model.path.read_bytes() == again.path.read_bytes()


# --- big dense -----------------------------------------------------------------------


def test_big_dense_weighs_its_target_and_runs(tmp_path: Path) -> None:
    target = 5_000_000
    model = graphgen.write_big_dense(tmp_path / "big.pb", target_bytes=target, seed=1)

    graph_def = graphgen.load_graph_def(model.path)
    weight_bytes = sum(
        len(node.attr["value"].tensor.tensor_content)
        for node in graph_def.node
        if node.op == "Const"
    )
    assert abs(weight_bytes - target) <= 0.1 * target
    assert abs(model.path.stat().st_size - target) <= 0.1 * target
    result = _run_sample(model)
    assert result["probs"].shape == (2, 4)
    np.testing.assert_allclose(result["probs"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(result["classes"], result["probs"].argmax(axis=1))


def test_big_dense_splits_weights_over_constants_all_reachable(tmp_path: Path) -> None:
    import tensorflow as tf

    model = graphgen.write_big_dense(tmp_path / "big.pb", target_bytes=150 * 2**20)

    graph_def = graphgen.load_graph_def(model.path)
    consts = [n for n in graph_def.node if n.op == "Const"]
    assert max(len(n.attr["value"].tensor.tensor_content) for n in consts) <= 64 * 2**20
    assert len(consts) >= 6
    needed = tf.compat.v1.graph_util.extract_sub_graph(graph_def, ["probs", "classes"])
    assert {n.name for n in needed.node} == {n.name for n in graph_def.node}


def test_big_dense_streamed_file_is_the_graphs_own_serialization(tmp_path: Path) -> None:
    model = graphgen.write_big_dense(tmp_path / "big.pb", target_bytes=1_000_000, seed=2)
    again = graphgen.write_big_dense(tmp_path / "again.pb", target_bytes=1_000_000, seed=2)

    data = model.path.read_bytes()
    assert graphgen.load_graph_def(model.path).SerializeToString(deterministic=True) == data
    assert again.path.read_bytes() == data


# --- TF2 control flow (children processes) -------------------------------------------


def _tf2_reference(x: np.ndarray, variant: int) -> tuple[np.ndarray, np.ndarray]:
    # The same arithmetic as the frozen graph, written out in numpy.
    shift = np.random.default_rng(variant).standard_normal(4).astype(np.float32)
    acc: np.ndarray = x.astype(np.float32)
    for _ in range(3 + variant):
        acc = np.tanh(acc * np.float32(0.5 + 0.1 * variant) + shift)
    y = acc * (2.0 + variant) if acc.sum() > 0 else acc - (1.0 + variant)
    return y, y.sum(axis=1)


@pytest.mark.slow
def test_tf2_pair_defines_the_same_function_names_with_different_bodies(
    tf2_pair: tuple[FrozenModel, FrozenModel],
) -> None:
    first, second = tf2_pair

    conflicts = graphgen.function_conflicts(first.path, second.path)

    assert any(name.startswith("while_body") for name in conflicts)
    assert any(name.startswith("cond_true") for name in conflicts)
    ops = set(_ops(first.path).values())
    assert "While" in ops
    assert ops & {"If", "StatelessIf"}


@pytest.mark.slow
def test_tf2_pair_cannot_be_imported_naively_into_one_graph(
    tf2_pair: tuple[FrozenModel, FrozenModel],
) -> None:
    import tensorflow as tf

    first, second = tf2_pair
    with tf.Graph().as_default():
        tf.graph_util.import_graph_def(graphgen.load_graph_def(first.path), name="first")
        with pytest.raises(ValueError, match=r"Cannot add function .* different function"):
            tf.graph_util.import_graph_def(graphgen.load_graph_def(second.path), name="second")


@pytest.mark.slow
def test_tf2_pair_graphs_compute_their_variant(
    tf2_pair: tuple[FrozenModel, FrozenModel],
) -> None:
    for variant, model in enumerate(tf2_pair):
        result = _run_sample(model)

        y, row_sum = _tf2_reference(np.asarray(model.sample["x"]), variant)
        assert_close(result["y"], y, "y")
        assert_close(result["row_sum"], row_sum, "row_sum")


@pytest.mark.slow
def test_tf2_graph_is_reproducible_in_a_fresh_process(
    tf2_pair: tuple[FrozenModel, FrozenModel], tmp_path: Path
) -> None:
    again = graphgen.write_tf2_control_flow(tmp_path / "again.pb", variant=0)

    assert again.path.read_bytes() == tf2_pair[0].path.read_bytes()


def test_tf2_writer_refuses_a_negative_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variant"):
        graphgen.write_tf2_control_flow(tmp_path / "m.pb", variant=-1)


# --- the shipped demo model ----------------------------------------------------------


@pytest.mark.slow
def test_demo_model_script_rewrites_the_shipped_files(tmp_path: Path) -> None:
    out = tmp_path / "demo.pb"

    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo_model.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=PATIENCE,
    )

    assert out.read_bytes() == (REPO / "frozen" / "demo.pb").read_bytes()
    assert out.with_suffix(".toml").read_bytes() == (REPO / "frozen" / "demo.toml").read_bytes()


def test_demo_sidecar_declares_the_demo_graph() -> None:
    sidecar = tomllib.loads((REPO / "frozen" / "demo.toml").read_text())
    (entry,) = sidecar["models"]
    model = FrozenModel(
        path=REPO / "frozen" / entry["frozen"],
        inputs=entry["inputs"],
        outputs=entry["outputs"],
        sample=entry["sample"],
    )

    result = _run_sample(model)

    assert entry["signature"] == "demo"
    assert model.path.stat().st_size < 8 * 1024
    assert result["probs"].shape == (1, 3)
    assert result["probs"].dtype == np.float32
    np.testing.assert_allclose(result["probs"].sum(axis=1), 1.0, rtol=1e-5)
    assert result["classes"].dtype == np.int64
    np.testing.assert_array_equal(result["classes"], result["probs"].argmax(axis=1))
