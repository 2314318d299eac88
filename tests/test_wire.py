"""Reading a GraphDef's large constants in place: the wire walk and reading.read_graph."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format

from tfmerge.build import constants, reading, wire
from tfmerge.models import ModelRejected

LARGE = constants.LARGE_CONSTANT_BYTES


def _const(graph_def: Any, name: str, value: np.ndarray, dtype: Any = None) -> Any:
    node = graph_def.node.add(name=name, op="Const")
    proto = tf.make_tensor_proto(value, dtype=dtype)
    node.attr["dtype"].type = proto.dtype
    node.attr["value"].tensor.CopyFrom(proto)
    return node


def _graph() -> tuple[Any, dict[str, np.ndarray]]:
    """Two large float constants, a small one, a large string constant and a colocated read."""
    rng = np.random.default_rng(7)
    big = rng.standard_normal((LARGE // 4 + 3,)).astype(np.float32)
    wide = rng.integers(-100, 100, size=(3, LARGE // 3 + 5)).astype(np.int8)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.versions.producer = 1234
    graph_def.node.add(name="x", op="Placeholder").attr["dtype"].type = tf.float32.as_datatype_enum
    _const(graph_def, "big", big)
    _const(graph_def, "small", np.arange(10, dtype=np.float32))
    _const(graph_def, "words", np.array([b"w" * (LARGE + 1)], dtype=object), tf.string)
    node = _const(graph_def, "scope/wide", wide)
    node.attr["_class"].list.s.append(b"loc:@big")
    add = graph_def.node.add(name="y", op="AddV2", input=["x", "big"])
    add.attr["T"].type = tf.float32.as_datatype_enum
    return graph_def, {"big": big, "scope/wide": wide}


def _without_contents(graph_def: Any, names: set[str]) -> Any:
    copy = type(graph_def)()
    copy.CopyFrom(graph_def)
    for node in copy.node:
        if node.name in names:
            node.attr["value"].tensor.ClearField("tensor_content")
    return copy


def test_split_payloads_leaves_out_exactly_the_large_contents() -> None:
    graph_def, values = _graph()
    data = graph_def.SerializeToString(deterministic=True)
    stripped, payloads = wire.split_payloads(memoryview(data), LARGE)
    assert {p.node for p in payloads} == set(values)
    for payload in payloads:
        assert data[payload.start : payload.stop] == values[payload.node].tobytes()
    parsed = tf.compat.v1.GraphDef.FromString(bytes(stripped))
    assert parsed == _without_contents(graph_def, set(values))
    assert len(stripped) < len(data) - 2 * LARGE


def test_constants_in_function_bodies_are_split_off_under_their_function_key() -> None:
    from tfmerge.build import lifting

    graph_def, values = _graph()
    inner = (np.arange(LARGE // 4 + 1) % 7).astype(np.float32)
    function = graph_def.library.function.add()
    function.signature.name = "loop_body"
    const = function.node_def.add(name="while/Const", op="Const")
    const.attr["dtype"].type = tf.float32.as_datatype_enum
    const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(inner))
    small = function.node_def.add()
    small.CopyFrom(const)
    small.name = "while/small"
    small.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.ones(3, np.float32)))
    data = memoryview(graph_def.SerializeToString(deterministic=True))

    stripped, payloads = wire.split_payloads(data, LARGE)

    key = wire.function_key("loop_body", "while/Const")
    assert {p.node for p in payloads} == {*values, key}
    (found,) = [p for p in payloads if p.node == key]
    assert data[found.start : found.stop] == inner.tobytes()
    parsed = tf.compat.v1.GraphDef.FromString(bytes(stripped))
    assert parsed.library.function[0].node_def[1] == small
    # Put back, the graph is the file's again.
    views = {p.node: data[p.start : p.stop] for p in payloads}
    lifting.restore_function_payloads(parsed, views, {})
    assert set(views) == set(values)
    assert parsed == _without_contents(graph_def, set(values))


def test_split_payloads_without_large_constants_returns_the_bytes_themselves() -> None:
    graph_def = tf.compat.v1.GraphDef()
    _const(graph_def, "small", np.arange(10, dtype=np.float32))
    data = memoryview(graph_def.SerializeToString())
    stripped, payloads = wire.split_payloads(data, LARGE)
    assert payloads == []
    assert stripped is data


def test_a_repeated_value_attr_is_left_to_the_plain_parser(tmp_path: Path) -> None:
    graph_def, _ = _graph()
    data = _with_second_value(graph_def)
    with pytest.raises(wire.Unusual):
        wire.split_payloads(memoryview(data), LARGE)
    path = tmp_path / "g.pb"
    path.write_bytes(data)
    read = reading.read_graph(path, "g.pb", 1 << 40)
    assert read.payloads == {}
    # What any parser makes of it: the last "value" (zeros) wins.
    expected = tf.compat.v1.GraphDef.FromString(data)
    assert read.graph_def == expected
    big = next(n for n in expected.node if n.name == "big")
    assert not tf.make_ndarray(big.attr["value"].tensor).any()


def _with_second_value(graph_def: Any) -> bytes:
    """graph_def serialised with node "big" given a second attr entry "value" (all zeros)."""
    copy = type(graph_def)()
    copy.CopyFrom(graph_def)
    out = bytearray()
    for node in copy.node:
        raw = node.SerializeToString(deterministic=True)
        if node.name == "big":
            extra = tf.compat.v1.NodeDef()
            extra.attr["value"].tensor.CopyFrom(
                tf.make_tensor_proto(np.zeros(LARGE // 4 + 3, np.float32))
            )
            raw += extra.SerializeToString()
        out += _field(1, raw)
    out += _field(4, copy.versions.SerializeToString())
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return wire.length_field_key(number, len(payload)) + payload


def test_read_graph_gives_views_of_the_constants_and_the_file_digest(tmp_path: Path) -> None:
    graph_def, values = _graph()
    path = tmp_path / "g.pb"
    path.write_bytes(graph_def.SerializeToString(deterministic=True))
    read = reading.read_graph(path, "g.pb", 1 << 40)
    assert read.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bytes(read.data) == path.read_bytes()
    assert read.graph_def == _without_contents(graph_def, set(values))
    assert {name: bytes(view) for name, view in read.payloads.items()} == {
        name: value.tobytes() for name, value in values.items()
    }
    # Every large constant is where TensorFlow can feed it without a copy.
    for view in read.payloads.values():
        assert np.frombuffer(view, np.uint8).ctypes.data % 64 == 0

    light, large = constants.split_large_constants(read.graph_def, read.payloads)
    assert [c.name for c in large] == ["big", "scope/wide"]
    for constant in large:
        np.testing.assert_array_equal(constant.value, values[constant.name])
        assert constant.value.dtype == values[constant.name].dtype
    placeholders = {n.name: n for n in light.node if n.op == "Placeholder"}
    assert list(placeholders["scope/wide"].attr["_class"].list.s) == [b"loc:@big"]


def test_a_large_constant_the_merge_does_not_move_keeps_its_bytes(tmp_path: Path) -> None:
    graph_def = tf.compat.v1.GraphDef()
    quantized = np.arange(LARGE + 9, dtype=np.int64).astype(np.int8)
    _const(graph_def, "q", quantized, tf.qint8)
    path = tmp_path / "q.pb"
    path.write_bytes(graph_def.SerializeToString(deterministic=True))
    read = reading.read_graph(path, "q.pb", 1 << 40)
    assert set(read.payloads) == {"q"}
    light, large = constants.split_large_constants(read.graph_def, read.payloads)
    assert large == []
    assert light.node[0] == graph_def.node[0]


def test_content_that_does_not_match_the_shape_is_refused(tmp_path: Path) -> None:
    graph_def = tf.compat.v1.GraphDef()
    node = _const(graph_def, "c", np.zeros(LARGE // 4, np.float32))
    node.attr["value"].tensor.tensor_content += b"\0\0"
    path = tmp_path / "c.pb"
    path.write_bytes(graph_def.SerializeToString())
    read = reading.read_graph(path, "c.pb", 1 << 40)
    with pytest.raises(ModelRejected) as caught:
        constants.split_large_constants(read.graph_def, read.payloads)
    assert caught.value.code == "invalid_graph"
    assert "'c'" in caught.value.reason


def test_a_text_graph_is_parsed_whole(tmp_path: Path) -> None:
    graph_def, values = _graph()
    path = tmp_path / "g.pbtxt"
    path.write_text(text_format.MessageToString(graph_def))
    read = reading.read_graph(path, "g.pbtxt", 1 << 40)
    assert read.payloads == {}
    assert read.graph_def == graph_def
    _, large = constants.split_large_constants(read.graph_def, read.payloads)
    assert {c.name for c in large} == set(values)


@pytest.mark.parametrize("cut", [1, 1000, LARGE + 100])
def test_a_cut_off_file_is_refused_as_unparseable(tmp_path: Path, cut: int) -> None:
    graph_def, _ = _graph()
    data = graph_def.SerializeToString(deterministic=True)
    path = tmp_path / "g.pb"
    path.write_bytes(data[: len(data) - cut])
    with pytest.raises(ModelRejected) as caught:
        reading.read_graph(path, "g.pb", 1 << 40)
    assert caught.value.code == "unparseable"


def test_a_node_without_an_op_is_refused_beside_large_constants(tmp_path: Path) -> None:
    graph_def, _ = _graph()
    graph_def.node.add(name="nameless_op")
    path = tmp_path / "g.pb"
    path.write_bytes(graph_def.SerializeToString(deterministic=True))
    with pytest.raises(ModelRejected) as caught:
        reading.read_graph(path, "g.pb", 1 << 40)
    assert caught.value.code == "not_a_graphdef"
    assert "no op" in caught.value.reason
