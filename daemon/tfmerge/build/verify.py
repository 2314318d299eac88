"""Load a merged SavedModel the way TensorFlow Serving does and compare it with its sources.

Worker side. The loader is TensorFlow's C++ SavedModel loader, the one TensorFlow Serving runs
(loader.load_saved_model): it restores the variables and runs the init op. Every signature is
looked up by name in the MetaGraphDef it returns and run on the probe input its source graph
already answered. Outputs must be identical: same dtype, same shape, same bytes (NaN equal to
NaN). Both sides run under the same session settings (``check_session_config``), and identical
kernels on identical inputs give identical results, so no tolerance is applied (see
tfmerge.tolerance for comparisons across settings).

The signatures run in as few session calls as can be shared safely (plan_calls). Each distinct
set of feeds and fetches makes TensorFlow prune a copy of the whole graph and build an executor
for it, so one call per signature would cost the number of signatures times the size of the
graph: quadratic in the number of models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfmerge.build import capi, loader
from tfmerge.build.compare import outputs_equal
from tfmerge.build.probe import check_session_config


@dataclass(frozen=True)
class Mismatch:
    signature: str
    reason: str


@dataclass
class _Call:
    """One signature's run: its output keys -> tensors, and its feeds by tensor name."""

    signature: str
    fetches: dict[str, str]
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    #: The size of its source graph file: a proxy for what running it holds in memory.
    size: int = 0


#: The source graphs of one shared call add up to at most this many bytes (one larger graph
#: runs alone): the graphs of a call run at once, and their intermediate values add up.
CALL_BYTES = 512 << 20


def scope_of(tensor: str) -> str:
    """A merged graph's tensors are named ``scope/...``, one scope per source graph."""
    return tensor.split("/", 1)[0]


def _feeds_key(feeds: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    """What a call feeds: tensor names, dtypes, shapes and values."""
    items = []
    for name in sorted(feeds):
        value = np.asarray(feeds[name])
        data = repr(value.tolist()).encode() if value.dtype == object else value.tobytes()
        items.append((name, value.dtype.str, value.shape, data))
    return tuple(items)


def plan_calls(calls: Sequence[_Call]) -> list[list[_Call]]:
    """The signatures split into groups that may share one session call.

    A fed tensor is fed for the whole call, so signatures share a call only when no tensor one
    of them feeds can change what another computes. Each source graph lives in its own scope
    and never reads another scope's tensors, so signatures of different scopes always share;
    signatures of the same scope (several served from one graph, or an alias such as
    ``serving_default``) share only when they feed the same tensors the same values. Each
    other feed set of a scope goes to the next group. A signature whose tensors span scopes
    (never made by the merge) runs alone.
    """
    layers: list[list[_Call]] = []
    seen: dict[str, dict[tuple[Any, ...], int]] = {}
    alone: list[list[_Call]] = []
    for call in calls:
        scopes = {scope_of(t) for t in [*call.feeds, *call.fetches.values()]}
        if len(scopes) != 1:
            alone.append([call])
            continue
        known = seen.setdefault(scopes.pop(), {})
        layer = known.setdefault(_feeds_key(call.feeds), len(known))
        while len(layers) <= layer:
            layers.append([])
        layers[layer].append(call)
    return [group for layer in layers for group in _by_size(layer)] + alone


def _by_size(layer: list[_Call]) -> list[list[_Call]]:
    groups: list[list[_Call]] = [[]]
    total = 0
    for call in layer:
        if groups[-1] and total + call.size > CALL_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(call)
        total += call.size
    return groups


def _run_group(session: capi.Session, group: Sequence[_Call]) -> dict[str, dict[str, np.ndarray]]:
    """One session call for the group: the feeds merged (equal where shared), fetches once."""
    feeds: dict[str, np.ndarray] = {}
    tensors: list[str] = []
    position: dict[str, int] = {}
    for call in group:
        feeds.update(call.feeds)
        for tensor in call.fetches.values():
            if tensor not in position:
                position[tensor] = len(tensors)
                tensors.append(tensor)
    values = session.run(feeds, tensors)
    return {
        call.signature: {key: values[position[t]] for key, t in call.fetches.items()}
        for call in group
    }


def load_and_run(
    export_dir: Path,
    feeds: Mapping[str, Mapping[str, np.ndarray]],
    sizes: Mapping[str, int] | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Load export_dir and run each named signature on its feeds (keyed by input key).

    ``sizes`` are the signatures' source file sizes, to keep a call's graphs within CALL_BYTES.

    Returns the outputs of the signatures that ran and, for the others, why they failed.
    A group whose call fails is run again one signature at a time, so that each failure is
    the failing signature's own.
    """
    results: dict[str, dict[str, np.ndarray]] = {}
    failures: dict[str, str] = {}
    model = loader.load_saved_model(
        str(export_dir), ["serve"], check_session_config().SerializeToString()
    )
    try:
        calls = []
        for name, values in sorted(feeds.items()):
            signature = model.signature_def.get(name)
            if signature is None:
                failures[name] = "signature missing from the SavedModel"
                continue
            missing = sorted(set(values) - set(signature.inputs))
            if missing:
                failures[name] = f"the SavedModel's signature has no input {missing}"
                continue
            fetches = {key: info.name for key, info in signature.outputs.items()}
            inputs = {signature.inputs[k].name: v for k, v in values.items()}
            calls.append(_Call(name, fetches, inputs, (sizes or {}).get(name, 0)))
        for group in plan_calls(calls):
            try:
                results.update(_run_group(model.session, group))
            except (capi.TFError, KeyError):
                for call in group:
                    try:
                        results.update(_run_group(model.session, [call]))
                    except (capi.TFError, KeyError) as exc:
                        failures[call.signature] = f"{type(exc).__name__}: {exc}"
    finally:
        model.close()
    return results, failures


def verify(
    export_dir: Path,
    feeds: Mapping[str, Mapping[str, np.ndarray]],
    expected: Mapping[str, Mapping[str, np.ndarray]],
    sizes: Mapping[str, int] | None = None,
) -> list[Mismatch]:
    """Every way the SavedModel in export_dir differs from what its sources computed."""

    try:
        actual, failures = load_and_run(export_dir, feeds, sizes)
    except (capi.TFError, ValueError, OSError) as exc:
        return [Mismatch("*", f"the SavedModel does not load: {exc}")]
    mismatches = [Mismatch(name, f"fails to run: {why}") for name, why in failures.items()]
    for name, outputs in sorted(actual.items()):
        wanted = expected[name]
        if set(outputs) != set(wanted):
            mismatches.append(Mismatch(name, f"outputs {sorted(outputs)} != {sorted(wanted)}"))
            continue
        for key in sorted(wanted):
            problem = outputs_equal(wanted[key], outputs[key])
            if problem:
                mismatches.append(Mismatch(name, f"output {key!r}: {problem}"))
    return mismatches
