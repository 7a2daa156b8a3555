"""`AsyncSaveCallback`: every checkpoint save of the trainer is written in the background."""

from __future__ import annotations

from nnxloop._protocol.callback import Callback, Logs
from nnxloop._protocol.view import TrainerView
from nnxloop._rules.checks import positive_int


class AsyncSaveCallback(Callback):
    """Makes every checkpoint save of the trainer return once the device-to-host copy is done.

    The files are written by orbax in the background, and committed atomically, so a kill
    during the write leaves the previous checkpoints intact. A new save waits for the oldest
    pending one when `max_in_flight` are pending. `fit` returns only when every save has
    finished, also when it ends with an exception or KeyboardInterrupt. A background failure is
    raised in the training thread at the next event, naming the step.

    Args:
        max_in_flight: how many saves may be written in the background at once. Saves to one
            directory are written one after the other (as orbax does), so more than 1 helps
            when several checkpoint callbacks save (e.g. periodic and best-model).

    Example:
        ```python
        callbacks = [nl.CheckpointCallback("ckpt", every_steps=100), nl.AsyncSaveCallback()]
        ```
    """

    def __init__(self, *, max_in_flight: int = 1):
        positive_int("max_in_flight", max_in_flight)
        self.max_in_flight = max_in_flight

    def on_train_begin(self, trainer: TrainerView) -> None:
        trainer.save_in_background(self.max_in_flight)

    def on_step_end(self, trainer: TrainerView, step: int, logs: Logs) -> None:
        trainer.check_saves()

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        trainer.check_saves()

    def on_train_end(self, trainer: TrainerView) -> None:
        trainer.wait_for_saves()
