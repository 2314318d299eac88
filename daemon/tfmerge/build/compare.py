"""Compare an output with its source's: exactly, or within the numeric contract (tfmerge.tolerance).

Worker side (numpy, no TensorFlow). ``outputs_equal`` is for two runs under the same session
settings, where anything but identical bytes is a fault. ``outputs_close`` is for runs under
different settings (a TensorFlow Serving that runs Grappler and perhaps oneDNN against the
unoptimised source): floats within their dtype's tolerance, everything else exact. Both explain
a failure in a few words, with the largest absolute and relative difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tfmerge.tolerance import DEFAULT_TOLERANCES, Tolerance, tolerance_for


@dataclass(frozen=True)
class Difference:
    """The largest differences between the finite values of two float arrays.

    ``max_rel`` is ``|a - b| / |b|``, with the dtype's smallest normal number standing in for
    a ``|b|`` of zero (so it stays finite, and large, where the source is zero).
    """

    max_abs: float = 0.0
    max_rel: float = 0.0

    def worst(self, other: Difference) -> Difference:
        return Difference(max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel))

    def __str__(self) -> str:
        return f"max abs difference {self.max_abs:.3g}, max rel difference {self.max_rel:.3g}"


def _is_float(array: np.ndarray) -> bool:
    # bfloat16 (from ml_dtypes, as TensorFlow returns it) is not of numpy kind "f".
    return array.dtype.kind in "fc" or array.dtype.name == "bfloat16"


def _wide(array: np.ndarray) -> np.ndarray:
    return array.astype(np.complex128 if array.dtype.kind == "c" else np.float64)


def _smallest_normal(array: np.ndarray) -> float:
    if array.dtype.name == "bfloat16":  # float32's exponent range
        return float(np.finfo(np.float32).tiny)
    return float(np.finfo(array.dtype).tiny)


def difference(expected: np.ndarray, actual: np.ndarray) -> Difference:
    """How far actual is from expected, over the places where both are finite.

    Zero for arrays that are not floats, or whose dtypes or shapes differ.
    """
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if not _is_float(expected) or expected.dtype != actual.dtype or expected.size == 0:
        return Difference()
    if expected.shape != actual.shape:
        return Difference()
    want, got = _wide(expected), _wide(actual)
    finite = np.isfinite(want) & np.isfinite(got)
    if not finite.any():
        return Difference()
    gap = np.abs(got[finite] - want[finite])
    scale = np.maximum(np.abs(want[finite]), _smallest_normal(expected))
    return Difference(float(gap.max()), float((gap / scale).max()))


def _explained(expected: np.ndarray, actual: np.ndarray) -> str:
    """The differences, and how many NaNs or infinities have no match on the other side."""
    want, got = _wide(expected), _wide(actual)
    unmatched = ~(np.isfinite(want) & np.isfinite(got)) & ~(
        (want == got) | (np.isnan(want) & np.isnan(got))
    )
    count = int(np.count_nonzero(unmatched))
    text = str(difference(expected, actual))
    return text + (f"; {count} NaN or infinite values unmatched" if count else "")


def _same_kind(expected: np.ndarray, actual: np.ndarray) -> str | None:
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype} != source {expected.dtype}"
    if expected.shape != actual.shape:
        return f"shape {actual.shape} != source {expected.shape}"
    return None


def outputs_equal(expected: np.ndarray, actual: np.ndarray) -> str | None:
    """None when identical (NaN equal to NaN); otherwise why not, in a few words."""
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    problem = _same_kind(expected, actual)
    if problem:
        return problem
    if not _is_float(expected):
        return None if np.array_equal(expected, actual) else "values differ from the source"
    want, got = _wide(expected), _wide(actual)
    if np.array_equal(want, got, equal_nan=True):
        return None
    return f"values differ from the source ({_explained(expected, actual)})"


def outputs_close(
    expected: np.ndarray,
    actual: np.ndarray,
    tolerances: Mapping[str, Tolerance] = DEFAULT_TOLERANCES,
) -> str | None:
    """None when actual is within the numeric contract of expected; otherwise why not.

    Floats pass element by element when ``|actual - expected| <= atol + rtol * |expected|``
    (in float64; NaN equal to NaN, an infinity equal only to itself). Dtypes with no entry in
    tolerances (integers, booleans, strings) must be equal exactly.
    """
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    tolerance = tolerance_for(expected.dtype.name, tolerances)
    if tolerance is None or not _is_float(expected):
        return outputs_equal(expected, actual)
    problem = _same_kind(expected, actual)
    if problem:
        return problem
    want, got = _wide(expected), _wide(actual)
    both_nan = np.isnan(want) & np.isnan(got)
    finite = np.isfinite(want) & np.isfinite(got)
    with np.errstate(invalid="ignore", over="ignore"):
        near = np.abs(got - want) <= tolerance.atol + tolerance.rtol * np.abs(want)
    passed = both_nan | (want == got) | (finite & near)
    if passed.all():
        return None
    outside = int(passed.size - np.count_nonzero(passed))
    return (
        f"{outside} of {passed.size} values differ from the source by more than "
        f"rtol {tolerance.rtol:g}, atol {tolerance.atol:g} ({_explained(expected, actual)})"
    )
