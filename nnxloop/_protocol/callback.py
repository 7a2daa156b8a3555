"""The event protocol: `Callback`, and the dispatcher that calls the hooks in list order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from nnxloop._protocol.view import TrainerView

Logs = Mapping[str, Any]


class Callback:
    """Base class of everything that reacts to training events. Every hook is a no-op.

    Hooks are called in the order the callbacks were given to the `Trainer`. The per-step hook
    `on_step_end` is only dispatched to callbacks that override it, so a callback that does not
    need every step costs nothing per step.

    Values in `logs` are device arrays: reading one (`float(logs["loss"])`) waits for the device,
    so read them only on the steps where you need them.

    Example:
        ```python
        class PrintLoss(nl.Callback):
            def on_epoch_end(self, trainer, epoch, logs):
                print(epoch, logs["loss"])
        ```
    """

    def on_train_begin(self, trainer: TrainerView) -> None:
        """Called once when `fit` starts, before the first step (checkpoints restore here)."""

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        """Called before the first step of epoch `epoch` (0-based; also a resumed epoch)."""

    def on_step_end(self, trainer: TrainerView, step: int, logs: Logs) -> None:
        """Called after every optimizer step; `step` counts updates done (1 after the first).

        `logs` maps metric names to this step's values, as device arrays. With
        `steps_per_dispatch > 1` it is called for each step of a dispatch once the dispatch
        returns; `trainer.state_is_current` is True only on the last one, the step whose state
        the trainer holds.
        """

    def on_eval_end(self, trainer: TrainerView, step: int, metrics: dict[str, float]) -> None:
        """Called after each evaluation during `fit`, with `val_`-prefixed metrics."""

    def on_epoch_end(self, trainer: TrainerView, epoch: int, logs: Mapping[str, float]) -> None:
        """Called after an epoch, with its averaged training metrics and any `val_` metrics.

        `logs` is a mapping of floats; the training averages are read from
        the device when first accessed (`dict(logs)` or `logs.copy()` gives a plain dict).
        """

    def on_save_checkpoint(self, trainer: TrainerView, step: int) -> None:
        """Called just before a checkpoint of `step` is written, by any callback's
        `save_checkpoint` (and before every callback's `state_dict()` is taken for it).

        Write out here what a run resumed from that checkpoint must find done: lines due up
        to `step`, made durable (`MetricsLogger` flushes its writers here).
        """

    def on_train_end(self, trainer: TrainerView) -> None:
        """Called once when `fit` ends cleanly (also on `stop_training` or preemption)."""

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        """Called when `fit` fails with `exc`; the exception propagates afterwards."""

    def next_step(self, trainer: TrainerView, step: int) -> int | None:
        """The next step after `step` at which this callback needs the state exactly, if any.

        With `steps_per_dispatch > 1`, a dispatch is shortened so that it ends on that step,
        so saves and other actions land on exactly the step they ask for.
        """
        return None

    def describe(self) -> str | None:
        """A few words for the line a run prints at its start (`"checkpoints in DIR"`), or
        None (the default) to say nothing."""
        return None

    @property
    def state_key(self) -> str:
        """The name this callback's `state_dict` is saved under in a checkpoint.

        A resumed run gives each callback the state saved under its key, wherever it now
        stands in the list. The default is the class name; a callback of which a list may
        hold several adds what tells them apart (the shipped ones add their directory or
        monitored metric), and two callbacks with state in one list with the same key are an
        error.
        """
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state stored in every checkpoint (best score, counters...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` returned, when a run resumes from a checkpoint."""

    def reset_state(self) -> None:
        """Forgets everything `state_dict` would return, as if the callback were new.

        Called before `on_train_begin` when a `fit` starts a run from scratch (the trainer is
        at step 0), so a callback object passed to a new `Trainer` does not carry the state of
        its earlier run (a best score, a patience count). When a checkpoint is then restored,
        `load_state_dict` brings back that run's state. Override it in a callback that keeps
        state across events.
        """


def _overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)


class CallbackList:
    """Calls hooks on each callback in list order; works out once who overrides what."""

    def __init__(self, callbacks: Sequence[Callback]):
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be nnxloop.Callback instances, got {type(cb).__name__}."
                )
        self.callbacks = list(callbacks)
        seen: dict[str, Callback] = {}
        for cb in self.callbacks:
            if not _overrides(cb, "state_dict"):
                continue  # nothing saved: several alike stateless callbacks are fine
            other = seen.setdefault(cb.state_key, cb)
            if other is not cb:
                raise ValueError(
                    f"Two callbacks have the state_key {cb.state_key!r}, so a checkpoint cannot "
                    "tell their states apart: give them different arguments (directory, "
                    "monitor), or override state_key in one of them."
                )
        self.step_end = [cb for cb in self.callbacks if _overrides(cb, "on_step_end")]
        self.with_next_step = [cb for cb in self.callbacks if _overrides(cb, "next_step")]

    def __iter__(self):
        return iter(self.callbacks)

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def next_step(self, trainer: TrainerView, step: int) -> int | None:
        wanted = [cb.next_step(trainer, step) for cb in self.with_next_step]
        wanted = [s for s in wanted if s is not None and s > step]
        return min(wanted) if wanted else None


class StepLogs(Mapping[str, jax.Array]):
    """The metrics of one step of a multi-step dispatch, sliced from the stacked arrays on read."""

    __slots__ = ("_stacked", "_index")

    def __init__(self, stacked: Mapping[str, jax.Array], index: int):
        self._stacked = stacked
        self._index = index

    def __getitem__(self, key: str) -> jax.Array:
        return self._stacked[key][self._index]

    def __iter__(self):
        return iter(self._stacked)

    def __len__(self) -> int:
        return len(self._stacked)
