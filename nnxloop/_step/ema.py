"""An optimizer that keeps an exponential moving average (EMA) of the parameters it updates.

The average is flax's own `nnx.EMA`, held by the optimizer: it lives on the device with the
optimizer state, is updated inside the compiled step by every `optimizer.update` (the default
`train_step`'s, and an overriding one's alike), and is saved, restored and resumed with the
optimizer state, bit for bit.
"""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx


def check_decay(decay: Any) -> None:
    """Raises a `ValueError` unless `decay` is None or a float strictly between 0 and 1."""
    if decay is None:
        return
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ValueError(
            f"ema_decay must be a number between 0 and 1 (e.g. 0.999: each update moves the "
            f"average 0.1% of the way to the parameters), got {decay!r}."
        )


class EMAOptimizer(nnx.Optimizer):
    """`nnx.Optimizer` plus `ema`, an `nnx.EMA` of the model's `nnx.Param` variables, moved
    towards them after each update: `ema = decay * ema + (1 - decay) * params`. The average
    starts as a copy of the parameters as built (or as loaded before training)."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *, decay: float):
        super().__init__(model, tx, wrt=nnx.Param)
        self.ema = nnx.EMA(model, decay, only=nnx.Param)

    def update(self, model: Any, grads: Any, /, **kwargs: Any) -> Any:
        updates = super().update(model, grads, **kwargs)
        self.ema.update(model)
        return updates
