"""`TrainerView`: everything a callback may read and call on the trainer it is given.

Every hook receives the trainer as a `TrainerView`. The shipped callbacks use nothing else (a
type checker holds them to it), so a callback of your own can do whatever they do: read the
progress and the training metrics, stop training, save and restore the whole training state,
replace the model's state with a saved one, read the current learning rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
from flax import nnx

from nnxloop._run.totals import PendingTotals
from nnxloop.checkpointing import CheckpointStore


@dataclasses.dataclass(frozen=True)
class FitPlan:
    """What the running `fit` was asked to do (Keras's `params`), for callbacks.

    Attributes:
        epochs: the `epochs` of the call, or None.
        max_steps: the `max_steps` of the call, or None.
        total_steps: the step the fit ends at if nothing stops it earlier (`max_steps`, or
            `epochs` times the length of data that has one), or None when that is not known
            in advance (epochs of an iterator without a length).
        evaluates: whether the fit evaluates (it was given `val_data`).
        eval_every_steps: the `eval_every_steps` of the call, or None (evaluations at epoch
            ends).
    """

    epochs: int | None
    max_steps: int | None
    total_steps: int | None
    evaluates: bool
    eval_every_steps: int | None


class TrainerView(Protocol):
    """What a callback sees of the trainer.

    Attributes:
        step: optimizer updates done since the start of training (1 after the first).
        epoch: epochs done since the start of training.
        stop_training: set it to True to end `fit` cleanly after the current step; it is
            saved with the run, so a rerun of a run a callback stopped trains no further.
        preempted: True once a SIGTERM has asked `fit` to stop.
        state_is_current: in `on_step_end` with `steps_per_dispatch > 1`, True only on the
            last step of a dispatch, the step whose state the trainer holds.
        examples_seen: training examples consumed by this trainer.
        steps_per_dispatch: optimizer steps per jitted call.
        last_metrics: the metrics of the newest dispatch, device arrays (stacked per step
            when the dispatch ran several steps).
        fit_epochs: the `epochs` of the running `fit`, or None.
        fit_max_steps: the `max_steps` of the running `fit`, or None.
        fit_total_steps: the step the running `fit` ends at if nothing stops it earlier
            (`max_steps`, or `epochs` times the length of data that has one), or None when
            that is not known in advance (epochs of an iterator without a length).
        fit_evaluates: whether the running `fit` evaluates (it was given `val_data`).

    The `fit_*` members are those of `plan`, kept under the names callbacks already use.
    """

    @property
    def step(self) -> int: ...

    @property
    def epoch(self) -> int: ...

    @property
    def stop_training(self) -> bool: ...

    @stop_training.setter
    def stop_training(self, value: bool) -> None: ...

    @property
    def preempted(self) -> bool: ...

    @property
    def state_is_current(self) -> bool: ...

    @property
    def examples_seen(self) -> int: ...

    @property
    def steps_per_dispatch(self) -> int: ...

    @property
    def last_metrics(self) -> Mapping[str, jax.Array]: ...

    @property
    def plan(self) -> FitPlan:
        """What the running `fit` was asked to do: its epochs, max steps, the step it ends at,
        whether it evaluates (`nl.FitPlan`)."""
        ...

    @property
    def fit_epochs(self) -> int | None: ...

    @property
    def fit_max_steps(self) -> int | None: ...

    @property
    def fit_total_steps(self) -> int | None: ...

    @property
    def fit_evaluates(self) -> bool: ...

    @property
    def trainer(self) -> Any:
        """The `nl.Trainer` running the fit, for its own API (`history`, `mesh`,
        `evaluate`, ...): what a Keras callback reaches as `self.model`."""
        ...

    @property
    def model(self) -> nnx.Module:
        """The model, holding the current values (brought up to date when read)."""
        ...

    @property
    def optimizer(self) -> nnx.Optimizer[Any]:
        """The `nnx.Optimizer`, holding the current values (brought up to date when read)."""
        ...

    @property
    def model_class(self) -> type:
        """The model's class, read without bringing the model's values up to date."""
        ...

    def parameter_shapes(self) -> nnx.State[Any, Any]:
        """The model's `nnx.Param` variables as `jax.ShapeDtypeStruct`s: no device work."""
        ...

    def metric_totals(self) -> PendingTotals:
        """Running sums of the training metrics, read from the device lazily: keep one and
        `average_since` an older one to average over any window, without waiting."""
        ...

    def learning_rate(self) -> jax.Array | None:
        """The learning rate the last update used, when the optimizer holds it
        (`optax.inject_hyperparams`): a copy on the host's way, never waited for. None
        otherwise."""
        ...

    def set_learning_rate(self, value: float) -> None:
        """Sets the learning rate of the next updates, in an optimizer built with
        `optax.inject_hyperparams` (a `ValueError` says so otherwise); it is saved with
        every checkpoint."""
        ...

    def save_checkpoint(
        self,
        store: CheckpointStore,
        *,
        metrics: dict[str, float] | None = None,
        extra_meta: dict[str, Any] | None = None,
        on_refused: Callable[[int], None] | None = None,
        final: bool = False,
    ) -> bool:
        """Saves the whole training state of this step to `store`; False when nothing is
        written (the step exists, or the state is not finite). A background save's refusal
        calls `on_refused(step)` later. `final`: the save at the end of `fit`."""
        ...

    def wait_for_saves(self, store: CheckpointStore | None = None) -> None:
        """Waits for the background saves to `store` (all stores when None) to finish,
        raising a failure; refusals call their `on_refused`."""
        ...

    def check_saves(self) -> None:
        """Raises the error of any background save that has finished with one; never waits."""
        ...

    def save_in_background(self, max_in_flight: int) -> None:
        """Makes every save of this `fit` return after the device-to-host copy, with at most
        `max_in_flight` saves being written at once."""
        ...

    def restore_checkpoint(self, store: CheckpointStore) -> int | None:
        """Restores the newest readable checkpoint of `store` (state, progress, callback
        states); returns its step, or None when there is none."""
        ...

    def load_model_state(self, store: CheckpointStore, step: int) -> None:
        """Replaces the model's state (not the optimizer's, nor the progress) with the one
        saved at `step` in `store`. Called from `on_train_end`, it takes effect once every
        callback's `on_train_end` has run, so a final checkpoint saved there, by a callback
        before or after this one, holds the trained state and not the loaded one."""
        ...
