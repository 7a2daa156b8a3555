"""`BestModelCallback`: keeps the best checkpoints by a monitored metric."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from nnxloop._protocol.view import TrainerView
from nnxloop._rules.checks import positive_int
from nnxloop._rules.ranking import score
from nnxloop.callbacks.monitor import MonitorCallback
from nnxloop.checkpointing import CheckpointError, CheckpointStore, check_directory, lock

log = logging.getLogger("nnxloop")


class BestModelCallback(MonitorCallback):
    """Keeps the `max_to_keep` best checkpoints by `monitor`, in their own directory.

    A checkpoint is written only when an evaluation ranks among the best kept so far, and a
    newer, worse one never evicts a better one. NaN or infinite values are never best. The best
    score and the kept steps survive a resume (they are part of every periodic checkpoint).

    Args:
        directory: where the best checkpoints go; load one with
            `nl.load_model(directory, like, step="best")`.
        monitor: the evaluation metric to rank by, e.g. `"val_loss"` or `"val_accuracy"`.
        mode: `"min"` if lower is better, `"max"` if higher is better.
        max_to_keep: how many of the best checkpoints to keep.
        restore_on_train_end: load the best weights into `trainer.model` when `fit` ends
            (after every callback's `on_train_end`, so a final checkpoint holds the trained
            weights; a callback that needs the best weights reads them after `fit`).

    Example:
        ```python
        best = nl.BestModelCallback("runs/exp/best", monitor="val_accuracy", mode="max")
        ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        max_to_keep: int = 1,
        restore_on_train_end: bool = False,
    ):
        super().__init__(monitor=monitor, mode=mode)
        positive_int("max_to_keep", max_to_keep)
        self.max_to_keep = max_to_keep
        self.restore_on_train_end = restore_on_train_end
        self._given_directory = os.fspath(directory)  # as given: a moved run keeps its keys
        self.store = CheckpointStore(
            os.fspath(directory), max_to_keep=max_to_keep, best_metric=monitor, best_mode=mode
        )
        self.kept: list[tuple[int, float]] = []  # (step, value), best first
        self._checked_directory = False

    @property
    def directory(self) -> str:
        return self.store.directory

    @property
    def state_key(self) -> str:
        return f"BestModelCallback({self._given_directory})"

    @property
    def best_step(self) -> int | None:
        return self.kept[0][0] if self.kept else None

    def on_train_begin(self, trainer: TrainerView) -> None:
        super().on_train_begin(trainer)
        check_directory(self.store.directory, what="Best-model directory")
        lock.acquire(self.store.directory)
        self._checked_directory = False

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        # After every on_train_begin, so after any checkpoint restore: a run that starts from
        # scratch must not rank against, or be deleted for, another run's best checkpoints.
        if self._checked_directory:
            return
        self._checked_directory = True
        steps = self.store.steps()
        if trainer.step == 0 and steps:
            raise CheckpointError(
                f"Best-model directory {self.store.directory} already holds checkpoints of "
                f"another run (steps {steps}), and this run starts from scratch: use an empty "
                "directory for a new run, or resume that run (give its CheckpointCallback "
                "directory too) to carry on ranking."
            )

    def _ranks(self, value: float) -> bool:
        if len(self.kept) < self.max_to_keep:
            return self.is_better(value, None)
        return self.is_better(value, self.kept[-1][1])

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        # Our previous save, if still being written, must be known good or refused before
        # ranking against it (and ranking then agrees on every process).
        trainer.wait_for_saves(self.store)
        value = self.monitored_value(metrics)
        if not self._ranks(value) or any(s == step for s, _ in self.kept):
            return
        # The new ranking goes into the checkpoint's own meta; it is undone if nothing is saved.
        previous = (list(self.kept), self.best)
        self.kept.append((step, value))
        self.kept.sort(key=lambda sv: score(sv[1], self.mode), reverse=True)
        del self.kept[self.max_to_keep :]
        self.best = self.kept[0][1]
        # A resumed run re-evaluates steps whose checkpoint the killed run already wrote; the
        # state is bitwise the same, so the one on disk stands.
        if self.store.has_step(step):
            return
        saved = trainer.save_checkpoint(
            self.store,
            metrics={self.monitor: value},
            extra_meta={"best": {"monitor": self.monitor, "mode": self.mode, "value": value}},
            on_refused=lambda _step: self._undo(previous),
        )
        if not saved:
            self._undo(previous)

    def _undo(self, previous: tuple[list[tuple[int, float]], float | None]) -> None:
        # Nothing was written (or a non-finite state was refused): the ranking before stands.
        self.kept, self.best = previous

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        lock.release(self.store.directory)

    def describe(self) -> str:
        return f"best by {self.monitor} in {self.store.directory}"

    def on_train_end(self, trainer: TrainerView) -> None:
        try:
            self._restore_best(trainer)
        finally:
            trainer.wait_for_saves(self.store)
            lock.release(self.store.directory)

    def _restore_best(self, trainer: TrainerView) -> None:
        # A preempted run goes on after a restart from its own state, not from the best one.
        if not (self.restore_on_train_end and self.kept) or trainer.preempted:
            return
        trainer.wait_for_saves()
        trainer.load_model_state(self.store, self.kept[0][0])
        log.info(
            "Restoring the best weights (step %d, %s=%g).", self.best_step, self.monitor, self.best
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "kept": [[s, v] for s, v in self.kept]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only steps that are on disk: a run killed while a best checkpoint was still being
        # written (or refused) recorded a step whose directory never appeared.
        self.kept = [
            (int(s), float(v))
            for s, v in state.get("kept", [])
            if score(v, self.mode) != -math.inf and self.store.has_step(int(s))
        ]
        self.best = self.kept[0][1] if self.kept else None

    def reset_state(self) -> None:
        self.kept, self.best = [], None
