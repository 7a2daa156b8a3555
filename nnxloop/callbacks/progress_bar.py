"""`ProgressBar`: tqdm on a terminal, updated at log intervals so it never waits for the device.

The trainer adds one (through `default_callbacks`) when `Trainer(progress=...)` asks for it, as
an ordinary callback at the end of the list.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from nnxloop.callbacks.base import Callback, Logs
from nnxloop.callbacks.view import TrainerView
from nnxloop.metrics import PendingTotals


class ProgressBar(Callback):
    """Shows epoch, step / total, the last logged loss, steps/s and ETA."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps
        self.bar: Any = None
        self._marks: list[PendingTotals] = []
        self._shown = 0

    def on_train_begin(self, trainer: TrainerView) -> None:
        total = trainer.fit_max_steps
        self.bar = tqdm(
            total=total, initial=trainer.step, unit="step", dynamic_ncols=True, leave=True
        )
        self._marks = [trainer.metric_totals()]  # window ends not yet shown
        self._shown = trainer.step

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}")

    def on_step_end(self, trainer: TrainerView, step: int, logs: Logs) -> None:
        if self.bar is None or step % self.every_steps or not trainer.state_is_current:
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

    def on_train_end(self, trainer: TrainerView) -> None:
        self._close(trainer)

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        self._close(trainer)

    def _close(self, trainer: TrainerView) -> None:
        if self.bar is not None:
            self.bar.update(trainer.step - self._shown)
            self.bar.close()
            self.bar = None
