"""Callbacks: each owns one concern and reacts to the trainer's events."""

from collections.abc import Sequence

from nnxloop.callbacks.async_save import AsyncSaveCallback
from nnxloop.callbacks.base import Callback
from nnxloop.callbacks.best_model import BestModelCallback
from nnxloop.callbacks.checkpoint import CheckpointCallback
from nnxloop.callbacks.early_stopping import EarlyStopping
from nnxloop.callbacks.metrics_logger import MetricsLogger
from nnxloop.callbacks.monitor import MonitorCallback
from nnxloop.callbacks.profile import ProfileCallback
from nnxloop.callbacks.progress_bar import ProgressBar
from nnxloop.callbacks.terminate_on_nan import TerminateOnNaN
from nnxloop.callbacks.view import TrainerView


def default_callbacks(*, progress: bool, log_every_steps: int) -> Sequence[Callback]:
    """The callbacks a trainer adds after the user's own: a `ProgressBar` when `progress`."""
    return [ProgressBar(log_every_steps)] if progress else []


__all__ = [
    "AsyncSaveCallback",
    "BestModelCallback",
    "Callback",
    "CheckpointCallback",
    "EarlyStopping",
    "MetricsLogger",
    "MonitorCallback",
    "ProfileCallback",
    "ProgressBar",
    "TerminateOnNaN",
    "TrainerView",
    "default_callbacks",
]
