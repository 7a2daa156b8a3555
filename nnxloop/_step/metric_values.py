"""What a step's metrics may be: scalars (made float32) or mergeable metric states
(`clu.metrics.Metric`), checked, computed inside the step, and read on the host."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

Metrics = dict[str, jax.Array]


def is_metric_state(value: Any) -> bool:
    """Whether `value` is a mergeable metric state (a `clu.metrics.Metric`)."""
    return isinstance(value, clu_metrics.Metric)


def as_metrics(out: Any, where: str) -> Metrics:
    """`out` checked as a dict of metric name to a scalar (made float32) or a mergeable metric
    state (a `clu.metrics.Metric`, kept as it is)."""
    if not isinstance(out, Mapping):
        raise TypeError(
            f"{where} must return a dict of metric name to scalar array, got {type(out).__name__}."
        )
    metrics = {}
    for name, value in out.items():
        if not isinstance(name, str):
            raise TypeError(
                f"{where} returned a metric named {name!r} ({type(name).__name__}); metric names "
                "must be strings, e.g. 'accuracy', as they are logged and monitored by name."
            )
        if is_metric_state(value):
            metrics[name] = value
            continue
        value = jnp.asarray(value)
        if value.shape != ():
            raise ValueError(
                f"{where} returned metric {name!r} with shape {value.shape}; metrics must be "
                "scalars (reduce over the batch, e.g. with .mean()) or mergeable metric states "
                "(a clu.metrics.Metric, e.g. clu.metrics.Average.from_model_output(values))."
            )
        metrics[name] = value.astype(jnp.float32)
    return metrics


def computed(metrics: Mapping[str, Any]) -> Metrics:
    """Each training metric as a float32 scalar: a metric state computed, traced inside the
    step (for each step's logs).

    Raises:
        TypeError: a state's `compute()` cannot be traced (it uses NumPy on the values).
    """
    out = {}
    for k, v in metrics.items():
        if not is_metric_state(v):
            out[k] = v
            continue
        try:
            out[k] = jnp.asarray(v.compute(), jnp.float32)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError(
                f"The training metric {k!r} ({type(v).__name__}) cannot be computed inside the "
                "compiled step, where each step's value is computed for its logs: its compute() "
                "turns traced values into NumPy arrays. Use jax.numpy in compute(), or return "
                "the metric from eval_step only (computed once, on the host, where NumPy works)."
            ) from e
    return out


def check_additive(name: str, state: Any) -> None:
    """Training metric states are summed over windows (and differenced): refuses a state
    whose `merge` is not the sum of its arrays (clu's `LastValue`, `CollectingMetric`)."""
    ones = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), state)
    try:
        merged = ones.merge(ones)
        additive = jax.tree.structure(merged) == jax.tree.structure(ones) and all(
            np.shape(m) == np.shape(o) and np.array_equal(np.asarray(m), 2 * o)
            for m, o in zip(jax.tree.leaves(merged), jax.tree.leaves(ones))
        )
    except Exception:
        additive = False
    if not additive:
        raise ValueError(
            f"The training metric {name!r} is a {type(state).__name__}, whose merge is not the "
            "sum of its arrays; training metrics are summed over steps and averaged over "
            "windows (epochs, log lines) by differences, so their states must add (as clu's "
            "Average, Accuracy and Std do, and counts). Return it from eval_step instead, or "
            "return a scalar."
        )


def empty_state(shape: Any) -> Any:
    """The starting value of an accumulator entry shaped as `shape`: a metric state's own
    `empty()` where it has the same arrays (a maximum starts at -inf, not 0), else zeros."""
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shape)
    if not is_metric_state(shape):
        return zeros
    try:
        empty = type(shape).empty()
    except Exception:  # an empty() that needs arguments, or none at all
        return zeros
    fits = jax.tree.structure(empty) == jax.tree.structure(zeros) and all(
        np.shape(e) == z.shape and np.asarray(e).dtype == z.dtype
        for e, z in zip(jax.tree.leaves(empty), jax.tree.leaves(zeros))
    )
    return jax.tree.map(np.asarray, empty) if fits else zeros


def host_value(name: str, state: Any) -> float:
    """A merged metric state's value on the host, as a float."""
    value = np.asarray(state.compute())
    if value.shape != ():
        raise ValueError(
            f"Metric {name!r} ({type(state).__name__}) computes to an array of shape "
            f"{value.shape}; metrics are logged as scalars: make compute() return one number "
            "(e.g. a macro average), or one metric per number you want to see."
        )
    return float(value)
