"""Which changes of a served signature break its clients, and when they are declared."""

from __future__ import annotations

from typing import Any

import pytest

from tfmerge.interface import breaking_changes, check_interface
from tfmerge.models import AcceptedModel, ModelRejected, ModelSpec


def tensors(inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    def side(entries: dict[str, Any]) -> dict[str, Any]:
        return {k: {"name": f"{k}:0", "dtype": d, "shape": s} for k, (d, s) in entries.items()}

    return {"inputs": side(inputs), "outputs": side(outputs)}


SERVED = tensors(
    {"x": ("float32", [-1, 4])},
    {"probs": ("float32", [-1, 3]), "classes": ("int64", [-1])},
)


@pytest.mark.parametrize(
    ("current", "changes"),
    [
        (SERVED, []),
        # A new output, and a dimension that only changes size: no client notices.
        (
            tensors(
                {"x": ("float32", [-1, 8])},
                {"probs": ("float32", [-1, 3]), "classes": ("int64", [-1]), "z": ("int32", [])},
            ),
            [],
        ),
        # A cut graph: discovery now offers probs only.
        (
            tensors({"x": ("float32", [-1, 4])}, {"probs": ("float32", [-1, 3])}),
            ["output 'classes' removed"],
        ),
        (
            tensors(
                {"x": ("float64", [-1, 4]), "mask": ("bool", [-1])},
                {"probs": ("float32", [-1]), "classes": ("int64", None)},
            ),
            [
                "input 'x' dtype float32 -> float64",
                "input 'mask' added (requests so far do not feed it)",
                "output 'probs' rank 2 -> 1",
            ],
        ),
    ],
)
def test_breaking_changes(current: dict[str, Any], changes: list[str]) -> None:
    assert breaking_changes(SERVED, current) == changes


def previous(origin: str) -> AcceptedModel:
    return AcceptedModel(
        signature="demo",
        relpath="demo.pb",
        sha256="ab" * 32,
        size=10,
        inputs={"x": "x:0"},
        outputs={"probs": "probs:0", "classes": "classes:0"},
        origin=origin,
        tensors=SERVED,
    )


CUT = tensors({"x": ("float32", [-1, 4])}, {"probs": ("float32", [-1, 3])})


def test_an_undeclared_breaking_change_is_refused_with_what_changed() -> None:
    discovered = ModelSpec("demo", "demo.pb", None, None, origin="discovered")
    with pytest.raises(ModelRejected) as caught:
        check_interface(discovered, previous("discovered"), CUT, allow_all=False)
    assert caught.value.code == "interface_changed"
    assert "output 'classes' removed" in caught.value.reason
    assert caught.value.details == {"changes": ["output 'classes' removed"]}
    # The same declaration as before is no announcement either.
    same = ModelSpec("demo", "demo.pb", {"x": "x:0"}, {"probs": "probs:0", "classes": "classes:0"})
    with pytest.raises(ModelRejected):
        check_interface(same, previous("config"), CUT, allow_all=False)


def test_a_declared_or_allowed_change_is_accepted() -> None:
    declared = ModelSpec("demo", "demo.pb", {"x": "x:0"}, {"probs": "probs:0"})
    check_interface(declared, previous("discovered"), CUT, allow_all=False)
    allowed = ModelSpec("demo", "demo.pb", None, None, allow_interface_change=True)
    check_interface(allowed, previous("discovered"), CUT, allow_all=False)
    discovered = ModelSpec("demo", "demo.pb", None, None, origin="discovered")
    check_interface(discovered, previous("discovered"), CUT, allow_all=True)
    check_interface(discovered, None, CUT, allow_all=False)  # never accepted: nothing to break
