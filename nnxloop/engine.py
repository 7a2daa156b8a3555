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
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnxloop import data as data_lib

log = logging.getLogger("nnxloop")

Metrics = dict[str, jax.Array]


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


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _laid_out(x: jax.Array, sharding: NamedSharding) -> bool:
    """Whether `x` already has `sharding`: the same mesh (axis types included: an array on an
    Explicit mesh does not run under an Auto one) and the same layout (P() and P(None) alike)."""
    have = x.sharding
    return have == sharding or (
        isinstance(have, NamedSharding)
        and have.mesh == sharding.mesh
        and have.is_equivalent_to(sharding, x.ndim)
    )


# Copies on the devices the arrays are on (so valid in any mesh context), all in one call.
_copies = jax.jit(lambda xs: [jnp.array(x, copy=True) for x in xs])


def _buffers(x: Any) -> set[int]:
    if isinstance(x, jax.Array):
        return {shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards}
    if isinstance(x, np.ndarray):
        return {x.__array_interface__["data"][0]}
    return set()


def _unshared(moved: jax.Array, source: Any) -> jax.Array:
    """`moved` (just placed from `source`) with no buffer shared with `source`.

    `device_put` keeps the source's buffer for the shard on the device the source is on (a
    replicated layout, even with `may_alias=False`); only such shards are copied, each by a
    device-to-same-device transfer, so nothing is compiled (a jitted copy would compile once
    per leaf shape: seconds of start-up for a model with many).
    """
    source_buffers = _buffers(source)
    shards = moved.addressable_shards
    if not any(s.data.unsafe_buffer_pointer() in source_buffers for s in shards):
        return moved
    pieces = [
        jax.device_put(s.data, s.device, may_alias=False)
        if s.data.unsafe_buffer_pointer() in source_buffers
        else s.data
        for s in shards
    ]
    return jax.make_array_from_single_device_arrays(moved.shape, moved.sharding, pieces)


def _assembled(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` (the same value on every process) laid out with a sharding whose mesh spans
    several processes, built from this process's device pieces, each a buffer of its own.

    `device_put` of a device array to such a sharding is not usable when the process has one
    device: the result's one shard is the array itself with the global sharding, and reading
    its shards fails. So each of this process's devices gets its piece directly: the whole
    array by a device-to-device copy (nothing compiled) where the piece is all of it, a slice
    of one host copy otherwise.
    """
    shape = np.shape(x)
    host = None if isinstance(x, jax.Array) else np.asarray(x)
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        whole = all(
            isinstance(i, slice) and i.indices(n) == (0, n, 1) for i, n in zip(index, shape)
        )
        if whole and host is None:
            pieces.append(jax.device_put(x, device, may_alias=False))
            continue
        if host is None:
            host = np.asarray(x)
        pieces.append(jax.device_put(np.array(host[index]), device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def place_all(
    leaves: list[Any], shardings: list[NamedSharding], *, copy: bool = True
) -> list[jax.Array]:
    """`leaves` laid out with `shardings` (also across processes, also for PRNG keys).

    With `copy`, no result shares a buffer with its leaf: donating the engine's buffers must
    not delete arrays a user still holds. (`device_put(..., may_alias=False)` is not enough:
    over several devices it can still reuse the source buffer for one shard.) Leaves already
    laid out so are copied by one jitted call; a leaf that moves is copied as soon as it has
    moved, so that no more than one moved leaf is held twice at a time.
    """
    out = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    in_place = []
    for i, (x, sharding) in enumerate(zip(out, shardings)):
        if isinstance(x, jax.Array) and _laid_out(x, sharding):
            in_place.append(i)
            continue
        if not sharding.is_fully_addressable:
            out[i] = _assembled(x, sharding)  # a buffer of its own on each device
            continue
        moved = jax.device_put(x, sharding)
        out[i] = _unshared(moved, x) if copy else moved
    if copy and in_place:
        for i, x in zip(in_place, _copies([out[i] for i in in_place])):
            out[i] = x
    return [
        jax.random.wrap_key_data(x, impl=jax.random.key_impl(leaf)) if _is_key(leaf) else x
        for x, leaf in zip(out, leaves)
    ]


def partition_specs(tree: Any, mesh: Mesh) -> list[tuple[str, PartitionSpec]]:
    """`(path, spec)` for each leaf of a state tree, checked against the mesh's axes.

    Raises:
        ValueError: a variable is annotated with an axis the mesh lacks (names it).
    """
    specs = nnx.get_partition_spec(tree)
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    axes = set(mesh.axis_names)
    out = []
    for path, spec in zip(paths, spec_leaves):
        spec = spec or PartitionSpec()
        named = set()
        for entry in spec:
            named.update(entry if isinstance(entry, tuple) else (entry,) if entry else ())
        if named - axes:
            raise ValueError(
                f"Variable {path} is partitioned over mesh axes {sorted(named - axes)}, but the "
                f"Trainer's mesh has axes {mesh.axis_names}. Pass mesh= a mesh with those axes "
                "(and build the model inside `with jax.set_mesh(mesh):`)."
            )
        out.append((path, spec))
    return out


def is_metric_state(value: Any) -> bool:
    """Whether `value` is a mergeable metric state (a `clu.metrics.Metric`)."""
    return isinstance(value, clu_metrics.Metric)


def _as_metrics(out: Any, where: str) -> Metrics:
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


def _check_additive(name: str, state: Any) -> None:
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


def _empty(shape: Any) -> Any:
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
        metrics = _as_metrics(out, "train_step")
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
        metrics = _as_metrics(self._eval_step(model, batch), "eval_step")
        if self.evaluate_ema:
            averaged = optimizer.ema.apply_to(model)
            ema = _as_metrics(self._eval_step(averaged, batch), "eval_step")
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
        zeros = {k: _empty(v) for k, v in shapes.items()}
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
                    _check_additive(name, value)
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
