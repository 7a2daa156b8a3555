"""The progress bar: tqdm on a terminal, updated at log intervals so it never syncs per step."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import jax
from tqdm.auto import tqdm

from nnxloop.callbacks.base import Callback, Logs


def wanted(progress: bool | None) -> bool:
    """A bar is shown when asked for, or by default when stderr is a terminal; only on
    process 0."""
    if jax.process_index() != 0:
        return False
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


class ProgressBar(Callback):
    """Shows epoch, step / total, the last logged loss, steps/s and ETA."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps
        self.bar = None

    def on_train_begin(self, trainer) -> None:
        total = trainer.fit_max_steps
        self.bar = tqdm(
            total=total, initial=trainer.step, unit="step", dynamic_ncols=True, leave=True
        )
        self._marks = [trainer.metric_totals()]  # window ends not yet shown
        self._shown = trainer.step

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        self.bar.set_description(f"epoch {epoch}")

    def on_step_end(self, trainer, step: int, logs: Logs) -> None:
        if step % self.every_steps or not trainer.state_is_current:
            return
        self.bar.update(step - self._shown)
        self._shown = step
        # The loss shown is that of the newest window the device has finished: never waits.
        self._marks.append(trainer.metric_totals())
        window = None
        while len(self._marks) > 1 and self._marks[1].ready():
            window = self._marks[1].average_since(self._marks.pop(0))
        if window and "loss" in window:
            self.bar.set_postfix(loss=f"{window['loss']:.4g}", refresh=False)

    def on_train_end(self, trainer) -> None:
        self._close(trainer)

    def on_exception(self, trainer, exc) -> None:
        self._close(trainer)

    def _close(self, trainer) -> None:
        if self.bar is not None:
            self.bar.update(trainer.step - self._shown)
            self.bar.close()
            self.bar = None


def evaluation_progress(batches: Iterable[Any], enabled: bool) -> Iterable[Any]:
    """Wraps evaluation batches in a transient bar of their own."""
    if not enabled:
        return batches
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc="evaluating", leave=False, unit="batch")
