"""Device pins of a frozen graph, and why a source graph fails to run here. Worker side.

A graph frozen on a GPU machine with ``convert_variables_to_constants`` or by hand names
``/device:GPU:0`` on its nodes, top level and in function bodies alike (``freeze_graph``
clears them, most other ways of freezing do not). On a host without that device, TensorFlow
refuses to place the graph ("Cannot assign a device for operation ..."), so pins are cleared
before the check runs the graph, unless ``keep_devices`` asks to keep them. Colocation
(``_class``) stays: it only groups nodes, placed together wherever they can all run.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from tfmerge.models import ModelRejected

_NO_KERNEL = re.compile(r"No OpKernel was registered to support Op '([^']+)'")
_REGISTERED = re.compile(r"Registered devices: \[([^\]]*)\]")
_PINNED = re.compile(
    r"Cannot assign a device for operation ([^:\s]+).*?"
    r"(?:explicitly assigned to |explicit device specification ')([^' ]+)",
    re.DOTALL,
)


def _all_nodes(graph_def: Any) -> Iterator[Any]:
    yield from graph_def.node
    for function in graph_def.library.function:
        yield from function.node_def


def pinned_devices(graph_def: Any) -> dict[str, int]:
    """How many nodes name each device, top level and in function bodies."""
    return dict(sorted(Counter(n.device for n in _all_nodes(graph_def) if n.device).items()))


def clear_devices(graph_def: Any) -> int:
    """Drop every device pin, top level and in function bodies; how many there were."""
    cleared = 0
    for node in _all_nodes(graph_def):
        if node.device:
            node.device = ""
            cleared += 1
    return cleared


def source_failure(exc: Exception) -> ModelRejected:
    """The refusal of a source graph that failed on its probe input, saying what to do.

    An op with kernels for other devices only (a cuDNN op frozen on a GPU machine) and a pin
    to a device this host lacks (kept with ``keep_devices``) are facts about the graph and
    this host: no sample can make the graph run here.
    """
    message = str(getattr(exc, "message", exc))
    kernel = _NO_KERNEL.search(message)
    if kernel is not None:
        registered = _REGISTERED.search(message)
        host = registered.group(1) if registered else "CPU"
        return ModelRejected(
            "no_kernel",
            f"op {kernel.group(1)} has no kernel for this host's devices ({host}): it runs "
            "only on another device, such as a GPU; export the model without it "
            "(for example a non-cuDNN layer) to serve it here",
        )
    pinned = _PINNED.search(message)
    if pinned is not None:
        return ModelRejected(
            "device_unavailable",
            f"node {pinned.group(1)} is pinned to {pinned.group(2)}, which this host lacks; "
            "remove keep_devices = true for this model, so that its device pins are cleared",
        )
    return ModelRejected(
        "source_failed",
        f"the source graph fails on the probe input ({type(exc).__name__}: {message}); "
        "add a `sample` to its declaration",
    )
