"""`FitRun`: one call of `Trainer.fit`, from its first event to its last.

A `FitRun` owns what lives only while `fit` runs: the feed of batches, the accumulation of
the training metrics, the callback dispatch list (the user's callbacks and the defaults), the
preemption watcher and the data state waiting for the first epoch of a resumed run. It
advances the trainer's progress (`step`, `epoch`, `position`), which persists, and sends the
events. Dispatches end on multiples of `steps_per_dispatch` and are shortened so that requested
steps (`max_steps`, `eval_every_steps`, a callback's `next_step`) land exactly. Batches are
pulled from the iterator only as they are used.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from nnxloop import feed, summary
from nnxloop.callbacks.base import CallbackList, StepLogs
from nnxloop.console import announce
from nnxloop.metrics import Accumulation, LazyLogs
from nnxloop.preemption import PreemptionWatcher
from nnxloop.progress import evaluation_progress
from nnxloop.triggers import next_multiple

FOLD_EVERY = 1000  # steps between moves of the float32 device sums into float64 host totals
# How far the host may dispatch ahead of the devices: every MARK_EVERY-th dispatch is marked,
# and the host waits for the mark MARKS_AHEAD marks back, so at most about
# MARK_EVERY * (MARKS_AHEAD + 1) dispatches are queued. XLA's CPU client deadlocks when a
# multi-device computation waits for a device whose queue is full (32 computations): its
# launch blocks one of the pool threads the collective needs. A dozen queued dispatches keep
# any device busy.
MARK_EVERY, MARKS_AHEAD = 4, 2


class FitRun:
    """One `fit` call of `trainer`: call `run()` once."""

    def __init__(
        self,
        trainer: Any,  # the Trainer, which imports this module (so it is not imported here)
        train_data: Iterable[Any],
        *,
        val_data: Iterable[Any] | None,
        epochs: int | None,
        max_steps: int | None,
        eval_every_steps: int | None,
        callbacks: CallbackList,
        show_progress: bool,
        batches: Callable[[Iterable[Any]], Iterable[Any]],
    ):
        self.trainer = trainer
        self.val_data = val_data
        self.epochs, self.max_steps, self.eval_every_steps = epochs, max_steps, eval_every_steps
        self.callbacks = callbacks
        self.show_progress = show_progress
        self._batches = batches  # evaluation batches, checked and placed on the mesh
        self.remainder = feed.Remainder(trainer.gradient_accumulation_steps)
        self.feed = self._feed(train_data)
        self.metrics = Accumulation()
        self.preemption = PreemptionWatcher()
        self.iterator: Any = None
        self.data_state: Any = None  # from a restored checkpoint, for the first epoch opened
        self.resumed = False
        self.boundaries = 0
        self._dispatched = 0
        self._marks: collections.deque[Any] = collections.deque()
        # While `on_train_end` runs, model states callbacks load (restore-best) wait here,
        # so that no callback's final save, wherever it stands, writes them as the training
        # state; they are loaded once every callback's `on_train_end` has run.
        self.ending = False
        self.deferred_loads: list[tuple[Any, int]] = []

    def _feed(self, train_data: Iterable[Any]) -> feed.IteratorFeed | feed.StagedFeed:
        t = self.trainer
        return feed.for_fit(train_data, t.mesh, t.stage_data, t.steps_per_dispatch, self.remainder)

    # -- what the trainer asks of its running fit --------------------------------------------

    def restored(self, data_state: Any) -> None:
        """A checkpoint was restored: its data-iterator state opens the next epoch."""
        self.data_state, self.resumed = data_state, True

    def current_data_state(self) -> Any:
        """The state of the current epoch's iterator, if it has `get_state`, else None."""
        get_state = getattr(self.iterator, "get_state", None)
        return get_state() if callable(get_state) else None

    def done(self) -> bool:
        t = self.trainer
        if t.stop_training:
            return True
        if self.epochs is not None:
            return t.epoch >= self.epochs
        assert self.max_steps is not None
        return t.step >= self.max_steps

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """The events of one `fit`, from `on_train_begin` to `on_train_end`."""
        t = self.trainer
        with self.preemption.installed():
            self.callbacks.call("on_train_begin", t)
            if self.done():
                why = " (stopped by a callback)" if t.stop_training else ""
                announce("Training already finished at step %d%s; nothing to do.", t.step, why)
            else:
                self._announce_start()
            self._train_loop()
            t.history.stopped_early = t.stop_training and not t.preempted
            self.ending = True
            try:
                self.callbacks.call("on_train_end", t)
            finally:
                self.ending = False
            for store, step in self.deferred_loads:
                t.load_model_state(store, step)

    def _announce_start(self) -> None:
        """The run's start line and its parameters per top-level module (process 0, stderr),
        after any resume, so the step is the one training starts from."""
        t = self.trainer
        where = [d for d in (cb.describe() for cb in self.callbacks) if d]
        params = t.parameter_shapes()
        announce("%s", summary.start_line(t.model_class, params, t.mesh, t.step, where))
        announce("Parameters:\n%s", summary.module_table(params))

    def _train_loop(self) -> None:
        t = self.trainer
        while not self.done():
            epoch = t.epoch
            self.callbacks.call("on_epoch_begin", t, epoch)
            self.metrics.retire()
            epoch_start = self.metrics.pending()
            if not self._train_epoch():
                break
            t.epoch += 1
            t.position = 0
            self.metrics.retire()
            averages = functools.partial(self.metrics.pending().average_since, epoch_start)
            val: dict[str, float] = {}
            if self.val_data is not None and self.eval_every_steps is None:
                val = self._evaluate()
            # Two lazy views of the same averages (read from the device once): what callbacks
            # do to `logs` stays out of the History.
            logs = LazyLogs(averages)
            logs.update(val)
            t.history.epochs.append(LazyLogs(functools.partial(_epoch_entry, epoch, averages, val)))
            self.callbacks.call("on_epoch_end", t, epoch, logs)

    def _open_epoch(self) -> None:
        t = self.trainer
        state, self.data_state = self.data_state, None
        self.resumed, resumed = False, self.resumed
        if self.feed.changed():  # the list was reordered or its batches replaced: stage anew
            self.feed = self._feed(self.feed.data)
        self.feed.open(t.position, state, resumed, t.epoch)
        self.iterator = self.feed.iterator

    def _chunk_end(self) -> int:
        t = self.trainer
        step, k = t.step, t.steps_per_dispatch
        end = next_multiple(step, k)  # chunks align to multiples of K, whatever the start
        if self.max_steps is not None:
            end = min(end, self.max_steps)
        if self.eval_every_steps is not None:
            end = min(end, next_multiple(step, self.eval_every_steps))
        asked = self.callbacks.next_step(t, step)
        if asked is not None:
            end = min(end, asked)
        return end

    def _train_epoch(self) -> bool:
        """Trains until the data runs out (returns True) or training must stop (False)."""
        t = self.trainer
        self._open_epoch()
        k = t.steps_per_dispatch
        saw_batch = t.position > 0
        engine = t.engine
        while True:
            if t.preempted:
                return False  # stop now: a resumed run ends this epoch
            if t.position > 0 and self.feed.length is not None:
                if t.position >= self.feed.length:
                    return True  # the data has a length: the epoch is over, whatever stops
            if t.stop_training or (self.max_steps is not None and t.step >= self.max_steps):
                return False
            wanted = self._chunk_end() - t.step
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
                t.last_metrics = metrics
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
        t = self.trainer
        if t.step // FOLD_EVERY != (t.step - steps) // FOLD_EVERY:
            self.metrics.retire()
        self.boundaries += 1
        if self.preemption.should_stop(self.boundaries):
            t.preempted = t.history.preempted = True
            t.stop_training = True
            announce("Preemption requested (SIGTERM): stopping cleanly at step %d.", t.step)

    def _after_steps(self, metrics: Any, sizes: list[int], *, stacked: bool) -> None:
        """Advances the counters over a dispatch's steps and sends `on_step_end` for each.

        A step's evaluation runs before that step's `on_step_end`, so that a checkpoint saved
        there already holds what the evaluation changed (best score, patience), and a run
        resumed from it does not evaluate that step again.
        """
        t = self.trainer
        n = len(sizes)
        t.examples_seen += sum(sizes)
        step_end = self.callbacks.step_end
        every = self.eval_every_steps
        for i in range(n):
            t.step += 1
            t.position += 1
            t.state_is_current = i == n - 1
            if t.state_is_current and every is not None and t.step % every == 0:
                self._evaluate()
            if step_end:
                logs = StepLogs(metrics, i) if stacked else metrics
                for cb in step_end:
                    cb.on_step_end(t, t.step, logs)
        t.state_is_current = True

    def _evaluate(self) -> dict[str, float]:
        t = self.trainer
        assert self.val_data is not None
        # One set: `val_loss`, ...; named sets: `val_<name>_loss`, ... for each, in order.
        val = self.val_data
        sets = val.items() if isinstance(val, Mapping) else [("", val)]
        metrics: dict[str, float] = {}
        for name, data in sets:
            prefix = f"val_{name}_" if name else "val_"
            batches = self._batches(evaluation_progress(data, self.show_progress, name))
            metrics.update({f"{prefix}{k}": v for k, v in t.engine.evaluate(batches).items()})
        t.history.evals.append({"step": t.step, **metrics})
        self.callbacks.call("on_eval_end", t, t.step, metrics)
        return metrics


def _epoch_entry(epoch: int, averages: Any, val: Mapping[str, float]) -> dict[str, Any]:
    return {"epoch": epoch, **averages(), **val}
