"""Validation of regularization values λ (the damping added to a block's curvature)."""

from __future__ import annotations

import math
from numbers import Real


def check_regularization(
    value: object, *, block: str | None = None, positive: bool = False, allow_none: bool = True
) -> float | None:
    """Return ``value`` as a float (or None), or raise a ``ValueError`` that names the block.

    ``positive`` requires λ > 0 (methods whose inverse needs damping); otherwise λ ≥ 0.
    """
    where = f" for block {block!r}" if block is not None else ""
    if value is None:
        if allow_none and not positive:
            return None
        raise ValueError(f"A positive regularization is required{where}, got None.")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"The regularization{where} must be a number, got {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"The regularization{where} must be finite, got {number}.")
    if positive and number <= 0.0:
        raise ValueError(f"The regularization{where} must be positive, got {number}.")
    if number < 0.0:
        raise ValueError(f"The regularization{where} must be non-negative, got {number}.")
    return number
