"""The `loss_fn` contract: a scalar loss, or a `(loss, metrics)` pair."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def split_loss(out: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Normalises a `loss_fn` result, `loss` or `(loss, metrics)`, to `(loss, metrics)`."""
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(
                "loss_fn must return a scalar loss or a (loss, metrics_dict) pair; got a tuple "
                f"of {len(out)} items."
            )
        return out[0], dict(out[1])
    return out, {}
