"""Checks on a graph's declared sizes and structure, made before TensorFlow runs any of it.

- ``check_library``, before the import: a function that calls itself (or functions nested
  thousands deep) makes the import's shape inference recurse until the thread's stack
  overflows, a SIGSEGV no Python code can catch.
- ``check_tensors``, after the import: a tensor whose inferred static shape is over the
  model's memory budget (a 139-byte file can hold a splat constant of 12 GB, or a Fill of
  constant dimensions).
- ``check_probe_sizes``, before the probe input is allocated: declared dimensions times the
  bytes numpy needs per element.

Worker side: reads TensorFlow's protobufs and graphs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tfmerge.build import capi, tfcore
from tfmerge.build.signatures import INPUT_OPS
from tfmerge.limits import ModelLimits, human_bytes
from tfmerge.models import ModelRejected, TensorSig

#: Function calls nested deeper than this are refused. The import's shape inference recursed
#: through 4000 nested calls and overflowed the 8 MiB main-thread stack at 5000 (TensorFlow
#: 2.21, x86-64); graphs that TensorFlow writes nest a few levels.
MAX_CALL_DEPTH = 256
#: A probe value's element, beyond the final array: numpy's standard_normal makes float64
#: values first, which astype then copies into the input's dtype.
_FLOAT_TEMPORARY_BYTES = 8
#: A string element is a pointer to one shared bytes object.
_STRING_ELEMENT_BYTES = 8
#: What an unknown dimension is made of, as in probe.probe_inputs.
_UNKNOWN_DIMENSION = 2
_UNSIZED_DTYPES = frozenset({"resource", "variant", "string"})


def _funcs_in_attr(value: Any) -> Iterator[str]:
    kind = value.WhichOneof("value")
    if kind == "func":
        yield value.func.name
        for nested in value.func.attr.values():
            yield from _funcs_in_attr(nested)
    elif kind == "list":
        for func in value.list.func:
            yield func.name
            for nested in func.attr.values():
                yield from _funcs_in_attr(nested)


def _callees(nodes: Iterable[Any], names: set[str]) -> set[str]:
    """The library functions these nodes call: as their op, or through a function attr."""
    found: set[str] = set()
    for node in nodes:
        if node.op in names:
            found.add(node.op)
        for value in node.attr.values():
            found.update(_funcs_in_attr(value))
    return found & names


def _walk(edges: Mapping[str, list[str]]) -> tuple[list[str] | None, int]:
    """A call cycle if there is one, else None and the deepest nesting of calls.

    Iterative, so that the walk itself does not run out of stack on the graphs it refuses.
    """
    depth: dict[str, int] = {}
    on_path: dict[str, int] = {}
    for root in sorted(edges):
        if root in depth:
            continue
        path: list[str] = [root]
        todo: list[Iterator[str]] = [iter(edges[root])]
        on_path[root] = 0
        while todo:
            callee = next(todo[-1], None)
            if callee is None:
                name = path.pop()
                todo.pop()
                del on_path[name]
                depth[name] = 1 + max((depth[c] for c in edges[name]), default=0)
            elif callee in on_path:
                return [*path[on_path[callee] :], callee], 0
            elif callee not in depth:
                on_path[callee] = len(path)
                path.append(callee)
                todo.append(iter(edges[callee]))
    return None, max(depth.values(), default=0)


def check_library(graph_def: Any) -> None:
    """Refuse a function library TensorFlow's import would recurse through without end."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    if not functions:
        return
    names = set(functions)
    edges = {name: sorted(_callees(f.node_def, names)) for name, f in functions.items()}
    cycle, depth = _walk(edges)
    if cycle is not None:
        raise ModelRejected(
            "recursive_function",
            "a function calls itself (" + " -> ".join(cycle) + "): TensorFlow cannot run "
            "recursion, and its import recurses until the process crashes",
        )
    if depth > MAX_CALL_DEPTH:
        raise ModelRejected(
            "recursive_function",
            f"functions call each other {depth} deep, over the {MAX_CALL_DEPTH} the import "
            "can follow without running out of stack",
        )


def _elements(dims: Iterable[int | None]) -> int:
    count = 1
    for dim in dims:
        count *= _UNKNOWN_DIMENSION if dim is None or dim < 0 else dim
    return count


def check_tensors(graph: capi.Graph, graph_def: Any, limits: ModelLimits) -> None:
    """Refuse a graph with a tensor whose static shape is over the memory budget.

    Placeholders make nothing: what is fed to them is the probe input (check_probe_sizes) or
    a large constant's bytes, already in memory as read.
    """
    budget = limits.memory_bytes
    for name, kind, type_enum, shape in graph.outputs():
        if kind in INPUT_OPS or shape is None:
            continue
        dtype = _sized_dtype(type_enum)
        if dtype is None:
            continue
        dims = [None if d < 0 else d for d in shape]
        size = _elements(dims) * dtype.size
        if size > budget:
            raise ModelRejected(
                "tensor_too_large",
                f"{kind} {name!r} makes a {dtype.name} {dims} tensor of "
                f"{human_bytes(size)}, over this model's memory budget of "
                f"{human_bytes(budget)}",
            )
    for function in graph_def.library.function:
        for node in function.node_def:
            if node.op != "Const" or "value" not in node.attr:
                continue
            value = node.attr["value"].tensor
            dtype = _sized_dtype(value.dtype)
            if dtype is None:
                continue
            size = _elements(d.size for d in value.tensor_shape.dim) * dtype.size
            if size > budget:
                raise ModelRejected(
                    "tensor_too_large",
                    f"constant {node.name!r} in function {function.signature.name!r} is "
                    f"{human_bytes(size)}, over this model's memory budget of "
                    f"{human_bytes(budget)}",
                )


@functools.cache
def _sized_dtype(type_enum: int) -> Any:
    """The type of an op's output when its size can be told from its shape, else None.

    A reference type (a TF1 variable's output, its enum past 100) holds its base type.
    """
    try:
        dtype = tfcore.dtypes.as_dtype(type_enum - 100 if type_enum > 100 else type_enum)
    except TypeError:
        return None
    return None if dtype.name in _UNSIZED_DTYPES else dtype


def probe_bytes(sig: TensorSig) -> int:
    """What numpy takes at most to make the generated probe value of one input."""
    dtype = tfcore.dtypes.as_dtype(sig.dtype)
    elements = _elements((None,) if sig.shape is None else sig.shape)
    if dtype == tfcore.dtypes.string:
        return elements * _STRING_ELEMENT_BYTES
    extra = _FLOAT_TEMPORARY_BYTES if dtype.is_floating else 0
    return elements * (int(dtype.size) + extra)


def check_probe_sizes(
    inputs: Mapping[str, TensorSig], sample: Mapping[str, Any] | None, limits: ModelLimits
) -> None:
    """Refuse generated probe values over the budget, before numpy allocates any of them."""
    total = 0
    for key, sig in sorted(inputs.items()):
        if sample is not None and key in sample:
            continue  # given in the declaration: already in memory
        size = probe_bytes(sig)
        total += size
        if total > limits.probe_bytes:
            shape = "unknown" if sig.shape is None else list(sig.shape)
            raise ModelRejected(
                "probe_too_large",
                f"input {key!r} ({sig.name}, {tfcore.dtypes.as_dtype(sig.dtype).name} "
                f"{shape}) needs a probe value of {human_bytes(size)}, over this model's "
                f"probe_bytes of {human_bytes(limits.probe_bytes)}: declare a smaller shape, "
                "give the input a `sample`, or raise the model's limits",
            )
