"""Which value of a monitored metric is best: the one rule every ranker follows.

`mode="min"`: lower is better; `"max"`: higher is better. NaN and infinite values are never
best: they rank below every finite value, and never count as an improvement.
"""

from __future__ import annotations

import math


def check_mode(mode: str) -> None:
    """Raises a `ValueError` unless `mode` is `"min"` or `"max"`."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")


def score(value: float, mode: str) -> float:
    """`value` as a number where larger is better, -inf when it is not finite."""
    value = float(value)
    if not math.isfinite(value):
        return -math.inf
    return -value if mode == "min" else value


def improves(value: float, reference: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` is better than `reference` by more than `min_delta` (any finite value
    improves on no reference)."""
    if score(value, mode) == -math.inf:
        return False
    if reference is None:
        return True
    return score(value, mode) > score(reference, mode) + min_delta
