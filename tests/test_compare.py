"""The numeric contract in code: exact comparison under the same settings, tolerance across them."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tfmerge.build.compare import Difference, difference, outputs_close, outputs_equal
from tfmerge.tolerance import DEFAULT_TOLERANCES, Tolerance, tolerance_for

REPO = Path(__file__).resolve().parent.parent


def test_floats_within_the_tolerance_pass_and_beyond_it_fail_with_both_differences() -> None:
    expected = np.array([1.0, 100.0, 0.0], dtype=np.float32)
    # float32: atol 1e-3 + rtol 1e-3 * |expected|.
    inside = expected + np.array([1.9e-3, 0.1, 9e-4], dtype=np.float32)
    outside = expected + np.array([0.0, 0.2, 0.0], dtype=np.float32)

    assert outputs_close(expected, inside) is None
    reason = outputs_close(expected, outside)
    assert reason is not None
    assert reason.startswith("1 of 3 values differ from the source by more than rtol 0.001")
    assert "max abs difference 0.2" in reason
    assert "max rel difference 0.002" in reason


def test_the_same_values_under_the_same_settings_must_be_identical() -> None:
    expected = np.array([0.1, np.nan, -np.inf], dtype=np.float32)
    one_ulp = np.nextafter(expected, np.float32(1)).astype(np.float32)

    assert outputs_equal(expected, expected.copy()) is None
    reason = outputs_equal(expected, np.where(np.isfinite(expected), one_ulp, expected))
    assert reason is not None
    assert reason.startswith("values differ from the source (max abs difference 7.45e-09")
    assert outputs_close(expected, np.where(np.isfinite(expected), one_ulp, expected)) is None


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        (np.array([1, 2], dtype=np.int32), np.array([1, 3], dtype=np.int32)),
        (np.array([True, False]), np.array([True, True])),
        (np.array([b"a", b"b"], dtype=object), np.array([b"a", b"c"], dtype=object)),
    ],
    ids=["int32", "bool", "string"],
)
def test_integers_booleans_and_strings_are_exact_whatever_the_tolerance(
    expected: np.ndarray, actual: np.ndarray
) -> None:
    loose = {name: Tolerance(rtol=1.0, atol=10.0) for name in DEFAULT_TOLERANCES}
    assert outputs_close(expected, actual, loose) == "values differ from the source"
    assert outputs_close(expected, expected.copy(), loose) is None


def test_nan_matches_only_nan_and_infinity_only_itself() -> None:
    expected = np.array([np.nan, np.inf, 1.0], dtype=np.float64)

    assert outputs_close(expected, expected.copy()) is None
    reason = outputs_close(expected, np.array([0.0, np.inf, 1.0]))
    assert reason is not None
    assert "1 NaN or infinite values unmatched" in reason
    assert outputs_close(expected, np.array([np.nan, -np.inf, 1.0])) is not None
    assert outputs_close(expected, np.array([np.nan, 1e308, 1.0])) is not None


def test_dtype_and_shape_must_match() -> None:
    expected = np.zeros((2, 3), dtype=np.float32)
    assert outputs_close(expected, np.zeros((2, 3), dtype=np.float64)) == (
        "dtype float64 != source float32"
    )
    assert outputs_close(expected, np.zeros((3, 2), dtype=np.float32)) == (
        "shape (3, 2) != source (2, 3)"
    )


def test_bfloat16_and_complex_use_their_float_tolerance() -> None:
    expected = np.array([1.0, 2.0], dtype=ml_dtypes.bfloat16)
    # One bfloat16 ulp at 2 is 2 ** -6.
    actual = np.array([1.0, 2.0 + 2**-6], dtype=ml_dtypes.bfloat16)
    assert outputs_close(expected, actual) is None
    assert outputs_equal(expected, actual) is not None
    assert difference(expected, actual) == Difference(max_abs=2**-6, max_rel=2**-7)

    assert tolerance_for("complex64") == DEFAULT_TOLERANCES["float32"]
    z = np.array([1 + 1j], dtype=np.complex64)
    assert outputs_close(z, z + np.complex64(5e-4j)) is None
    assert outputs_close(z, z + np.complex64(5e-3j)) is not None


def test_relative_difference_stays_finite_where_the_source_is_zero() -> None:
    gap = difference(np.zeros(2, np.float32), np.array([0.0, 1e-30], np.float32))
    assert gap.max_abs == pytest.approx(1e-30)
    assert np.isfinite(gap.max_rel)
    assert gap.max_rel > 1e7


_FLOATS = hnp.arrays(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
)


@given(_FLOATS)
def test_any_array_matches_itself(values: np.ndarray) -> None:
    assert outputs_equal(values, values.copy()) is None
    assert outputs_close(values, values.copy()) is None


@given(_FLOATS, st.floats(min_value=-0.99, max_value=0.99))
def test_a_difference_inside_the_bound_passes(values: np.ndarray, fraction: float) -> None:
    tolerance = DEFAULT_TOLERANCES[values.dtype.name]
    wide = values.astype(np.float64)
    finite = np.isfinite(wide) & (np.abs(wide) < np.finfo(values.dtype).max / 2)
    bound = tolerance.atol + tolerance.rtol * np.abs(np.where(finite, wide, 0.0))
    moved = np.where(finite, wide + fraction * bound, wide).astype(values.dtype)
    # Rounding back to the dtype adds at most half an ulp: less than the 1% of each bound
    # that |fraction| <= 0.99 leaves, for every dtype's tolerance.
    assert outputs_close(values, moved) is None


def test_the_documented_tolerances_are_the_ones_in_code() -> None:
    """docs/serving.md states the contract; its table must be the values tfmerge applies."""
    text = (REPO / "docs" / "serving.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([0-9.e+-]+) \| ([0-9.e+-]+) \|", text, re.MULTILINE)
    documented = {name: Tolerance(float(rtol), float(atol)) for name, rtol, atol in rows}
    assert documented == dict(DEFAULT_TOLERANCES)
