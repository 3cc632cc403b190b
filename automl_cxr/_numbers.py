"""Numbers as records hold them: a value may be missing (None), not a number, NaN or infinite
(a metric undefined on a fold); one set of rules for reading and showing them everywhere."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["clip01", "finite_or_nan", "finite_or_none", "fmt_num", "is_number"]


def is_number(value: Any) -> bool:
    """Whether `value` is a real number (Python or NumPy int/float, NaN included; not a bool)."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def finite_or_none(x: Any) -> float | None:
    """`x` as a float, or None when it is missing, not a number, NaN or infinite."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def finite_or_nan(x: Any) -> float:
    """`x` as a float, NaN when it is missing, not a number or infinite."""
    v = finite_or_none(x)
    return math.nan if v is None else v


def clip01(x: Any) -> float | None:
    """A bound of an interval on a proportion or an AUC clipped to [0, 1] (t-intervals over
    few folds can pass 1); None when `x` is not a finite number."""
    v = finite_or_none(x)
    return None if v is None else min(1.0, max(0.0, v))


def fmt_num(x: Any, spec: str = ".3f", missing: str = "-") -> str:
    """`x` formatted with `spec`, or `missing` when it is not a finite number."""
    v = finite_or_none(x)
    return missing if v is None else format(v, spec)
