"""Run a source graph once on a probe input: the values a merged model must reproduce.

Worker side. Both the source graph and the merged model run under the same session
settings (check_session_config), so their outputs compare bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
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


def run_graph(
    graph: capi.Graph,
    init_nodes: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    fetches: Mapping[str, str],
    *,
    timeout_seconds: float | None = None,
) -> dict[str, np.ndarray]:
    """Run a source graph the way the merged model runs it: initializers first, then one call.

    The feeds are handed to TensorFlow without a copy: the session ends before this returns,
    and with it anything in the graph that could hold on to them. With timeout_seconds, each of
    the two runs fails with DeadlineExceeded past it.
    """
    options = None
    if timeout_seconds is not None:
        timeout_in_ms = max(1, round(timeout_seconds * 1000))
        options = tfcore.RunOptions(timeout_in_ms=timeout_in_ms).SerializeToString()
    keys = list(fetches)
    with capi.Session(graph, check_session_config().SerializeToString()) as session:
        if init_nodes:
            session.run({}, [], init_nodes, options=options)
        values = session.run(
            feeds, [fetches[k] for k in keys], aliased=feeds.keys(), options=options
        )
    return dict(zip(keys, values, strict=True))
