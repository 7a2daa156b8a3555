"""`ProgressBar`: tqdm on a terminal, updated at log intervals so it never waits for the device.

The trainer adds one (through `default_callbacks`) when `Trainer(progress=...)` asks for it, as
an ordinary callback at the end of the list.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

from nnxloop._protocol.callback import Callback, Logs
from nnxloop._protocol.view import TrainerView
from nnxloop._run.totals import PendingTotals


class ProgressBar(Callback):
    """One bar for the whole `fit`: epoch, step / total with a percentage and ETA (when the
    total is known: `max_steps`, or `epochs` of data with a length), steps/s, the loss of
    the newest window the device has finished, and the newest evaluation's loss (of the first
    validation set, when there are several)."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps
        self.bar: Any = None
        self._marks: list[PendingTotals] = []
        self._shown = 0
        self._postfix: dict[str, str] = {}

    def on_train_begin(self, trainer: TrainerView) -> None:
        # A terminal that reports no size (a pseudo-terminal without one says 0 columns) gets
        # a fixed width rather than a bar of width 0.
        sized = _stderr_columns() > 0
        self.bar = tqdm(
            total=trainer.fit_total_steps,
            initial=trainer.step,
            unit="step",
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            # tqdm sizes a bar on sys.stderr itself from the terminal, so there it is handed
            # a writer that forwards to it.
            file=None if sized else _ToStderr(),
            leave=True,
        )
        self._marks = [trainer.metric_totals()]  # window ends not yet shown
        self._shown = trainer.step
        self._postfix = {}

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
            self._postfix["loss"] = f"{window['loss']:.4g}"
            self.bar.set_postfix(self._postfix, refresh=False)

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None or not metrics:
            return
        # Sets are evaluated in order, so the first loss is the first set's (`val_loss`, or
        # `val_<name>_loss`); with no loss, its first metric.
        name = next((k for k in metrics if k.endswith("loss")), next(iter(metrics)))
        self._postfix[name] = f"{metrics[name]:.4g}"
        self.bar.set_postfix(self._postfix, refresh=False)

    def on_train_end(self, trainer: TrainerView) -> None:
        self._close(trainer)

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        self._close(trainer)

    def _close(self, trainer: TrainerView) -> None:
        if self.bar is not None:
            self.bar.update(trainer.step - self._shown)
            self.bar.close()
            self.bar = None


def _stderr_columns() -> int:
    """The width of the terminal stderr writes to, or 0 when it reports none."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a terminal, or no file descriptor
        return 0


class _ToStderr:
    """Writes to whatever `sys.stderr` is at the time."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
