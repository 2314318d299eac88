"""Run a source graph once on a probe input: the values a merged model must reproduce.

Worker side. Both the source graph and the merged model run under the same session
settings (check_session_config), so their outputs compare bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfmerge.build import capi, tfcore
from tfmerge.models import ModelRejected, TensorSig


def probe_inputs(
    signature: str, inputs: Mapping[str, TensorSig], sample: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """The value fed to each input when checking a model: its sample, or one made from its type."""
    seed = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    values = {}
    for key, sig in sorted(inputs.items()):
        dtype = tfcore.dtypes.as_dtype(sig.dtype)
        if sample is not None and key in sample:
            try:
                np_dtype = object if dtype == tfcore.dtypes.string else dtype.as_numpy_dtype
                value = np.asarray(sample[key], dtype=np_dtype)
                if dtype == tfcore.dtypes.string:
                    value = np.vectorize(
                        lambda s: s.encode() if isinstance(s, str) else s, otypes=[object]
                    )(value)
            except (TypeError, ValueError) as exc:
                raise ModelRejected(
                    "bad_sample", f"sample.{key} is not a {dtype.name} array: {exc}"
                ) from exc
            values[key] = value
            continue
        shape = (2,) if sig.shape is None else tuple(2 if d < 0 else d for d in sig.shape)
        if dtype.is_floating:
            values[key] = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_integer or dtype.is_bool:
            # Zeros are valid indices for any embedding or table a graph may look them up in.
            values[key] = np.zeros(shape, dtype=dtype.as_numpy_dtype)
        elif dtype == tfcore.dtypes.string:
            values[key] = np.full(shape, b"tfmerge probe", dtype=object)
        else:
            raise ModelRejected(
                "bad_sample",
                f"cannot make a probe value for input {key!r} of type {dtype.name}: add a sample",
            )
    return values


def check_session_config() -> Any:
    """Session options for every run a check makes, on the source and on the merged model alike.

    Graph optimisations off (Grappler and the classic optimiser): they copy a graph's constants
    several times, which for a large frozen graph costs more than the whole merge, and both
    sides must run the very same kernels for their outputs to be comparable bit for bit.
    """
    config = tfcore.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.optimizer_options.opt_level = tfcore.OptimizerOptions.L0
    config.graph_options.optimizer_options.do_constant_folding = False
    config.graph_options.optimizer_options.do_common_subexpression_elimination = False
    config.graph_options.optimizer_options.do_function_inlining = False
    return config


@dataclass
class Probe:
    """A source graph, ready to run once on its probe input."""

    #: The serialized GraphDef, as checked (its large constants as placeholders).
    graph_def: bytes
    init_nodes: Sequence[str]
    #: Tensor names -> values: the probe input, and the large constants the graph stands for.
    feeds: dict[str, np.ndarray]
    #: Output keys -> tensor names.
    fetches: dict[str, str]


def run_graph(
    graph: capi.Graph,
    init_nodes: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    fetches: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """Run a source graph the way the merged model runs it: initializers first, then one call.

    The feeds are handed to TensorFlow without a copy: the session ends before this returns,
    and with it anything in the graph that could hold on to them.
    """
    keys = list(fetches)
    with capi.Session(graph, check_session_config().SerializeToString()) as session:
        if init_nodes:
            session.run({}, [], init_nodes)
        values = session.run(feeds, [fetches[k] for k in keys], aliased=feeds.keys())
    return dict(zip(keys, values, strict=True))


def run_alone(probe: Probe) -> dict[str, np.ndarray]:
    """One probe in a graph and a session of its own."""
    graph = capi.Graph()
    try:
        graph.import_graph_def(probe.graph_def)
        return run_graph(graph, probe.init_nodes, probe.feeds, probe.fetches)
    finally:
        graph.close()


def shareable(graph_def: Any, init_nodes: Sequence[str]) -> bool:
    """Whether a graph computes the same in a session shared with other graphs.

    Each graph goes under a name scope of its own there, but some things a scope does not
    separate: functions (one library per graph), TF1 loop frames (named by an attribute),
    resources named by shared_name or container (tables, variables), and initializers.
    """
    if init_nodes or len(graph_def.library.function) or len(graph_def.library.gradient):
        return False
    for node in graph_def.node:
        if node.op in _LOOP_OPS:
            return False
        for name in ("shared_name", "container"):
            value = node.attr.get(name)
            if value is not None and value.s:
                return False
    return True


def run_shared(probes: Sequence[Probe]) -> list[dict[str, np.ndarray] | Exception]:
    """Each probe's outputs, or the error it failed with, from one session call for all.

    A session call costs a fixed part besides the work of each graph: for small graphs, most
    of it. The graphs must be shareable. Should the shared call fail, each probe is run alone,
    so that a failure is its own graph's.
    """
    graph = capi.Graph()
    feeds: dict[str, np.ndarray] = {}
    fetches: dict[str, str] = {}
    try:
        for index, probe in enumerate(probes):
            scope = f"probe{index}"
            graph.import_graph_def(probe.graph_def, prefix=scope)
            feeds.update({f"{scope}/{name}": value for name, value in probe.feeds.items()})
            fetches.update({f"{scope}/{t}": f"{scope}/{t}" for t in probe.fetches.values()})
        together = run_graph(graph, (), feeds, fetches)
    except (capi.TFError, KeyError):
        return [_outcome(probe) for probe in probes]
    finally:
        graph.close()
    return [
        {key: together[f"probe{index}/{tensor}"] for key, tensor in probe.fetches.items()}
        for index, probe in enumerate(probes)
    ]


def _outcome(probe: Probe) -> dict[str, np.ndarray] | Exception:
    try:
        return run_alone(probe)
    except Exception as exc:  # noqa: BLE001 - any kernel error on the probe input is the result
        return exc


#: TF1 while loops: their frames are named by an attribute, the same in every copy of a graph.
_LOOP_OPS = frozenset({"Enter", "RefEnter"})
