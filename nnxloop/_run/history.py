"""`History`: what `Trainer.fit` returns."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class History:
    """The metrics of a `fit` call, as plain floats.

    Attributes:
        epochs: one dict per completed epoch: its averaged training metrics, plus the `val_`
            metrics of the evaluation at its end (if any) and `"epoch"`.
        evals: one dict per evaluation, with `"step"` and the `val_` metrics.
        preempted: True when `fit` ended early because the process was asked to stop (SIGTERM).
        stopped_early: True when a callback set `trainer.stop_training`.

    Example:
        ```python
        history = trainer.fit(train, val_data=val, epochs=3)
        print(history["val_accuracy"][-1])
        ```
    """

    epochs: list[dict[str, float]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)
    preempted: bool = False
    stopped_early: bool = False

    def __getitem__(self, name: str) -> list[float]:
        """Per-epoch values of metric `name` (Keras's `history.history[name]`).

        A `val_` metric only measured by step-based evaluations comes from `evals` instead.
        """
        values = [e[name] for e in self.epochs if name in e]
        if not values:
            values = [e[name] for e in self.evals if name in e]
        if not values:
            names = sorted({k for e in self.epochs + self.evals for k in e})
            raise KeyError(f"No metric {name!r} in this history; it has {names}.")
        return values
