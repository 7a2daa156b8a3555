"""`EarlyStopping`: ends `fit` when a monitored metric stops improving."""

from __future__ import annotations

from typing import Any

from nnxloop._protocol.view import TrainerView
from nnxloop._rules.checks import positive_int
from nnxloop._run.console import announce
from nnxloop.callbacks.monitor import MonitorCallback


class EarlyStopping(MonitorCallback):
    """Stops training after `patience` evaluations without an improvement of `monitor`.

    Its best value and its count of evaluations without improvement are part of every
    checkpoint, so a resumed run keeps counting where it stopped.

    Args:
        monitor: the evaluation metric to watch, e.g. `"val_loss"`.
        mode: `"min"` if lower is better, `"max"` if higher is better.
        patience: evaluations without improvement after which training stops.
        min_delta: the smallest change that counts as an improvement.

    Example:
        ```python
        callbacks = [nl.EarlyStopping(monitor="val_accuracy", mode="max", patience=3)]
        ```
    """

    def __init__(
        self,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 5,
        min_delta: float = 0.0,
    ):
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta)
        positive_int("patience", patience)
        self.patience = patience
        self.wait = 0

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        value = self.monitored_value(metrics)
        if self.is_better(value, self.best):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            announce(
                "Early stopping at step %d: %s has not improved on %s for %d evaluations.",
                step,
                self.monitor,
                self.best,
                self.wait,
            )
            trainer.stop_training = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))

    def reset_state(self) -> None:
        self.best, self.wait = None, 0
