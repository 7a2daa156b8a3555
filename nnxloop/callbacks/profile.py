"""`ProfileCallback`: a `jax.profiler` trace of a few training steps."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from nnxloop._protocol.callback import Callback, Logs
from nnxloop._protocol.view import TrainerView
from nnxloop._rules.checks import positive_int
from nnxloop.checkpointing import paths

log = logging.getLogger("nnxloop")


class ProfileCallback(Callback):
    """Traces steps `start_step` to `start_step + num_steps - 1` with `jax.profiler`.

    The trace lands in `<logdir>/plugins/profile/<run>/`, where TensorBoard's profile plugin
    (xprof) finds it: `tensorboard --logdir LOGDIR`, then the Profile tab. Every dispatch in it
    is annotated as a training step (`jax.profiler.StepTraceAnnotation("train",
    step_num=...)`, numbered by its first step), so the trace viewer and the step-time graph
    show where each begins and ends.

    With `steps_per_dispatch=K`, one jitted call runs K steps, and the trace holds the
    dispatches that hold the asked-for steps: it starts at the dispatch boundary before the
    first of them and stops at the first boundary after the last, without changing how
    steps are grouped (so the trace shows the run as it is).

    Args:
        logdir: where the trace goes (a `MetricsLogger`'s directory puts it beside the
            scalars in TensorBoard).
        start_step: the first step to trace (1 is the first step of training; later steps
            leave compilation and warm-up out of the trace).
        num_steps: how many steps to trace.

    Example:
        ```python
        trainer = nl.Trainer(model, tx, loss_fn=loss_fn,
                             callbacks=[nl.ProfileCallback("runs/exp/logs")])
        ```
    """

    def __init__(self, logdir: str | os.PathLike[str], *, start_step: int = 10, num_steps: int = 5):
        positive_int("start_step", start_step)
        positive_int("num_steps", num_steps)
        if paths.is_remote(logdir):
            raise ValueError(
                f"ProfileCallback writes its trace to a local directory, not {logdir}: pass "
                "a local path (and copy the trace to a bucket afterwards if you need it there)."
            )
        self.logdir = os.path.abspath(os.fspath(logdir))
        self.start_step = start_step
        self.last_step = start_step + num_steps - 1
        self._tracing = False
        self._done = False
        self._annotation: Any = None
        self._begun = False

    @property
    def state_key(self) -> str:
        return f"ProfileCallback({self.logdir})"

    def describe(self) -> str:
        return f"profile of steps {self.start_step}-{self.last_step} in {self.logdir}"

    def on_train_begin(self, trainer: TrainerView) -> None:
        self._begun = False

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        # The first epoch begin of a fit comes after any checkpoint restore (whatever the
        # order of the callbacks), so the step is the one training resumes from.
        if not self._begun:
            self._begun = True
            self._maybe_start(trainer, trainer.step)

    def on_step_end(self, trainer: TrainerView, step: int, logs: Logs) -> None:
        if not trainer.state_is_current:  # not the last step of its dispatch
            return
        if self._tracing:
            self._end_annotation()
            if step >= self.last_step:
                self._stop()
                return
            self._annotate(step + 1)
            return
        self._maybe_start(trainer, step)

    def _maybe_start(self, trainer: TrainerView, step: int) -> None:
        # At a dispatch boundary after `step`: the next dispatch runs steps step + 1 to at
        # most step + K; trace it when one of them is in the window (also after a resume
        # inside the window: the rest of it is traced).
        k = trainer.steps_per_dispatch
        in_window = step < self.last_step and step + k >= self.start_step
        if self._done or self._tracing or not in_window:
            return
        os.makedirs(self.logdir, exist_ok=True)
        jax.profiler.start_trace(self.logdir)
        self._tracing = True
        self._annotate(step + 1)

    def _annotate(self, first_step: int) -> None:
        self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=first_step)
        self._annotation.__enter__()

    def _end_annotation(self) -> None:
        if self._annotation is not None:
            annotation, self._annotation = self._annotation, None
            annotation.__exit__(None, None, None)

    def _stop(self) -> None:
        self._end_annotation()
        if self._tracing:
            self._tracing, self._done = False, True
            jax.profiler.stop_trace()
            log.info("Profile of steps %d-%d in %s.", self.start_step, self.last_step, self.logdir)

    def on_train_end(self, trainer: TrainerView) -> None:
        self._stop()  # a run that ended inside the window: what was traced is kept

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        self._stop()

    def reset_state(self) -> None:
        self._done = False
