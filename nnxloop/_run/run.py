"""`FitRun`: one call of `Trainer.fit`, from its first event to its last.

A `FitRun` owns what lives only while `fit` runs: its plan (`FitPlan`), its status (a stop
asked for, a preemption), the feed of batches, the accumulation of the training metrics, the
callback dispatch list (the user's callbacks and the defaults), the save coordinator, the
preemption watcher and the data state waiting for the first epoch of a resumed run. It is what
callbacks receive as their `TrainerView`. It advances the trainer's `Progress` (`step`,
`epoch`, `position`, examples seen), which persists, and sends the events. Dispatches end on
multiples of `steps_per_dispatch` and are shortened so that requested steps (`max_steps`,
`eval_every_steps`, a callback's `next_step`) land exactly. Batches are pulled from the
iterator only as they are used.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import jax
from flax import nnx

from nnxloop._data import feed, staging
from nnxloop._protocol.callback import Callback, CallbackList, StepLogs
from nnxloop._protocol.view import FitPlan
from nnxloop._rules.triggers import next_multiple
from nnxloop._run import summary
from nnxloop._run.console import announce
from nnxloop._run.history import History
from nnxloop._run.preemption import PreemptionWatcher
from nnxloop._run.progress import evaluation_progress
from nnxloop._run.totals import Accumulation, LazyLogs, PendingTotals
from nnxloop._saving.contents import restore_training
from nnxloop._saving.coordinator import SaveCoordinator
from nnxloop._step.engine import StepEngine
from nnxloop.callbacks.defaults import default_callbacks
from nnxloop.checkpointing import CheckpointStore

FOLD_EVERY = 1000  # steps between moves of the float32 device sums into float64 host totals
# How far the host may dispatch ahead of the devices: every MARK_EVERY-th dispatch is marked,
# and the host waits for the mark MARKS_AHEAD marks back, so at most about
# MARK_EVERY * (MARKS_AHEAD + 1) dispatches are queued. XLA's CPU client deadlocks when a
# multi-device computation waits for a device whose queue is full (32 computations): its
# launch blocks one of the pool threads the collective needs. A dozen queued dispatches keep
# any device busy.
MARK_EVERY, MARKS_AHEAD = 4, 2


@dataclasses.dataclass
class Progress:
    """Where training stands, kept by the trainer across `fit` calls and checkpointed:
    updates done, epochs done, batches (updates) done in the current epoch, and training
    examples consumed."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    examples_seen: int = 0


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a trainer runs its fits: the constructor's arguments of that kind."""

    steps_per_dispatch: int = 1
    gradient_accumulation_steps: int = 1
    log_every_steps: int = 50
    progress: bool | None = None
    stage_data: bool | None = None


@dataclasses.dataclass
class RunStatus:
    """How the running fit stands: a stop asked for (by a callback, a restored finished run,
    or a preemption), a preemption notice, and whether the state held is the current step's."""

    stop_requested: bool = False
    preempted: bool = False
    state_is_current: bool = True


class Owner(Protocol):
    """What a fit run reads of the trainer that runs it: its user API (it imports no
    trainer: the trainer imports it)."""

    history: History

    @property
    def mesh(self) -> jax.sharding.Mesh: ...

    @property
    def model(self) -> nnx.Module: ...

    @property
    def optimizer(self) -> nnx.Optimizer[Any]: ...

    def learning_rate(self) -> jax.Array | None: ...

    def set_learning_rate(self, value: float) -> None: ...


def total_steps(epochs: int | None, max_steps: int | None, length: int | None) -> int | None:
    """The step a `fit` ends at when it runs to its end: `max_steps`, or `epochs` whole epochs
    of data with a length, whichever comes first; None when not known in advance."""
    by_epochs = epochs * length if epochs is not None and length is not None else None
    known = [n for n in (max_steps, by_epochs) if n is not None]
    return min(known) if known else None


class FitRun:
    """One `fit` call: call `run()` once. Callbacks receive it as their `TrainerView`."""

    def __init__(
        self,
        owner: Owner,
        engine: StepEngine,
        model_object: nnx.Module,
        progress: Progress,
        settings: Settings,
        train_data: Iterable[Any],
        *,
        val_data: Iterable[Any] | None,
        epochs: int | None,
        max_steps: int | None,
        eval_every_steps: int | None,
        callbacks: Iterable[Callback],
        show_progress: bool,
        batches: Callable[[Iterable[Any]], Iterable[Any]],
    ):
        self.owner = owner
        self.engine = engine
        self._model_object = model_object  # for shapes and class only: never synced here
        self.progress = progress
        self.settings = settings
        self.val_data = val_data
        # The user's callbacks, then the defaults (the progress bar), in one dispatch list.
        extra = default_callbacks(progress=show_progress, log_every_steps=settings.log_every_steps)
        self.callbacks = CallbackList([*callbacks, *extra])
        self.show_progress = show_progress
        self._batches = batches  # evaluation batches, checked and placed on the mesh
        self.remainder = feed.Remainder(settings.gradient_accumulation_steps)
        self.feed = self._feed(train_data)
        self.plan = FitPlan(
            epochs=epochs,
            max_steps=max_steps,
            total_steps=total_steps(epochs, max_steps, self.feed.length),
            evaluates=val_data is not None,
            eval_every_steps=eval_every_steps,
        )
        self.status = RunStatus()
        self.metrics = Accumulation()
        self.preemption = PreemptionWatcher()
        self.last_metrics: Mapping[str, jax.Array] = {}
        self.iterator: Any = None
        self.restored_data: Any = None  # from a restored checkpoint, for the first epoch opened
        self.resumed = False
        self.boundaries = 0
        self._dispatched = 0
        self._marks: collections.deque[Any] = collections.deque()
        self._saves: SaveCoordinator | None = None  # made by the first save: none without one
        # While `on_train_end` runs, model states callbacks load (restore-best) wait here,
        # so that no callback's final save, wherever it stands, writes them as the training
        # state; they are loaded once every callback's `on_train_end` has run.
        self.ending = False
        self.deferred_loads: list[tuple[CheckpointStore, int]] = []

    def _feed(self, train_data: Iterable[Any]) -> feed.IteratorFeed | staging.StagedFeed:
        s = self.settings
        return staging.for_fit(
            train_data, self.owner.mesh, s.stage_data, s.steps_per_dispatch, self.remainder
        )

    # -- the view callbacks receive (`TrainerView`) --------------------------------------

    @property
    def trainer(self) -> Owner:
        """The trainer running this fit, for its own API (`history`, `mesh`, ...)."""
        return self.owner

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def position(self) -> int:
        return self.progress.position

    @property
    def examples_seen(self) -> int:
        return self.progress.examples_seen

    @property
    def stop_training(self) -> bool:
        return self.status.stop_requested

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self.status.stop_requested = bool(value)

    @property
    def preempted(self) -> bool:
        return self.status.preempted

    @property
    def state_is_current(self) -> bool:
        return self.status.state_is_current

    @property
    def steps_per_dispatch(self) -> int:
        return self.settings.steps_per_dispatch

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.settings.gradient_accumulation_steps

    @property
    def fit_epochs(self) -> int | None:
        return self.plan.epochs

    @property
    def fit_max_steps(self) -> int | None:
        return self.plan.max_steps

    @property
    def fit_total_steps(self) -> int | None:
        return self.plan.total_steps

    @property
    def fit_evaluates(self) -> bool:
        return self.plan.evaluates

    @property
    def model(self) -> nnx.Module:
        return self.owner.model

    @property
    def optimizer(self) -> nnx.Optimizer[Any]:
        return self.owner.optimizer

    @property
    def model_class(self) -> type:
        return type(self._model_object)

    def parameter_shapes(self) -> nnx.State[Any, Any]:
        return nnx.state(nnx.eval_shape(lambda: self._model_object), nnx.Param)

    def metric_totals(self) -> PendingTotals:
        return self.metrics.pending()

    def learning_rate(self) -> jax.Array | None:
        return self.owner.learning_rate()

    def set_learning_rate(self, value: float) -> None:
        self.owner.set_learning_rate(value)

    # -- saving and restoring (the view's way to the save machinery) ---------------------

    @property
    def saves(self) -> SaveCoordinator:
        """This fit's save machinery, made when a callback first saves."""
        if self._saves is None:
            self._saves = SaveCoordinator()
        return self._saves

    def save_checkpoint(
        self,
        store: CheckpointStore,
        *,
        metrics: dict[str, float] | None = None,
        extra_meta: dict[str, Any] | None = None,
        on_refused: Callable[[int], None] | None = None,
        final: bool = False,
    ) -> bool:
        return self.saves.save(
            self, store, metrics=metrics, extra_meta=extra_meta, on_refused=on_refused, final=final
        )

    def before_checkpoint(self) -> None:
        """The `on_save_checkpoint` event, just before a checkpoint of this step is written
        (and every callback's `state_dict` taken for it)."""
        self.callbacks.call("on_save_checkpoint", self, self.progress.step)

    def wait_for_saves(self, store: CheckpointStore | None = None) -> None:
        if self._saves is None:
            return
        if store is None:
            self._saves.wait_all()
        else:
            self._saves.finish(store)

    def check_saves(self) -> None:
        if self._saves is not None:
            self._saves.poll()

    def save_in_background(self, max_in_flight: int) -> None:
        self.saves.enable_async(max_in_flight)

    def restore_checkpoint(self, store: CheckpointStore) -> int | None:
        return restore_training(self, store)

    def load_model_state(self, store: CheckpointStore, step: int) -> None:
        if self.ending:
            self.deferred_loads.append((store, step))
            return
        abstract = self.engine.abstract_state()
        model_state, _ = store.restore(step, abstract[0])
        n_model = len(jax.tree.leaves(abstract[0]))
        self.engine.set_leaves(jax.tree.leaves(model_state) + self.engine.leaves[n_model:])

    # -- what a checkpoint reads and restores (`nnxloop._saving.contents.Checkpointed`) ---

    def data_state(self) -> Any:
        """The state of the current epoch's iterator, if it has `get_state`, else None."""
        get_state = getattr(self.iterator, "get_state", None)
        return get_state() if callable(get_state) else None

    def restore_progress(
        self,
        *,
        step: int,
        epoch: int,
        position: int,
        data_state: Any = None,
        stopped: bool = False,
    ) -> None:
        """Sets where training stands from a checkpoint; its data-iterator state opens the
        next epoch. `stopped`: the run was ended by a callback, so this fit trains no more."""
        p = self.progress
        p.step, p.epoch, p.position = int(step), int(epoch), int(position)
        self.restored_data, self.resumed = data_state, True
        self.status.stop_requested = bool(stopped)

    def finish_saves(self, *, failing: bool) -> None:
        """Waits for every background save (`fit` returns only once they have finished);
        while `fit` is failing, a save's failure is logged instead of raised."""
        if self._saves is None:
            return  # nothing was ever saved
        try:
            self._saves.wait_all()
        except Exception:
            if not failing:
                raise
            import logging

            logging.getLogger("nnxloop").exception(
                "A background checkpoint save failed while fit was failing:"
            )

    def done(self) -> bool:
        if self.status.stop_requested:
            return True
        if self.plan.epochs is not None:
            return self.progress.epoch >= self.plan.epochs
        assert self.plan.max_steps is not None
        return self.progress.step >= self.plan.max_steps

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """The events of one `fit`, from `on_train_begin` to `on_train_end`."""
        with self.preemption.installed():
            self.callbacks.call("on_train_begin", self)
            if self.done():
                why = " (stopped by a callback)" if self.stop_training else ""
                announce("Training already finished at step %d%s; nothing to do.", self.step, why)
            else:
                self._announce_start()
            self._train_loop()
            self.owner.history.stopped_early = self.stop_training and not self.preempted
            self.ending = True
            try:
                self.callbacks.call("on_train_end", self)
            finally:
                self.ending = False
            for store, step in self.deferred_loads:
                self.load_model_state(store, step)

    def _announce_start(self) -> None:
        """The run's start line and its parameters per top-level module (process 0, stderr),
        after any resume, so the step is the one training starts from."""
        where = [d for d in (cb.describe() for cb in self.callbacks) if d]
        params = self.parameter_shapes()
        announce(
            "%s", summary.start_line(self.model_class, params, self.owner.mesh, self.step, where)
        )
        announce("Parameters:\n%s", summary.module_table(params))

    def _train_loop(self) -> None:
        while not self.done():
            epoch = self.epoch
            self.callbacks.call("on_epoch_begin", self, epoch)
            self.metrics.retire()
            epoch_start = self.metrics.pending()
            if not self._train_epoch():
                break
            self.progress.epoch += 1
            self.progress.position = 0
            self.metrics.retire()
            averages = functools.partial(self.metrics.pending().average_since, epoch_start)
            val: dict[str, float] = {}
            if self.val_data is not None and self.plan.eval_every_steps is None:
                val = self._evaluate()
            # Two lazy views of the same averages (read from the device once): what callbacks
            # do to `logs` stays out of the History.
            logs = LazyLogs(averages)
            logs.update(val)
            self.owner.history.epochs.append(
                LazyLogs(functools.partial(_epoch_entry, epoch, averages, val))
            )
            self.callbacks.call("on_epoch_end", self, epoch, logs)

    def _open_epoch(self) -> None:
        state, self.restored_data = self.restored_data, None
        self.resumed, resumed = False, self.resumed
        if self.feed.changed():  # the list was reordered or its batches replaced: stage anew
            self.feed = self._feed(self.feed.data)
        self.feed.open(self.position, state, resumed, self.epoch)
        self.iterator = self.feed.iterator

    def _chunk_end(self) -> int:
        step, k = self.step, self.steps_per_dispatch
        end = next_multiple(step, k)  # chunks align to multiples of K, whatever the start
        if self.plan.max_steps is not None:
            end = min(end, self.plan.max_steps)
        if self.plan.eval_every_steps is not None:
            end = min(end, next_multiple(step, self.plan.eval_every_steps))
        asked = self.callbacks.next_step(self, step)
        if asked is not None:
            end = min(end, asked)
        return end

    def _train_epoch(self) -> bool:
        """Trains until the data runs out (returns True) or training must stop (False)."""
        self._open_epoch()
        k = self.steps_per_dispatch
        saw_batch = self.position > 0
        engine = self.engine
        while True:
            if self.preempted:
                return False  # stop now: a resumed run ends this epoch
            if self.position > 0 and self.feed.length is not None:
                if self.position >= self.feed.length:
                    return True  # the data has a length: the epoch is over, whatever stops
            if self.stop_training or (
                self.plan.max_steps is not None and self.step >= self.plan.max_steps
            ):
                return False
            wanted = self._chunk_end() - self.step
            # One K-step dispatch, or single steps: for a shortened chunk, and for the last
            # few batches of an epoch (fewer than K), which are already taken and so run to
            # their end.
            dispatches = self.feed.take(k if wanted == k else 1, k)
            if not dispatches:
                if not saw_batch:
                    raise ValueError(
                        "train_data yielded no batches for an epoch; check that it is not empty "
                        "(and not an iterator that was already used up)."
                    )
                return True
            saw_batch = True
            for dispatch in dispatches:
                self.metrics.start(engine.zero_accumulator(dispatch.sample))
                acc, metrics = dispatch.run(engine, self.metrics.acc)
                self.metrics.advance(acc)
                self._bound_queue(acc)
                self.last_metrics = metrics
                self._after_steps(metrics, dispatch.sizes, stacked=dispatch.stacked)
            self._end_dispatch(sum(len(d.sizes) for d in dispatches))

    def _bound_queue(self, acc: Any) -> None:
        """Keeps the dispatches queued on the devices to a dozen or so (see `MARK_EVERY`):
        waits, on every `MARK_EVERY`-th, for an older one's accumulator (never donated)."""
        self._dispatched += 1
        if self._dispatched % MARK_EVERY:
            return
        leaves = jax.tree.leaves(acc)
        if not leaves:
            return
        self._marks.append(leaves[0])
        if len(self._marks) > MARKS_AHEAD:
            self._marks.popleft().block_until_ready()

    def _end_dispatch(self, steps: int) -> None:
        if self.step // FOLD_EVERY != (self.step - steps) // FOLD_EVERY:
            self.metrics.retire()
        self.boundaries += 1
        if self.preemption.should_stop(self.boundaries):
            self.status.preempted = self.owner.history.preempted = True
            self.stop_training = True
            announce("Preemption requested (SIGTERM): stopping cleanly at step %d.", self.step)

    def _after_steps(self, metrics: Any, sizes: list[int], *, stacked: bool) -> None:
        """Advances the counters over a dispatch's steps and sends `on_step_end` for each.

        A step's evaluation runs before that step's `on_step_end`, so that a checkpoint saved
        there already holds what the evaluation changed (best score, patience), and a run
        resumed from it does not evaluate that step again.
        """
        n = len(sizes)
        self.progress.examples_seen += sum(sizes)
        step_end = self.callbacks.step_end
        every = self.plan.eval_every_steps
        p, status = self.progress, self.status
        for i in range(n):
            p.step += 1
            p.position += 1
            status.state_is_current = i == n - 1
            if status.state_is_current and every is not None and p.step % every == 0:
                self._evaluate()
            if step_end:
                logs = StepLogs(metrics, i) if stacked else metrics
                for cb in step_end:
                    cb.on_step_end(self, p.step, logs)
        status.state_is_current = True

    def _evaluate(self) -> dict[str, float]:
        assert self.val_data is not None
        # One set: `val_loss`, ...; named sets: `val_<name>_loss`, ... for each, in order.
        val = self.val_data
        sets = val.items() if isinstance(val, Mapping) else [("", val)]
        metrics: dict[str, float] = {}
        for name, data in sets:
            prefix = f"val_{name}_" if name else "val_"
            batches = self._batches(evaluation_progress(data, self.show_progress, name))
            metrics.update({f"{prefix}{k}": v for k, v in self.engine.evaluate(batches).items()})
        self.owner.history.evals.append({"step": self.step, **metrics})
        self.callbacks.call("on_eval_end", self, self.step, metrics)
        return metrics


def _epoch_entry(epoch: int, averages: Any, val: Mapping[str, float]) -> dict[str, Any]:
    return {"epoch": epoch, **averages(), **val}
