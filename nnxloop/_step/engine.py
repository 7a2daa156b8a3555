"""The compiled step engine: pure, jitted functions of the flat training-state leaves.

The model and optimizer are split once into a graph definition (static, one per train/eval mode)
and a flat list of arrays. Every jitted call takes and returns flat lists, donates the state it
replaces, and accumulates metrics on device, so the per-step host work is one dispatch.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnxloop._data import batches as data_lib
from nnxloop._step.metric_values import (
    Metrics,
    as_metrics,
    check_additive,
    computed,
    empty_state,
    host_value,
    is_metric_state,
)
from nnxloop._step.placement import partition_specs, place_all

log = logging.getLogger("nnxloop")


@flax.struct.dataclass
class Step:
    """What a `train_step` that asks for it is told about its update (traced values).

    Attributes:
        number: this update's number, counted from 1 over the whole run: the optimizer's
            update count plus one, so it is checkpointed and a resumed run goes on counting.
            After the update, `trainer.step` equals it.
        key: a PRNG key for this update alone, `fold_in(base key, number)`: the same at the
            same update in any run with the same `seed`, resumed or not.
    """

    number: jax.Array
    key: jax.Array


def _wants_step(train_step: Callable[..., Any]) -> bool:
    """Whether `train_step` takes a fourth argument (a `Step`) after model, optimizer, batch."""
    try:
        params = inspect.signature(train_step).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4


class StepEngine:
    """Owns the flat training state of one trainer and the compiled functions that advance it.

    The state leaves are the source of truth while a `fit`, `evaluate` or `predict` call runs;
    `sync_to_objects` writes them back into the model and optimizer objects.
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        mesh: Mesh,
        train_step: Callable[..., Any],
        eval_step: Callable[..., Any],
        predict_step: Callable[..., Any],
        step_seed: int = 0,
        grouped: bool = False,
        evaluate_ema: bool = False,
    ):
        self.model = model
        self.grouped = grouped  # each training batch is the micro-batches of one update
        self.evaluate_ema = evaluate_ema  # the optimizer's `ema` is evaluated too
        self.optimizer = optimizer
        self.mesh = mesh
        self._train_step = train_step
        self._wants_step = _wants_step(train_step)
        self._step_seed = step_seed
        self._eval_step = eval_step
        self._predict_step = predict_step
        self._replicated = NamedSharding(mesh, PartitionSpec())

        model.eval()
        self._graphdef_eval, state = nnx.split((model, optimizer))
        model.train()
        self._graphdef_train, state = nnx.split((model, optimizer))
        self._batch_shapes: set[tuple[Any, ...]] = set()
        self._warned_shapes = False
        leaves, self._treedef = jax.tree.flatten(state)
        self.paths = [
            jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
        ]
        self._state_shardings = self._shardings_for(state)
        self.leaves: list[jax.Array] = []
        self._train_fns: dict[tuple[str, int], Any] = {}
        batch_sharding = data_lib.batch_sharding(mesh)
        # Host batches go straight into the jitted call, which shards them along `data` on the
        # way in: far cheaper per step than a separate jax.device_put.
        self._eval_fn = jax.jit(
            self._eval_impl,
            donate_argnums=(1,),
            in_shardings=(self._state_shardings, self._replicated, batch_sharding),
        )
        self._predict_fn = jax.jit(
            self._predict_impl, in_shardings=(self._state_shardings, batch_sharding)
        )
        self.metric_names: tuple[str, ...] | None = None
        self._zero_acc = None
        self._eval_shapes: Any = None
        self.load_from_objects()

    # -- state ----------------------------------------------------------------------------

    def _shardings_for(self, state: nnx.State) -> list[NamedSharding]:
        """Each leaf's sharding on the mesh, from its `nnx.with_partitioning` annotation."""
        return [NamedSharding(self.mesh, spec) for _, spec in partition_specs(state, self.mesh)]

    def load_from_objects(self) -> None:
        """Takes the current values of the model and optimizer objects as the training state."""
        state = nnx.state((self.model, self.optimizer))
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self._treedef:
            raise ValueError(
                "The model or optimizer changed structure since the Trainer was built (a variable "
                "was added or removed); build a new Trainer for the new structure."
            )
        self.leaves = place_all(leaves, self._state_shardings)

    def set_leaves(self, leaves: list[jax.Array]) -> None:
        """Replaces the training state (e.g. restored arrays), placed on the state shardings."""
        if len(leaves) != len(self.leaves):
            raise ValueError(f"Expected {len(self.leaves)} state arrays, got {len(leaves)}.")
        self.leaves = place_all(leaves, self._state_shardings, copy=False)

    def state(self) -> nnx.State:
        """The training state as the `(model, optimizer)` state tree (the engine's own arrays)."""
        return jax.tree.unflatten(self._treedef, self.leaves)

    def abstract_state(self) -> nnx.State:
        """Shapes, dtypes and shardings of the training state, for restoring into."""
        return jax.tree.unflatten(
            self._treedef,
            [
                jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
                for leaf, sharding in zip(self.leaves, self._state_shardings)
            ],
        )

    def sync_to_objects(self) -> None:
        """Writes the state leaves into the model and optimizer objects (copies, see above)."""
        copies = place_all(self.leaves, [leaf.sharding for leaf in self.leaves])
        nnx.update((self.model, self.optimizer), jax.tree.unflatten(self._treedef, copies))

    # -- traced bodies --------------------------------------------------------------------

    def _merge(self, graphdef, leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(self._treedef, leaves))

    def _one_train_step(self, leaves, batch):
        model, optimizer = self._merge(self._graphdef_train, leaves)
        if self._wants_step:
            number = jnp.asarray(optimizer.step[...], jnp.int32) + 1
            key = jax.random.fold_in(jax.random.key(self._step_seed), number)
            out = self._train_step(model, optimizer, batch, Step(number=number, key=key))
        else:
            out = self._train_step(model, optimizer, batch)
        metrics = as_metrics(out, "train_step")
        new_leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
        if treedef != self._treedef:
            raise ValueError(
                "train_step changed the structure of the model or optimizer state; it may only "
                "update the values of existing variables."
            )
        return new_leaves, metrics

    def _accumulate(self, acc, metrics, weight):
        """Adds a step's (or an evaluation batch's) metrics into `acc`: scalars weighted, a
        metric state merged (for training metrics, whose states are checked to add, the
        same as summing them)."""
        sums, count = acc
        sums = {
            k: sums[k].merge(metrics[k])
            if is_metric_state(sums[k])
            else sums[k] + metrics[k] * weight
            for k in sums
        }
        return sums, count + weight

    def _train_impl(self, leaves, acc, xs, stacked, batch_of=lambda x: x):
        """One step on `batch_of(xs)`, or (`stacked`) a scan of steps over the leading axis of
        `xs`; `xs` is the batch(es) themselves, or indices into staged data."""
        if not stacked:
            leaves, metrics = self._one_train_step(leaves, batch_of(xs))
            return leaves, self._accumulate(acc, metrics, 1.0), computed(metrics)

        def body(carry, x):
            leaves, acc = carry
            leaves, metrics = self._one_train_step(leaves, batch_of(x))
            return (leaves, self._accumulate(acc, metrics, 1.0)), computed(metrics)

        (leaves, acc), metrics = jax.lax.scan(body, (leaves, acc), xs)
        return leaves, acc, metrics

    def _staged_impl(self, leaves, acc, data, start, steps):
        def batch_of(i):
            return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), data)

        indices = start + jnp.arange(steps, dtype=start.dtype)
        return self._train_impl(leaves, acc, indices, True, batch_of)

    def _eval_metrics(self, leaves, batch):
        """`eval_step`'s metrics of the model, and (`evaluate_ema`) of the model with the
        optimizer's averaged parameters, as `ema_<name>`."""
        model, optimizer = self._merge(self._graphdef_eval, leaves)
        metrics = as_metrics(self._eval_step(model, batch), "eval_step")
        if self.evaluate_ema:
            averaged = optimizer.ema.apply_to(model)
            ema = as_metrics(self._eval_step(averaged, batch), "eval_step")
            metrics.update({f"ema_{k}": v for k, v in ema.items()})
        return metrics

    def _eval_impl(self, leaves, acc, batch):
        metrics = self._eval_metrics(leaves, batch)
        size = jax.tree.leaves(batch)[0].shape[0]
        return self._accumulate(acc, metrics, float(size))

    def _predict_impl(self, leaves, batch):
        model, _ = self._merge(self._graphdef_eval, leaves)
        return self._predict_step(model, batch)

    # -- host API -------------------------------------------------------------------------

    def _zeros(self, shapes: Mapping[str, Any]) -> tuple[Metrics, jax.Array]:
        """A fresh accumulator for metrics shaped as `shapes` (from `eval_shape`): zeros, and
        for a metric state its `empty()` when that has the state's shapes (else all zeros)."""
        zeros = {k: empty_state(v) for k, v in shapes.items()}
        return jax.device_put((zeros, np.zeros((), np.float32)), self._replicated)

    def _abstract_leaves(self):
        return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self.leaves]

    def zero_accumulator(self, batch: Any) -> tuple[Metrics, jax.Array]:
        """A fresh on-device accumulator for the training metrics of batches like `batch`.

        The first call traces one train step abstractly (no compile, no compute) to learn the
        metric names.
        """
        if self.metric_names is None:
            with jax.set_mesh(self.mesh):
                _, metrics = jax.eval_shape(self._one_train_step, self._abstract_leaves(), batch)
            for name, value in metrics.items():
                if is_metric_state(value):
                    check_additive(name, value)
            self.metric_names = tuple(metrics)
            self._zero_acc = self._zeros(metrics)  # never donated: one serves all
        return self._zero_acc

    def _compiled(self, key: tuple[str, int], impl, data_sharding, *more_shardings):
        """The jitted training function for `key`, compiled on first use: `impl(leaves, acc,
        data, *more)` donating only the state leaves. The accumulator is not donated: an old
        one stays readable, so metrics are read from the device without stopping the dispatch
        queue."""
        fn = self._train_fns.get(key)
        if fn is None:
            fn = jax.jit(
                impl,
                donate_argnums=(0,),
                in_shardings=(
                    self._state_shardings,
                    self._replicated,
                    data_sharding,
                    *more_shardings,
                ),
                out_shardings=(self._state_shardings, self._replicated, self._replicated),
            )
            self._train_fns[key] = fn
        return fn

    def _train_fn(self, stacked: bool):
        fn = self._train_fns.get(("host", stacked))
        if fn is not None:  # (the shardings below cost ~20 us to build: not on every step)
            return fn
        return self._compiled(
            ("host", stacked),
            lambda leaves, acc, batch: self._train_impl(leaves, acc, batch, stacked),
            data_lib.batch_sharding(self.mesh, stacked=stacked, grouped=self.grouped),
        )

    def _staged_fn(self, steps: int):
        fn = self._train_fns.get(("staged", steps))
        if fn is not None:
            return fn
        return self._compiled(
            ("staged", steps),
            lambda leaves, acc, data, start: self._staged_impl(leaves, acc, data, start, steps),
            data_lib.batch_sharding(self.mesh, stacked=True, grouped=self.grouped),
            self._replicated,
        )

    def train_staged(self, acc, data, start: int, steps: int):
        """Like `train` with `stacked`, scanning `steps` consecutive batches of staged `data`
        (each leaf `[N, batch, ...]` on the device) from index `start`: nothing crosses from
        the host but the index."""
        with jax.set_mesh(self.mesh):
            self.leaves, acc, metrics = self._staged_fn(steps)(
                self.leaves, acc, data, np.int32(start)
            )
        return acc, metrics

    def train(self, acc, batch, *, stacked: bool):
        """Runs one step (or, `stacked`, one step per leading slice of `batch`) asynchronously.

        Returns the new accumulator and the step metrics (stacked when `stacked`), on device.
        """
        fn = self._train_fn(stacked)
        # How many shapes jit has compiled for (jax's own cache; absent: no warning).
        cache_size = getattr(fn, "_cache_size", None)
        compiled = cache_size() if cache_size else None
        with jax.set_mesh(self.mesh):  # user code may name mesh axes (Explicit sharding)
            self.leaves, acc, metrics = fn(self.leaves, acc, batch)
        if cache_size and cache_size() != compiled:
            self._compiled_for(batch, stacked)
        return acc, metrics

    def memory_analysis(self, batch: Any) -> Any:
        """XLA's memory analysis of the compiled training step for batches like `batch` (with
        gradient accumulation, the micro-batches of one update stacked on a leading axis):
        argument, output, alias and temporary sizes in bytes. Compiles, runs nothing."""
        acc = self.zero_accumulator(batch)
        with jax.set_mesh(self.mesh):
            lowered = self._train_fn(False).lower(self._abstract_leaves(), acc, batch)
        return lowered.compile().memory_analysis()

    def _compiled_for(self, batch: Any, stacked: bool) -> None:
        """Notes that the step was compiled for `batch`'s shapes; warns once when a third
        shape needs a compile (one shape, plus a smaller last batch, is expected)."""
        shapes = tuple(np.shape(x)[1:] if stacked else np.shape(x) for x in jax.tree.leaves(batch))
        self._batch_shapes.add(shapes)
        if len(self._batch_shapes) > 2 and not self._warned_shapes:
            self._warned_shapes = True
            seen = "; ".join(" ".join(map(str, s)) for s in sorted(self._batch_shapes))
            log.warning(
                "The train step was compiled again, for a %d%s batch shape (shapes seen: %s). "
                "Each new batch shape compiles the step anew, which can make training many "
                "times slower: pad batches to one shape, or drop the last partial batch (e.g. "
                "grain's .batch(n, drop_remainder=True)).",
                len(self._batch_shapes),
                "rd" if len(self._batch_shapes) == 3 else "th",
                seen,
            )

    def evaluate(self, batches) -> dict[str, float]:
        """Averages `eval_step` metrics over all batches, weighting each by its size."""
        with jax.set_mesh(self.mesh):
            acc = self._evaluate(batches)
        if acc is None:
            raise ValueError("The evaluation data yielded no batches.")
        sums, count = jax.device_get(acc)
        return {
            k: host_value(k, v) if is_metric_state(v) else float(v) / float(count)
            for k, v in sums.items()
        }

    def _evaluate(self, batches):
        acc = None
        for batch in batches:
            if acc is None:
                shapes = self._eval_shapes
                if shapes is None:
                    shapes = self._eval_shapes = jax.eval_shape(
                        self._eval_metrics, self._abstract_leaves(), batch
                    )
                acc = self._zeros(shapes)
            acc = self._eval_fn(self.leaves, acc, batch)
        return acc

    def predict(self, batch):
        with jax.set_mesh(self.mesh):
            return self._predict_fn(self.leaves, batch)
