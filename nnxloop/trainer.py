"""`Trainer`: drives the compiled steps and sends events to callbacks."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nnxloop._data import batches as data_lib
from nnxloop._data.feed import group
from nnxloop._protocol.callback import Callback, CallbackList
from nnxloop._rules.checks import positive_int
from nnxloop._rules.tree_paths import key_parts
from nnxloop._run.history import History
from nnxloop._run.progress import wanted
from nnxloop._run.run import FitRun, Progress, Settings
from nnxloop._step.accumulation import accumulated_step
from nnxloop._step.ema import EMAOptimizer, check_decay
from nnxloop._step.engine import StepEngine
from nnxloop._step.loss import split_loss
from nnxloop._step.placement import partition_specs, place_all

log = logging.getLogger("nnxloop")


def _overrides(obj: Any, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(Trainer, name)


def _reseed(model: nnx.Module, seed: int) -> None:
    tags = {node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
    base = jax.random.key(seed)
    keys = {tag: jax.random.fold_in(base, zlib.crc32(tag.encode())) for tag in tags}
    if keys:
        nnx.reseed(model, policy="match_shape", **keys)


class Trainer:
    """Trains a Flax NNX model with compiled steps and sends events to callbacks.

    Args:
        model: any `flax.nnx.Module` (BatchNorm statistics and `nnx.Rngs` included).
        tx: any `optax.GradientTransformation`.
        loss_fn: `loss_fn(model, batch) -> loss` or `-> (loss, metrics)`, traced under jit.
            Required unless a subclass overrides `loss_fn` or `train_step`.
        callbacks: `Callback` objects; their hooks are called in this order.
        mesh: the device mesh. `None` puts every device on one `data` axis.
        steps_per_dispatch: optimizer steps per jit call (`jax.lax.scan` over stacked batches).
            Larger values cut per-step overhead on small models; every step is still seen by
            callbacks and saves/evaluations still land on the steps they ask for.
        log_every_steps: how often the progress bar reads the training metrics from the device.
        progress: show a progress bar; `None` shows one when stderr is a terminal.
        seed: `None` (the default) trains with the RNG streams the model was built with
            (`nnx.Rngs(dropout=...)`), as the Flax tutorial loop does; an int reseeds every
            stream of the model from it. It also seeds the per-update key a `train_step`
            that takes a `step` argument gets (`None`: seed 0).
        stage_data: copy `train_data` that is a list or tuple of same-shaped batches to the
            device once per `fit` call, so that K-step dispatches (and, with K = 1, every
            step) stack, check and transfer no batch on the host: a K-step dispatch indexes
            the staged arrays inside its scan. `None` does so when at least the first two
            batches are alike and they fit in 256 MiB (at most 1/16 of an accelerator's
            memory), in a single-process run; `True` always (an error says why when it
            cannot); `False` never. A list that holds other batches at an epoch start
            (shuffled in `on_epoch_begin`, say) is staged anew; arrays changed in place
            during `fit` are not reliably seen, so treat them as read-only while it runs.
        gradient_accumulation_steps: each optimizer update averages the gradients of this
            many consecutive batches (micro-batches), computed one after another inside the
            compiled step (a `jax.lax.scan`), so only one micro-batch's activations are in
            memory at a time. `trainer.step`, `max_steps`, `eval_every_steps`, saves, logs
            and stops all count updates; training metrics are means over the micro-batches.
            The micro-batches of an update must be alike in shape; an epoch's last few
            batches that do not fill an update are left out (one warning says so). Needs
            the default `train_step` (override `loss_fn` instead, or use
            `optax.MultiSteps`, which counts micro-batches as steps).
        ema_decay: keep an exponential moving average of the parameters (flax's `nnx.EMA`,
            held by the optimizer as `trainer.optimizer.ema`), moved towards them by each
            update: `ema = decay * ema + (1 - decay) * params`. It is updated inside the
            compiled step, saved and resumed with the optimizer state, and every evaluation
            also reports the averaged weights' metrics (`val_ema_loss`, ...; `ema_loss` from
            `evaluate`). `nl.load_model(..., weights="ema")` loads them. None: no average.

    Example:
        ```python
        trainer = nl.Trainer(model, optax.adamw(1e-3), loss_fn=loss_fn)
        history = trainer.fit(train_batches, val_data=val_batches, epochs=3)
        ```
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        *,
        loss_fn: Any = None,
        callbacks: Sequence[Callback] = (),
        mesh: jax.sharding.Mesh | None = None,
        steps_per_dispatch: int = 1,
        log_every_steps: int = 50,
        progress: bool | None = None,
        seed: int | None = None,
        stage_data: bool | None = None,
        gradient_accumulation_steps: int = 1,
        ema_decay: float | None = None,
    ):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}.")
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}.")
        positive_int("steps_per_dispatch", steps_per_dispatch)
        positive_int("log_every_steps", log_every_steps)
        positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
        check_decay(ema_decay)
        if gradient_accumulation_steps > 1 and _overrides(self, "train_step"):
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps} needs the default "
                f"train_step, but {type(self).__name__} overrides it: override loss_fn instead, "
                "accumulate inside your train_step, or wrap the optimizer in optax.MultiSteps "
                "(each batch is then a step)."
            )
        if stage_data not in (None, True, False):
            raise ValueError(f"stage_data must be None, True or False, got {stage_data!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
        if loss_fn is None and not (_overrides(self, "loss_fn") or _overrides(self, "train_step")):
            raise ValueError(
                "No loss: pass loss_fn=... (a function (model, batch) -> loss or (loss, metrics)) "
                "or subclass Trainer and override loss_fn or train_step."
            )
        self._loss_fn = loss_fn
        if seed is not None:
            _reseed(model, seed)
        self.mesh = mesh if mesh is not None else data_lib.default_mesh()
        self.callbacks = CallbackList(callbacks)
        self.settings = Settings(
            steps_per_dispatch=steps_per_dispatch,
            gradient_accumulation_steps=gradient_accumulation_steps,
            log_every_steps=log_every_steps,
            progress=progress,
            stage_data=stage_data,
        )
        self._model = model
        partition_specs(nnx.state(model), self.mesh)  # a clear error before flax's own
        # Flax shards variables as it creates them (the optimizer's moments follow their
        # parameter's annotation), which needs the mesh in context.
        with jax.set_mesh(self.mesh):
            self._optimizer = (
                nnx.Optimizer(model, tx, wrt=nnx.Param)
                if ema_decay is None
                else EMAOptimizer(model, tx, decay=float(ema_decay))
            )
            self._engine = StepEngine(
                model,
                self._optimizer,
                self.mesh,
                train_step=(
                    self._accumulated_step if gradient_accumulation_steps > 1 else self.train_step
                ),
                eval_step=self.eval_step,
                predict_step=self.predict_step,
                step_seed=seed if seed is not None else 0,
                grouped=gradient_accumulation_steps > 1,
                evaluate_ema=ema_decay is not None,
            )
        self._progress = Progress()
        self.history = History()
        self._run: FitRun | None = None  # the fit call running, if any

    # -- override points (traced under jit) -----------------------------------------------

    def loss_fn(self, model: nnx.Module, batch: Any) -> Any:
        """The loss of `model` on `batch`: `loss` or `(loss, metrics_dict)`. Traced under jit.

        By default calls the `loss_fn` given to the constructor; override it in a subclass.
        """
        if self._loss_fn is None:
            raise NotImplementedError(
                "Trainer.loss_fn is not defined: pass loss_fn=... or override loss_fn."
            )
        return self._loss_fn(model, batch)

    def train_step(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: Any) -> Any:
        """One optimizer update in training mode; returns a dict of metrics: scalars, or
        metric states (`clu.metrics.Metric`) that merge by adding, such as clu's `Accuracy`.

        An override may take a fourth argument, `step` (an `nl.Step`): this update's
        number (`step.number`, from 1) and a PRNG key of its own (`step.key`), both traced,
        both the same at the same update of a resumed run: `def train_step(self, model,
        optimizer, batch, step)`. The three-argument form gets neither.

        The default differentiates `loss_fn` with respect to the `nnx.Param` variables and
        applies `optimizer.update(model, grads)`. Override it for full control (frozen layers,
        an EMA of the weights, several optimizers); it is traced under jit, mutates `model` and
        `optimizer` in place, and must not change their structure.

        Attributes of the trainer read here (`self.decay`) are read once, when the step is
        first compiled, and stay fixed after: keep a value that changes during training in
        the model (an `nnx.Variable`) or in the optimizer (`optax.inject_hyperparams`).
        """

        def loss(model):
            value, metrics = split_loss(self.loss_fn(model, batch))
            return value, metrics

        (value, metrics), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        optimizer.update(model, grads)
        return {"loss": value, **metrics}

    def _accumulated_step(self, model: nnx.Module, optimizer: nnx.Optimizer, group: Any) -> Any:
        """The default step with `gradient_accumulation_steps > 1` (see `accumulated_step`)."""
        return accumulated_step(self.loss_fn, model, optimizer, group)

    def eval_step(self, model: nnx.Module, batch: Any) -> Any:
        """Metrics of `model` (in eval mode) on one batch; by default `loss_fn`'s loss and metrics.

        Traced under jit. Scalar values are averaged over the evaluation data, weighted by
        batch size; a value that is a mergeable metric state (a `clu.metrics.Metric`, e.g. an
        F1 from per-class counts) is merged over the data on the device and computed once on
        the host (see the how-to "Metrics that are not means").
        """
        value, metrics = split_loss(self.loss_fn(model, batch))
        return {"loss": value, **metrics}

    def predict_step(self, model: nnx.Module, batch: Any) -> Any:
        """The model's output on one batch (in eval mode). Traced under jit.

        The default is `model(batch)` for an array batch and `model(batch[0])` for a tuple
        `(inputs, targets)`; override it for any other batch structure.
        """
        if isinstance(batch, jax.Array):
            return model(batch)
        if isinstance(batch, tuple) and batch:
            return model(batch[0])
        raise TypeError(
            f"The default predict_step takes an array batch or an (inputs, targets) tuple, got "
            f"a {type(batch).__name__}; override Trainer.predict_step for this batch structure."
        )

    # -- state ----------------------------------------------------------------------------

    @property
    def model(self) -> nnx.Module:
        """The model, holding the current values (synced from the device state when read)."""
        if self._run is not None:
            self._engine.sync_to_objects()
        return self._model

    @property
    def optimizer(self) -> nnx.Optimizer:
        """The `nnx.Optimizer`, holding the current values (synced when read)."""
        if self._run is not None:
            self._engine.sync_to_objects()
        return self._optimizer

    @property
    def step(self) -> int:
        """Optimizer updates done since the start of training (1 after the first); a
        restored checkpoint's step once `fit` has resumed from it."""
        return self._progress.step

    @property
    def epoch(self) -> int:
        """Epochs done since the start of training."""
        return self._progress.epoch

    @property
    def examples_seen(self) -> int:
        """Training examples consumed since the start of training."""
        return self._progress.examples_seen

    @property
    def stop_training(self) -> bool:
        """Whether the running `fit` has been asked to stop (False outside a fit). A
        callback sets it to True (through its view) to end `fit` cleanly after the current
        step; it is saved with the run, so a rerun of a stopped run trains no further."""
        return self._run is not None and self._run.stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        if self._run is None:
            raise RuntimeError(
                "stop_training asks the running fit to stop, and no fit is running: set it "
                "from a callback (trainer.stop_training = True in any hook)."
            )
        self._run.stop_training = value

    def _learning_rate_index(self) -> int | None:
        """Where the optimizer state's injected learning rate is among the engine's leaves."""
        state = self._engine.state()  # (model state, optimizer state): its leaves in order
        for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0]):
            keys = key_parts(path)
            if keys[0] == "1" and "hyperparams" in keys and "learning_rate" in keys:
                return i
        return None

    def learning_rate(self) -> jax.Array | None:
        """The learning rate the last update used, when the optimizer holds it
        (`optax.inject_hyperparams`): a copy of this process's replica, its transfer to the
        host started, never waited for. None for an optimizer that does not hold one."""
        index = self._learning_rate_index()
        if index is None:
            return None
        # A copy, as the state's buffer is donated to the next step; of this process's own
        # replica, so that one process alone runs no computation on a global array.
        value = jnp.copy(self._engine.leaves[index].addressable_data(0))
        value.copy_to_host_async()
        return value

    def set_learning_rate(self, value: float) -> None:
        """Sets the learning rate the next updates use, in an optimizer built with
        `optax.inject_hyperparams` (it is part of the optimizer state, so it is saved with
        every checkpoint and a resumed run goes on with it).

        Raises:
            ValueError: the optimizer does not hold its learning rate in its state.
        """
        index = self._learning_rate_index()
        if index is None:
            raise ValueError(
                "set_learning_rate needs the learning rate in the optimizer state: build the "
                "optimizer with optax.inject_hyperparams, e.g. "
                "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)."
            )
        leaves = list(self._engine.leaves)
        old = leaves[index]
        leaves[index] = place_all([np.asarray(value, old.dtype)], [old.sharding])[0]
        self._engine.set_leaves(leaves)
        if self._run is None:
            self._engine.sync_to_objects()

    # -- fit ------------------------------------------------------------------------------

    def fit(
        self,
        train_data: Iterable[Any],
        *,
        val_data: Iterable[Any] | None = None,
        epochs: int | None = None,
        max_steps: int | None = None,
        eval_every_steps: int | None = None,
    ) -> History:
        """Trains until `epochs` epochs or `max_steps` steps have been done since the start.

        Both count from the start of training, so a second `fit` call, or a run resumed from a
        checkpoint, stops where an uninterrupted run would.

        Args:
            train_data: a re-iterable of batches (pytrees with the batch on axis 0).
            val_data: evaluation batches, evaluated at each epoch end (or every
                `eval_every_steps` steps) into `val_loss`, `val_accuracy`, ...; or a mapping
                of names to such batches, each set evaluated in turn into
                `val_<name>_loss`, ... (`{"ood": batches}` gives `val_ood_loss`).
            epochs: total epochs to train. Exactly one of `epochs` / `max_steps` is required.
            max_steps: total optimizer steps to train.
            eval_every_steps: evaluate every this many steps instead of at epoch ends.

        Returns:
            The `History` of this call.
        """
        if (epochs is None) == (max_steps is None):
            raise ValueError(
                "fit needs exactly one of epochs=... or max_steps=... (both count from the start "
                f"of training); got epochs={epochs!r}, max_steps={max_steps!r}."
            )
        positive_int("epochs", epochs, optional=True)
        positive_int("max_steps", max_steps, optional=True)
        positive_int("eval_every_steps", eval_every_steps, optional=True)
        if eval_every_steps is not None and val_data is None:
            raise ValueError("eval_every_steps was given without val_data to evaluate on.")
        _check_val_sets(val_data)
        if val_data is not None and not self._can_evaluate():
            raise TypeError(self._no_eval_message())
        if epochs is not None and iter(train_data) is train_data:
            raise TypeError(
                "train_data is a one-shot iterator, but epochs need data that can be iterated "
                "again each epoch: pass a list, a grain dataset or loader, or use max_steps."
            )

        self.history = History()
        if self.step == 0:
            # A run from scratch: nothing a callback object kept from an earlier run (with
            # another trainer) carries over. A checkpoint restored below still brings back the
            # state its run saved.
            for cb in self.callbacks:
                cb.reset_state()
        show_progress = wanted(self.settings.progress)
        run = FitRun(
            self,
            self._engine,
            self._model,
            self._progress,
            self.settings,
            train_data,
            val_data=val_data,
            epochs=epochs,
            max_steps=max_steps,
            eval_every_steps=eval_every_steps,
            callbacks=self.callbacks,
            show_progress=show_progress,
            batches=self._batches,
        )
        self._engine.load_from_objects()
        self._run = run
        first_epoch = len(self.history.epochs)
        try:
            run.run()
            self._settle_history(first_epoch)
        except BaseException as exc:
            try:
                run.callbacks.call("on_exception", run, exc)
            finally:
                run.finish_saves(failing=True)
                self._settle_history(first_epoch)
            raise
        else:
            run.finish_saves(failing=False)
        finally:
            self._engine.sync_to_objects()
            self._run = None
        return self.history

    def _settle_history(self, first_epoch: int) -> None:
        """Turns this fit's epoch entries into plain dicts: the averages are read from the
        device here, unless a callback already read them. After a failure, best effort (the
        device may be what failed): entries that cannot be read are left as they are."""
        epochs = self.history.epochs
        for i in range(first_epoch, len(epochs)):
            try:
                epochs[i] = dict(epochs[i])
            except Exception:
                log.warning("The averages of epoch %d could not be read back.", i)
                break

    # -- evaluate / predict ---------------------------------------------------------------

    def _batches(self, data: Iterable[Any]):
        for batch in data:
            data_lib.batch_size(batch, self.mesh)
            yield data_lib.prepare(batch, self.mesh)

    def _can_evaluate(self) -> bool:
        return (
            self._loss_fn is not None
            or _overrides(self, "loss_fn")
            or _overrides(self, "eval_step")
        )

    def _no_eval_message(self) -> str:
        return (
            f"{type(self).__name__} overrides train_step but has no loss_fn and no eval_step, "
            "so it cannot evaluate: override eval_step(model, batch) -> metrics dict, or "
            "loss_fn, or pass loss_fn=... to the constructor."
        )

    def evaluate(self, data: Iterable[Any]) -> dict[str, float]:
        """Averages `eval_step` metrics over `data` (weighted by batch size), in eval mode.

        Returns plain metric names (`loss`, `accuracy`); inside `fit` the same values are
        reported with a `val_` prefix.

        Raises:
            TypeError: a subclass overrides only `train_step`, so there is nothing to evaluate.
        """
        if not self._can_evaluate():
            raise TypeError(self._no_eval_message())
        if self._run is None:
            self._engine.load_from_objects()
        return self._engine.evaluate(self._batches(data))

    def step_memory(self, batches: Sequence[Any]) -> Any:
        """XLA's memory analysis of the compiled training step (compiled, not run) for one
        update made from `batches`: `gradient_accumulation_steps` batches, or one.

        Returns jax's `CompiledMemoryStats` (per device, in bytes): the step's peak is
        `argument_size_in_bytes + output_size_in_bytes - alias_size_in_bytes +
        temp_size_in_bytes`. On a GPU, `jax.local_devices()[0].memory_stats()` after a
        step gives the allocator's own peak.

        Raises:
            ValueError: the number of batches is not `gradient_accumulation_steps`.
        """
        n = self.settings.gradient_accumulation_steps
        if len(batches) != n:
            raise ValueError(
                f"step_memory needs the {n} batch{'es' if n > 1 else ''} of one update "
                f"(gradient_accumulation_steps={n}), got {len(batches)}."
            )
        return self._engine.memory_analysis(batches[0] if n == 1 else group(list(batches)))

    def predict(self, data: Iterable[Any]) -> Any:
        """Runs `predict_step` on every batch of `data`; outputs concatenated on axis 0 (NumPy)."""
        if self._run is None:
            self._engine.load_from_objects()
        outputs = [self._engine.predict(batch) for batch in self._batches(data)]
        if not outputs:
            raise ValueError("predict got no batches.")
        return data_lib.concat(outputs)


def _check_val_sets(val_data: Any) -> None:
    """A mapping of `val_data` must map names to sets of batches (not be one batch)."""
    if not isinstance(val_data, Mapping):
        return
    if not val_data:
        raise ValueError("val_data is an empty mapping; give it named sets of batches, or None.")
    for name, data in val_data.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"val_data names become metric names (val_<name>_loss): {name!r} is not one; "
                "use names like 'in_domain' or 'ood'."
            )
        if hasattr(data, "shape") or not isinstance(data, Iterable):
            raise TypeError(
                f"val_data[{name!r}] is {type(data).__name__}, not a set of batches: val_data "
                "looks like a single batch. Pass a list of batches, or a mapping of names to "
                "lists of batches."
            )
