"""Large constants lifted out of function bodies: every call site that can be rewritten is,
the graph computes the same bytes, and what cannot be rewritten stays, with the reason."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from tfmerge.build import constants, lifting
from tfmerge.build.probe import check_session_config

WIDTH = 512
_rng = np.random.default_rng(3)
# 1 MiB each: the smallest a constant must be to be lifted.
W1 = (_rng.standard_normal((WIDTH, WIDTH)) * 0.05).astype(np.float32)
W2 = (_rng.standard_normal((WIDTH, WIDTH)) * 0.05).astype(np.float32)
X = _rng.standard_normal((3, WIDTH)).astype(np.float32)
SPEC = tf.TensorSpec([None, WIDTH], tf.float32, name="x")


def frozen(function: Callable[[Any], Any], *, freeze: bool = True) -> Any:
    """The function's graph with its While, If and calls kept as functions."""
    concrete = tf.function(function, input_signature=[SPEC]).get_concrete_function()
    if not freeze:
        return concrete.graph.as_graph_def()
    return convert_variables_to_constants_v2(
        concrete, lower_control_flow=False
    ).graph.as_graph_def()


def output_of(graph_def: Any) -> str:
    (identity,) = [n.name for n in graph_def.node if n.op == "Identity" and "output" in n.name]
    return f"{identity}:0"


def run(graph_def: Any, feeds: dict[str, Any], fetch: str) -> np.ndarray:
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph, config=check_session_config()) as session:
            result: np.ndarray = session.run(fetch, feeds)
    return result


def lifted_run(graph_def: Any) -> tuple[lifting.Report, Any, np.ndarray]:
    """Lift, set the top-level constants aside as the check does, and run with them fed."""
    fetch = output_of(graph_def)
    rewritten = copy.deepcopy(graph_def)
    report = lifting.lift_function_constants(rewritten)
    light, large = constants.split_large_constants(rewritten)
    feeds = {"x:0": X} | {f"{c.name}:0": c.value for c in large}
    return report, light, run(light, feeds, fetch)


def left_in_functions(graph_def: Any) -> list[str]:
    return [
        node.name
        for function in graph_def.library.function
        for node in function.node_def
        if constants.is_large_constant(node)
    ]


def test_nested_loops_branches_and_calls_are_all_rewritten() -> None:
    """A cond in a loop body, a loop condition using a constant, and one function called both
    at the top level and inside the body: every constant reaches its function as an input."""

    @tf.function(input_signature=[SPEC], experimental_attributes={"_noinline": True})
    def project(h: Any) -> Any:
        return tf.matmul(h, tf.constant(W1))

    def model(x: Any) -> Any:
        def cond(i: Any, h: Any) -> Any:
            return tf.logical_and(i < 3, tf.reduce_sum(tf.matmul(h, tf.constant(W2))) < 1e9)

        def body(i: Any, h: Any) -> Any:
            branch = tf.cond(
                tf.reduce_mean(h) > -1.0,
                lambda: tf.matmul(h, tf.constant(W2)) + project(h),
                lambda: h * 0.5,
            )
            return i + 1, tf.tanh(branch)

        _, h = tf.while_loop(cond, body, (tf.constant(0), x))
        return tf.identity(h + project(x), name="output")

    graph_def = frozen(model)
    before = left_in_functions(graph_def)
    expected = run(graph_def, {"x:0": X}, output_of(graph_def))

    report, light, actual = lifted_run(graph_def)

    assert len(before) == 3
    assert sorted(c.node for c in report.lifted) == sorted(before)
    assert report.kept == []
    assert left_in_functions(light) == []
    assert actual.tobytes() == expected.tobytes()


def test_case_branches_and_direct_calls_are_rewritten() -> None:
    def model(x: Any) -> Any:
        index = tf.cast(tf.reduce_sum(x) > 0, tf.int32)
        picked = tf.switch_case(index, [lambda: tf.matmul(x, tf.constant(W1)), lambda: x * 2.0])
        return tf.identity(picked, name="output")

    # Freezing lowers Case; the traced graph keeps it (it has no variable to freeze anyway).
    graph_def = frozen(model, freeze=False)
    assert any(n.op in ("Case", "StatelessCase") for n in graph_def.node)
    expected = run(graph_def, {"x:0": X}, output_of(graph_def))
    report, _, actual = lifted_run(graph_def)
    assert len(report.lifted) == 1
    assert report.kept == []
    assert actual.tobytes() == expected.tobytes()

    @tf.function(input_signature=[SPEC], experimental_attributes={"_noinline": True})
    def inner(h: Any) -> Any:
        return tf.matmul(h, tf.constant(W2))

    graph_def = frozen(lambda x: tf.identity(inner(x) + 1.0, name="output"))
    for node in graph_def.node:
        if node.op in ("PartitionedCall", "StatefulPartitionedCall"):
            node.op = node.attr["f"].func.name  # a call by name: the op is the function
            node.ClearField("attr")
    expected = run(graph_def, {"x:0": X}, output_of(graph_def))
    report, _, actual = lifted_run(graph_def)
    assert len(report.lifted) == 1
    assert actual.tobytes() == expected.tobytes()


def _loop(x: Any) -> Any:
    def body(i: Any, h: Any) -> Any:
        return i + 1, tf.tanh(tf.matmul(h, tf.constant(W1)))

    _, h = tf.while_loop(lambda i, _: i < 3, body, (tf.constant(0), x))
    return tf.identity(h, name="output")


def test_two_loops_sharing_a_body_both_get_the_input() -> None:
    graph_def = frozen(_loop)
    (loop,) = [n for n in graph_def.node if n.op in ("While", "StatelessWhile")]
    twin = graph_def.node.add()
    twin.CopyFrom(loop)
    twin.name = "twin"
    loop.attr["_output_shapes"].list.shape.extend(loop.attr["output_shapes"].list.shape)
    expected = run(graph_def, {"x:0": X}, output_of(graph_def))

    report, light, actual = lifted_run(graph_def)

    assert len(report.lifted) == 1
    loops = {n.name: n for n in light.node if n.op in ("While", "StatelessWhile")}
    types = len(loop.attr["T"].list.type)
    assert {len(n.attr["T"].list.type) for n in loops.values()} == {types + 1}
    assert len(loops[loop.name].attr["_output_shapes"].list.shape) == types + 1
    assert actual.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("pin", "reason"),
    [
        ("gradient", "is referenced where it cannot change"),
        ("called", "is a While body and called otherwise"),
    ],
)
def test_a_body_that_cannot_change_keeps_its_constant(pin: str, reason: str) -> None:
    graph_def = frozen(_loop)
    (body,) = [f.signature.name for f in graph_def.library.function if "body" in f.signature.name]
    if pin == "gradient":
        graph_def.library.gradient.add(function_name=body, gradient_func=body)
    else:
        call = graph_def.node.add(name="also_called", op="PartitionedCall")
        call.attr["f"].func.name = body
    unchanged = copy.deepcopy(graph_def)

    report = lifting.lift_function_constants(graph_def)

    assert report.lifted == []
    assert [(k.function, k.nbytes) for k in report.kept] == [(body, W1.nbytes)]
    assert reason in report.kept[0].reason
    assert graph_def == unchanged
