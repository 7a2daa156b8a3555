"""The training loop of `Trainer.fit`: epochs, dispatches of one or K steps, and their events.

`FitLoop` is mixed into `Trainer`; it advances the trainer's progress (`step`, `epoch`,
`position`) and sends the events. Dispatches end on multiples of `steps_per_dispatch` and are
shortened so that requested steps (`max_steps`, `eval_every_steps`, a callback's `next_step`)
land exactly. Batches are pulled from the iterator only as they are used.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from nnxloop import feed
from nnxloop.callbacks.base import StepLogs
from nnxloop.console import announce
from nnxloop.metrics import LazyLogs
from nnxloop.progress import evaluation_progress
from nnxloop.triggers import next_multiple

FOLD_EVERY = 1000  # steps between moves of the float32 device sums into float64 host totals


class FitLoop:
    """The loop behind `Trainer.fit` (a mixin: the attributes it uses are the trainer's)."""

    def _done(self, epochs: int | None, max_steps: int | None) -> bool:
        if self.stop_training:
            return True
        if epochs is not None:
            return self.epoch >= epochs
        return self.step >= max_steps

    def _train_loop(self, val_data, epochs, max_steps, eval_every_steps) -> None:
        while not self._done(epochs, max_steps):
            epoch = self.epoch
            self._dispatch.call("on_epoch_begin", self, epoch)
            self._metrics.retire()
            epoch_start = self._metrics.pending()
            finished = self._train_epoch(val_data, max_steps, eval_every_steps)
            if not finished:
                break
            self.epoch += 1
            self.position = 0
            self._metrics.retire()
            averages = functools.partial(self._metrics.pending().average_since, epoch_start)
            val = {}
            if val_data is not None and eval_every_steps is None:
                val = self._evaluate_in_fit(val_data)
            # Two lazy views of the same averages (read from the device once): what callbacks
            # do to `logs` stays out of the History.
            logs = LazyLogs(averages)
            logs.update(val)
            self.history.epochs.append(
                LazyLogs(functools.partial(_epoch_entry, epoch, averages, val))
            )
            self._dispatch.call("on_epoch_end", self, epoch, logs)

    def _open_epoch(self) -> None:
        state, self._pending_data_state = self._pending_data_state, None
        self._resumed, resumed = False, self._resumed
        if self._feed.changed():  # the list was reordered or its batches replaced: stage anew
            self._feed = feed.for_fit(
                self._feed.data, self.mesh, self.stage_data, self.steps_per_dispatch
            )
        self._feed.open(self.position, state, resumed, self.epoch)
        self._iterator = self._feed.iterator

    def _chunk_end(self, max_steps, eval_every_steps) -> int:
        step, k = self.step, self.steps_per_dispatch
        end = next_multiple(step, k)  # chunks align to multiples of K, whatever the start
        if max_steps is not None:
            end = min(end, max_steps)
        if eval_every_steps is not None:
            end = min(end, next_multiple(step, eval_every_steps))
        asked = self._dispatch.next_step(self, step)
        if asked is not None:
            end = min(end, asked)
        return end

    def _train_epoch(self, val_data, max_steps, eval_every_steps) -> bool:
        """Trains until the data runs out (returns True) or training must stop (False)."""
        self._open_epoch()
        k = self.steps_per_dispatch
        saw_batch = self.position > 0

        def evaluate(step):
            if eval_every_steps is not None and step % eval_every_steps == 0:
                self._evaluate_in_fit(val_data)

        while True:
            if self.preempted:
                return False  # stop now: a resumed run ends this epoch
            if self.position > 0 and self._feed.length is not None:
                if self.position >= self._feed.length:
                    return True  # the data has a length: the epoch is over, whatever stops
            if self.stop_training or (max_steps is not None and self.step >= max_steps):
                return False
            wanted = self._chunk_end(max_steps, eval_every_steps) - self.step
            # One K-step dispatch, or single steps: for a shortened chunk, and for the last
            # few batches of an epoch (fewer than K), which are already taken and so run to
            # their end.
            dispatches = self._feed.take(k if wanted == k else 1, k)
            if not dispatches:
                if not saw_batch:
                    raise ValueError(
                        "train_data yielded no batches for an epoch; check that it is not empty "
                        "(and not an iterator that was already used up)."
                    )
                return True
            saw_batch = True
            for dispatch in dispatches:
                self._metrics.start(self._engine.zero_accumulator(dispatch.sample))
                acc, metrics = dispatch.run(self._engine, self._metrics.acc)
                self._metrics.advance(acc)
                self.last_metrics = metrics
                self._after_steps(
                    metrics, dispatch.sizes, stacked=dispatch.stacked, evaluate=evaluate
                )
            self._end_dispatch(sum(len(d.sizes) for d in dispatches))

    def _end_dispatch(self, steps: int) -> None:
        if self.step // FOLD_EVERY != (self.step - steps) // FOLD_EVERY:
            self._metrics.retire()
        self._boundaries += 1
        if self._preemption.should_stop(self._boundaries):
            self.preempted = self.history.preempted = True
            self.stop_training = True
            announce("Preemption requested (SIGTERM): stopping cleanly at step %d.", self.step)

    def _after_steps(self, metrics, sizes, *, stacked: bool, evaluate) -> None:
        """Advances the counters over a dispatch's steps and sends `on_step_end` for each.

        A step's evaluation runs before that step's `on_step_end`, so that a checkpoint saved
        there already holds what the evaluation changed (best score, patience), and a run
        resumed from it does not evaluate that step again.
        """
        n = len(sizes)
        self.examples_seen += sum(sizes)
        step_end = self._dispatch.step_end
        for i in range(n):
            self.step += 1
            self.position += 1
            self.state_is_current = i == n - 1
            if self.state_is_current:
                evaluate(self.step)
            if step_end:
                logs = StepLogs(metrics, i) if stacked else metrics
                for cb in step_end:
                    cb.on_step_end(self, self.step, logs)
        self.state_is_current = True

    def _evaluate_in_fit(self, val_data) -> dict[str, float]:
        batches = self._batches(evaluation_progress(val_data, self._show_progress))
        metrics = {f"val_{k}": v for k, v in self._engine.evaluate(batches).items()}
        self.history.evals.append({"step": self.step, **metrics})
        self._dispatch.call("on_eval_end", self, self.step, metrics)
        return metrics


def _epoch_entry(epoch: int, averages, val: Mapping[str, float]) -> dict[str, Any]:
    return {"epoch": epoch, **averages(), **val}
