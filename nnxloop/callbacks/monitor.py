"""`MonitorCallback`: the monitor / mode / min_delta / best logic shared by callbacks that
track one metric (best-model checkpoints, early stopping)."""

from __future__ import annotations

from collections.abc import Mapping

from nnxloop._protocol.callback import Callback
from nnxloop._protocol.view import TrainerView
from nnxloop._rules.ranking import check_mode, improves


class MonitorCallback(Callback):
    """Base class for callbacks that watch one evaluation metric.

    Args:
        monitor: the metric to watch, as reported to `on_eval_end` (e.g. `"val_loss"`).
        mode: `"min"` when lower is better, `"max"` when higher is better.
        min_delta: how much better than the best a value must be to count as an improvement.

    Non-finite values (NaN, inf) never count as an improvement.
    """

    def __init__(self, *, monitor: str, mode: str, min_delta: float = 0.0):
        check_mode(mode)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name, got {monitor!r}.")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}.")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)
        self.best: float | None = None

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}({self.monitor})"

    def on_train_begin(self, trainer: TrainerView) -> None:
        if not trainer.fit_evaluates:
            raise ValueError(
                f"{type(self).__name__} watches {self.monitor!r}, an evaluation metric, but fit "
                "was given no val_data, so nothing is ever evaluated: pass val_data=... to fit "
                f"(or remove the {type(self).__name__})."
            )

    def reset_state(self) -> None:
        self.best = None

    def monitored_value(self, metrics: Mapping[str, float]) -> float:
        """The monitored metric's value in `metrics`.

        Raises:
            KeyError: the metric is not there; the message lists the metrics that are.
        """
        if self.monitor not in metrics:
            raise KeyError(
                f"{type(self).__name__} monitors {self.monitor!r}, but the evaluation reported "
                f"only {sorted(metrics)}; set monitor= to one of those."
            )
        return float(metrics[self.monitor])

    def is_better(self, value: float, reference: float | None) -> bool:
        """Whether `value` improves on `reference` by more than `min_delta`."""
        return improves(value, reference, self.mode, self.min_delta)
