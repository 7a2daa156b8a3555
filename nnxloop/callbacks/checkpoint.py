"""`CheckpointCallback`: periodic checkpoints of the whole training state, and resuming."""

from __future__ import annotations

import os
from collections.abc import Mapping

from nnxloop._protocol.callback import Callback, Logs
from nnxloop._protocol.view import TrainerView
from nnxloop._rules.checks import positive_int
from nnxloop._rules.triggers import Trigger
from nnxloop._run.console import announce
from nnxloop.checkpointing import CheckpointError, CheckpointStore, check_directory, lock

DEFAULT_EVERY_STEPS = 1000


class CheckpointCallback(Callback):
    """Saves the whole training state periodically and resumes from the newest checkpoint.

    A checkpoint holds the model state (parameters, batch statistics, RNG state), the optimizer
    state, the step, epoch and position in the epoch, every callback's `state_dict` and the
    data iterator's state, so a resumed run ends with the same parameters, bit for bit, as one
    never stopped. Saves also happen when `fit` ends (finished, stopped or preempted).

    Args:
        directory: where checkpoints go (one orbax step directory each).
        every_steps: save every this many steps (exactly on the step, whatever
            `steps_per_dispatch` is).
        every_epochs: save at the end of every this many epochs.
        every_secs: save at the first step boundary after this many seconds since the last save.
        max_to_keep: how many of the newest checkpoints to keep.
        keep_every_steps: also keep, forever, the checkpoints whose step is a multiple of this.
        resume: restore the newest complete checkpoint in `directory` when `fit` starts. With
            False, the directory must hold no checkpoints (an error says so), so a new run
            never mixes with an old one.

    With no trigger given, saves at each epoch end, or every 1000 steps when `fit` is given
    `max_steps` instead of `epochs`.

    Example:
        ```python
        trainer = nl.Trainer(model, tx, loss_fn=loss_fn, callbacks=[
            nl.CheckpointCallback("runs/exp/ckpt", every_steps=500, max_to_keep=3),
        ])
        trainer.fit(train, epochs=10)  # rerun after a crash: resumes where it stopped
        ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        every_secs: float | None = None,
        max_to_keep: int | None = 3,
        keep_every_steps: int | None = None,
        resume: bool = True,
    ):
        positive_int("max_to_keep", max_to_keep, optional=True)
        positive_int("keep_every_steps", keep_every_steps, optional=True)
        self.trigger = Trigger(every_steps, every_epochs, every_secs)
        self._default_trigger = every_steps is None and every_epochs is None and every_secs is None
        self._given_directory = os.fspath(directory)  # as given: a moved run keeps its keys
        self.store = CheckpointStore(
            os.fspath(directory), max_to_keep=max_to_keep, keep_every_steps=keep_every_steps
        )
        self.resume = resume
        self.restored_step: int | None = None
        self._started = False

    @property
    def directory(self) -> str:
        return self.store.directory

    @property
    def state_key(self) -> str:
        return f"CheckpointCallback({self._given_directory})"

    def on_train_begin(self, trainer: TrainerView) -> None:
        check_directory(self.store.directory, what="Checkpoint directory")
        lock.acquire(self.store.directory)  # one live run per directory, until fit ends
        if self._default_trigger:
            by_steps = trainer.fit_epochs is None
            self.trigger = Trigger(
                every_steps=DEFAULT_EVERY_STEPS if by_steps else None,
                every_epochs=None if by_steps else 1,
            )
        self.trigger.fired()
        # Checked once: a later fit of the same run finds this callback's own checkpoints.
        if not self.resume and not self._started and self.store.steps():
            raise CheckpointError(
                f"Checkpoint directory {self.store.directory} already holds checkpoints (steps "
                f"{self.store.steps()}) and resume=False: use an empty directory for a new run, "
                "or resume=True to continue that one."
            )
        self._started = True
        if self.resume:
            self.restored_step = trainer.restore_checkpoint(self.store)
            if self.restored_step is not None:
                announce("Resumed from step %d of %s.", self.restored_step, self.store.directory)

    def next_step(self, trainer: TrainerView, step: int) -> int | None:
        return self.trigger.next_step(step)

    def on_step_end(self, trainer: TrainerView, step: int, logs: Logs) -> None:
        if trainer.state_is_current and self.trigger.step_due(step, at_boundary=True):
            self._save(trainer)

    def on_epoch_end(self, trainer: TrainerView, epoch: int, logs: Mapping[str, float]) -> None:
        if self.trigger.epoch_due(trainer.epoch):
            self._save(trainer)

    def describe(self) -> str:
        return f"checkpoints in {self.store.directory}"

    def on_train_end(self, trainer: TrainerView) -> None:
        self._save(trainer, final=True)
        trainer.wait_for_saves(self.store)
        lock.release(self.store.directory)

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        lock.release(self.store.directory)

    def reset_state(self) -> None:
        self.restored_step = None
        self._started = False

    def _save(self, trainer: TrainerView, *, final: bool = False) -> None:
        trainer.save_checkpoint(self.store, final=final)
        self.trigger.fired()
