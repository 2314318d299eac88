"""The numeric contract: how far a float output may move when it is computed under other settings.

tfmerge's own check needs no tolerance: it runs the source graph and the merged model under
the same session settings (``check_session_config``), so identical kernels see identical
inputs and the outputs must be identical bit for bit. Any comparison across different
settings (Grappler on one side and off on the other, oneDNN on or off, another instruction set,
another thread count) uses these tolerances instead: an element passes when

    |actual - expected| <= atol + rtol * |expected|

computed in float64, with NaN equal to NaN and an infinity equal only to itself. Integers,
booleans and strings are compared exactly, whatever the settings.

The values are the largest deviations measured between ten session settings on real
architectures, with a margin of at least 4.9 (``bench/numeric.py``; the measurement is in
docs/serving.md). Values near zero need ``atol``: there, a few ulps of the larger values that
summed to them are a large part of their own size (a logit of 9.4e-6 came out as 1.27e-5).

No numpy here: the supervisor reads these values with the configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Tolerance:
    """How close two floats of one dtype must be: ``|a - b| <= atol + rtol * |b|``."""

    rtol: float
    atol: float


#: Per float dtype, by its numpy and TensorFlow name. The worst measured case of each, as a
#: fraction of this bound: float32 0.19, float16 0.20, bfloat16 0.05, float64 below 0.016.
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "float16": Tolerance(rtol=5e-2, atol=5e-2),
        "bfloat16": Tolerance(rtol=5e-2, atol=1e-1),
        "float32": Tolerance(rtol=1e-3, atol=1e-3),
        "float64": Tolerance(rtol=1e-10, atol=1e-11),
    }
)

#: A complex number is held to the tolerance of its parts' dtype, on its modulus.
_PART_DTYPE = {"complex64": "float32", "complex128": "float64"}


def tolerance_for(
    dtype_name: str, tolerances: Mapping[str, Tolerance] = DEFAULT_TOLERANCES
) -> Tolerance | None:
    """The tolerance for values of dtype_name; None when they must be equal exactly."""
    return tolerances.get(_PART_DTYPE.get(dtype_name, dtype_name))
