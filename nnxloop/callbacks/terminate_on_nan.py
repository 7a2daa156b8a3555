"""`TerminateOnNaN`: stops training once the loss is NaN or infinite."""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from nnxloop._protocol.callback import Callback, Logs
from nnxloop._protocol.view import TrainerView

log = logging.getLogger("nnxloop")


class TerminateOnNaN(Callback):
    """Stops `fit` when the training loss becomes non-finite.

    Training stops at the end of the dispatch (the `steps_per_dispatch` steps of one jitted
    call) that computed the non-finite loss, or at the end of the next one, never later: the
    host reads a dispatch's losses once they are computed and at the latest when the next
    dispatch has been queued, so the device always has work while the host waits. Whatever
    the order of the callbacks, no checkpoint of a non-finite state is written: every save
    checks the state first and skips it with a warning.

    Args:
        metric: the training metric to watch.

    Example:
        ```python
        callbacks = [nl.TerminateOnNaN(), nl.CheckpointCallback("ckpt")]
        ```
    """

    def __init__(self, *, metric: str = "loss"):
        self.metric = metric
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        self.stopped_at: int | None = None

    @property
    def state_key(self) -> str:
        return f"TerminateOnNaN({self.metric})"

    def on_train_begin(self, trainer: TrainerView) -> None:
        self._pending.clear()

    def reset_state(self) -> None:
        self._pending.clear()
        self.stopped_at = None

    def on_step_end(self, trainer: TrainerView, step: int, logs: Logs) -> None:
        if not trainer.state_is_current:
            return  # one check per dispatch covers all of its steps
        values = trainer.last_metrics.get(self.metric)
        if values is None:
            raise KeyError(
                f"TerminateOnNaN watches {self.metric!r}, but train_step returned only "
                f"{sorted(trainer.last_metrics)}; pass metric= one of those."
            )
        self._pending.append((step, values))
        self._check(trainer, unchecked=1)

    def _check(self, trainer: TrainerView, *, unchecked: int) -> None:
        """Checks the dispatches whose losses are on the host, and waits for all but the
        newest `unchecked` ones."""
        while self._pending and (len(self._pending) > unchecked or self._pending[0][1].is_ready()):
            step, values = self._pending.popleft()
            if not np.all(np.isfinite(np.asarray(values))):
                self.stopped_at = step
                log.warning("Non-finite %s by step %d: stopping.", self.metric, step)
                trainer.stop_training = True
                self._pending.clear()
                return

    def on_epoch_end(self, trainer: TrainerView, epoch: int, logs: Mapping[str, float]) -> None:
        self._check(trainer, unchecked=0)
