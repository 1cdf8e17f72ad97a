"""Checks of the plain-number arguments of the spectral tools (iterations, threads, radii).

NumPy's scalars (``np.int64`` from a config array, ``np.float32`` from a computed radius) are
numbers like Python's: they are taken, as Python ints and floats; bools are not.
"""

from __future__ import annotations

import math
import numbers


def positive_int(value, what: str, *, none: bool = False) -> int | None:
    """``value`` as a Python int of at least 1 (or None, where ``none``), else a ``ValueError``
    naming ``what``.

    Example:
        >>> import numpy as np
        >>> positive_int(np.int64(3), "iterations")
        3
    """
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be {'None or ' if none else ''}a positive int, got {value!r}")
    return int(value)


def finite_number(value, what: str, *, positive: bool = True) -> float:
    """``value`` as a Python float, finite and above 0 (at least 0 where not ``positive``), else a
    ``ValueError`` naming ``what``.

    Example:
        >>> import numpy as np
        >>> finite_number(np.float32(0.5), "radius")
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        ok = False
    else:
        ok = value > 0 if positive else value >= 0
    if not ok:
        raise ValueError(f"{what} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return float(value)
