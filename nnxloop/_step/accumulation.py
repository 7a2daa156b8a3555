"""Gradient accumulation: one optimizer update from several micro-batches, inside the
compiled step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnxloop._step.loss import split_loss
from nnxloop._step.metric_values import is_metric_state


def accumulated_step(
    loss_fn: Callable[[nnx.Module, Any], Any],
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    group: Any,
) -> Any:
    """One update from the micro-batches stacked on `group`'s leading axis: a scan that
    sums each one's gradients of `loss_fn` (the model's other state, batch statistics and
    RNG counts, carried from one to the next), then one update with their mean. Metrics
    are the micro-batches' means."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n = jax.tree.leaves(group)[0].shape[0]

    def micro(carry, batch):
        rest, total = carry

        def loss(params, rest):
            # Fresh variables: those of `rest` belong to the scan body's trace.
            inner = nnx.merge(graphdef, params, rest, copy=True)
            value, metrics = split_loss(loss_fn(inner, batch))
            metrics = jax.tree.map(jnp.asarray, {"loss": value, **metrics})
            # Each micro-batch's share of the mean: the sum over them is the update's
            # gradient, with no buffer for a division after.
            return value / n, (metrics, nnx.split(inner, nnx.Param, ...)[2])

        (_, (metrics, rest)), grads = jax.value_and_grad(loss, has_aux=True)(params, rest)
        return (rest, jax.tree.map(jnp.add, total, grads)), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (rest, total), metrics = jax.lax.scan(micro, (rest, zeros), group)
    nnx.update(model, rest)
    optimizer.update(model, total)
    # Scalars: the micro-batches' mean; a metric state: their merge.
    return {
        k: v.reduce() if is_metric_state(v) else jnp.mean(v, axis=0) for k, v in metrics.items()
    }
