"""Callbacks: each owns one concern and reacts to the trainer's events."""

from nnxloop.callbacks.async_save import AsyncSaveCallback
from nnxloop.callbacks.base import Callback
from nnxloop.callbacks.best_model import BestModelCallback
from nnxloop.callbacks.checkpoint import CheckpointCallback
from nnxloop.callbacks.early_stopping import EarlyStopping
from nnxloop.callbacks.metrics_logger import MetricsLogger
from nnxloop.callbacks.monitor import MonitorCallback
from nnxloop.callbacks.terminate_on_nan import TerminateOnNaN
from nnxloop.callbacks.view import TrainerView

__all__ = [
    "AsyncSaveCallback",
    "BestModelCallback",
    "Callback",
    "CheckpointCallback",
    "EarlyStopping",
    "MetricsLogger",
    "MonitorCallback",
    "TerminateOnNaN",
    "TrainerView",
]
