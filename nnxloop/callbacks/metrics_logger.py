"""`MetricsLogger`: training and evaluation metrics to TensorBoard and `metrics.jsonl`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from nnxloop._protocol.callback import Callback, Logs
from nnxloop._protocol.view import TrainerView
from nnxloop._rules.checks import positive_int
from nnxloop._rules.triggers import next_multiple
from nnxloop._run import summary
from nnxloop.checkpointing import check_directory, paths
from nnxloop.writers.base import MetricWriter
from nnxloop.writers.combinators import BackgroundWriter, MultiWriter
from nnxloop.writers.files import JsonlWriter, TensorBoardWriter

log = logging.getLogger("nnxloop")


def _writer_state(writer: MetricWriter) -> dict[str, Any]:
    """A writer's `state_dict()` (an MLflow run id, say), or {} for a writer without one."""
    state: Callable[[], dict[str, Any]] | None = getattr(writer, "state_dict", None)
    return state() if state is not None else {}


class MetricsLogger(Callback):
    """Writes metrics as TensorBoard event files (tensorboardX) and as `metrics.jsonl`, and to
    any extra writers (an MLflow run, a writer of your own).

    Every `every_steps` steps (with `steps_per_dispatch=K`, at the end of the dispatch that
    reaches that step) it writes the training metrics averaged on device since the last write,
    plus `learning_rate`, `steps_per_sec` and `examples_per_sec`; after each evaluation,
    the `val_` metrics. A line is written once its values have reached the host, so logging
    never makes training wait for the device; lines still pending are written before an
    evaluation's line and when `fit` ends. At train start it records the hyper-parameters and
    a table of the model's parameters. Only process 0 writes. A resumed run appends, without
    duplicating the lines its killed predecessor wrote after the checkpoint it resumed from.

    Extra writers run on threads of their own (`nl.writers.BackgroundWriter`), so a slow one
    never slows a step; the logger waits for them when a checkpoint is saved, after an
    evaluation and at the end. Their `state_dict()` (an MLflow run id) is saved with every
    checkpoint and given back on resume.

    Args:
        logdir: the local directory for the event files and `metrics.jsonl` (a `gs://` or
            other URL raises `ValueError`: the files are appended to and fsynced, which
            object stores do not support; log locally and copy the directory to a bucket).
            None writes no files: only `writers`.
        every_steps: how often to write training metrics.
        writers: extra `nl.writers.MetricWriter`s, e.g. `nl.writers.MLflowWriter(...)`.
        learning_rate: a schedule (`count -> lr`, as given to optax) or a float to log as
            `learning_rate` (the rate the last update used). Not
            needed when the optimizer was built with `optax.inject_hyperparams`, whose state
            holds the current value.
        hparams: extra hyper-parameters to record with the run's own.

    Example:
        ```python
        callbacks = [nl.MetricsLogger("runs/exp/logs", every_steps=50)]
        ```
    """

    # Seconds an extra writer gets to finish when `fit` ends with an error or Ctrl-C (then its
    # waiting lines are dropped with a warning); at a clean end, it gets all it needs.
    CLOSE_TIMEOUT_AFTER_ERROR = 10.0

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None = None,
        *,
        every_steps: int = 50,
        writers: Sequence[MetricWriter] = (),
        learning_rate: Callable[[int], Any] | float | None = None,
        hparams: Mapping[str, Any] | None = None,
    ):
        positive_int("every_steps", every_steps)
        self.writers = list(writers)
        for w in self.writers:
            if not isinstance(w, MetricWriter):
                raise TypeError(
                    f"writers must be nl.writers.MetricWriter instances, got {type(w).__name__}; "
                    "subclass MetricWriter and override the methods your sink supports."
                )
        if logdir is None and not self.writers:
            raise ValueError(
                "MetricsLogger needs a logdir (TensorBoard and metrics.jsonl) or writers, or both."
            )
        self._given_logdir = None if logdir is None else os.fspath(logdir)
        self._background: list[BackgroundWriter] = []
        if self._given_logdir is None:
            self.logdir = None
        elif paths.is_remote(self._given_logdir):
            raise ValueError(
                f"MetricsLogger cannot write to {self._given_logdir}: its files are appended "
                "to and fsynced at every checkpoint, which object stores (gs://, s3://) do not "
                "support. Pass a local directory (and copy it to the bucket, e.g. with "
                "`gcloud storage rsync`), or point TensorBoard at the local directory."
            )
        else:
            self.logdir = os.path.abspath(self._given_logdir)
        self.every_steps = every_steps
        self.learning_rate = learning_rate
        self.hparams = dict(hparams or {})
        self.writer: MetricWriter | None = None
        self._active = False
        self._mark: tuple[float, int, int] | None = None

    @property
    def state_key(self) -> str:
        if self._given_logdir is not None:
            return f"MetricsLogger({self._given_logdir})"
        return f"MetricsLogger({', '.join(type(w).__name__ for w in self.writers)})"

    def _make_writer(self, resume_step: int) -> MetricWriter:
        files: list[MetricWriter] = []
        if self.logdir is not None:
            files = [
                TensorBoardWriter(self.logdir, purge_step=resume_step + 1),
                JsonlWriter(os.path.join(self.logdir, "metrics.jsonl"), resume_step=resume_step),
            ]
        # Writers of the user's own (trackers) run off the training thread: a slow one must
        # not slow a step.
        self._background = [BackgroundWriter(w) for w in self.writers]
        return MultiWriter([*files, *self._background])

    def describe(self) -> str:
        sinks = [self.logdir] if self.logdir is not None else []
        sinks += [type(w).__name__ for w in self.writers]
        return f"logs to {', '.join(str(s) for s in sinks)}"

    def on_train_begin(self, trainer: TrainerView) -> None:
        # Only process 0 writes; reading metrics is local, so the others simply skip.
        self._active = jax.process_index() == 0
        if not self._active:
            return
        if self.logdir is not None:
            check_directory(self.logdir, what="Log directory")
        self.writer = None  # opened at the first write, after any checkpoint restore
        self._last = trainer.metric_totals()
        self._mark = None
        self._queue: list[tuple[int, Any, Any, int, Any]] = []  # lines waiting for the device

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        if self._active and self._mark is None:  # the first step to come, after any restore
            self._mark = (time.perf_counter(), trainer.step, trainer.examples_seen)
            self._due = next_multiple(trainer.step, self.every_steps)

    def _writer(self, trainer: TrainerView) -> MetricWriter:
        if self.writer is None:
            with self._writing():
                self.writer = self._make_writer(resume_step=self._resume_step(trainer))
                self._write_run_info(trainer)
        return self.writer

    def _writer_open(self) -> MetricWriter:
        if self.writer is None:
            raise RuntimeError("MetricsLogger wrote a line before opening its writer.")
        return self.writer

    def _resume_step(self, trainer: TrainerView) -> int:
        # The step training (re)started from: lines after it are from a killed run.
        return self._mark[1] if self._mark is not None else trainer.step

    def _write_run_info(self, trainer: TrainerView) -> None:
        # Shapes only: process 0 alone must not run device computations on global arrays.
        params = trainer.parameter_shapes()
        count = sum(x.size for x in jax.tree.leaves(params))
        hparams = {
            "steps_per_dispatch": trainer.steps_per_dispatch,
            "epochs": trainer.fit_epochs or 0,
            "max_steps": trainer.fit_max_steps or 0,
            "devices": jax.device_count(),
            "parameters": count,
            "model": trainer.model_class.__name__,
            **self.hparams,
        }
        writer = self._writer_open()
        writer.write_hparams(hparams)
        overview = summary.parameter_table(params)
        writer.write_texts(trainer.step, {"parameters": f"```\n{overview}\n```"})

    def on_step_end(self, trainer: TrainerView, step: int, logs: Logs) -> None:
        # Logs at the first dispatch boundary at or after each multiple of every_steps, without
        # cutting a dispatch short for it (with steps_per_dispatch=K, cutting would turn K-step
        # scans into single steps around every log); the window average is still exact.
        if not self._active or not trainer.state_is_current:
            return
        if self._queue:
            with self._writing():
                self._write_ready(wait=False)
        if step >= self._due:
            self._queue_line(trainer, step)

    def _queue_line(self, trainer: TrainerView, step: int) -> None:
        self._due = next_multiple(step, self.every_steps)
        self._writer(trainer)
        # The line is queued with the device values it needs and written once they have
        # reached the host (checked at each dispatch's end, without waiting; all at an
        # evaluation or at the end): reading them now would stop the dispatch queue.
        totals, window_start = trainer.metric_totals(), self._last
        self._last = totals
        lr = self._learning_rate(trainer, step)
        self._queue.append((step, window_start, totals, trainer.examples_seen, lr))
        with self._writing():
            self._write_ready(wait=False)

    def _write_ready(self, *, wait: bool) -> None:
        while self._queue:
            step, start, end, examples, lr = self._queue[0]
            if not (wait or end.ready()):
                return
            self._queue.pop(0)
            scalars = end.average_since(start)
            # Rates between the moments two lines' values were seen on the host: device
            # time, not how far ahead the host has dispatched.
            now = time.perf_counter()
            assert self._mark is not None  # set at the first epoch, before any line
            then, then_step, then_examples = self._mark
            if step > then_step and now > then:
                scalars["steps_per_sec"] = (step - then_step) / (now - then)
                scalars["examples_per_sec"] = (examples - then_examples) / (now - then)
            self._mark = (now, step, examples)
            if lr is not None:
                scalars["learning_rate"] = float(lr)
            if scalars:
                self._writer_open().write_scalars(step, scalars)

    def _learning_rate(self, trainer: TrainerView, step: int) -> Any:
        # The rate the last update used: the schedule's count was step - 1 for it, as it is
        # in `optax.inject_hyperparams` state after that update.
        if callable(self.learning_rate):
            return self.learning_rate(step - 1)
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return trainer.learning_rate()

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return
        writer = self._writer(trainer)
        with self._writing():
            self._write_ready(wait=True)
            writer.write_scalars(step, metrics)
            writer.flush()

    def on_save_checkpoint(self, trainer: TrainerView, step: int) -> None:
        # Every line up to the checkpoint's step is written and made durable (flushed and
        # fsynced) before it is, so a run killed after the checkpoint and resumed from it has
        # them all. The save needs that step's state anyway, so this waits for nothing more
        # on the device.
        if not self._active:
            return
        if self._mark is not None and trainer.state_is_current and step >= self._due:
            # A checkpoint callback listed before the logger saves before the logger has seen
            # this step: its line, when one is due, is queued now, as the logger would next.
            self._queue_line(trainer, step)
        if self.writer is not None:
            with self._writing():
                self._write_ready(wait=True)
                self.writer.flush()

    def state_dict(self) -> dict[str, Any]:
        # Only extra writers have state (an MLflow run id): a logger without them saves none.
        return {"writers": [_writer_state(w) for w in self.writers]} if self.writers else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for writer, saved in zip(self.writers, state.get("writers", [])):
            load = getattr(writer, "load_state_dict", None)
            if callable(load) and saved:
                load(saved)

    def reset_state(self) -> None:
        for writer in self.writers:
            reset = getattr(writer, "reset_state", None)
            if callable(reset):
                reset()

    @contextlib.contextmanager
    def _writing(self):
        """Turns a write failure (a full disk, a directory gone) into an error naming the log
        directory; `fit` then stops, and its rerun resumes from the last checkpoint."""
        try:
            yield
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"MetricsLogger could not write to {self.logdir} "
                f"({exc.strerror or exc}); training stopped. Make room or fix the directory and "
                "run again: the run resumes from its last checkpoint, and its log from there.",
            ) from exc

    def on_train_end(self, trainer: TrainerView) -> None:
        if self._active and self.writer is not None:
            with self._writing():
                self._write_ready(wait=True)
        with self._writing():
            self._close()

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        # Best effort: the device or the disk may be what failed, and the error in flight
        # is the one to report.
        if self._active and self.writer is not None:
            try:
                self._write_ready(wait=True)
            except Exception:
                log.warning("MetricsLogger could not write its last %d lines.", len(self._queue))
        writer = self.writer
        if writer is not None:
            # Trackers mark the run failed, or killed for Ctrl-C, not finished; and a tracker
            # that does not answer holds up the exit no longer than this.
            writer.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            for background in self._background:
                background.close_timeout = self.CLOSE_TIMEOUT_AFTER_ERROR
        try:
            self._close()
        except OSError as close_error:
            log.warning(
                "MetricsLogger could not close its files in %s: %s", self.logdir, close_error
            )

    def _close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
