"""Callbacks: each owns one concern and reacts to the trainer's events."""

from nnxloop.callbacks.async_save import AsyncSaveCallback
from nnxloop.callbacks.base import Callback
from nnxloop.callbacks.best_model import BestModelCallback
from nnxloop.callbacks.checkpoint import CheckpointCallback
from nnxloop.callbacks.monitor import MonitorCallback

__all__ = [
    "AsyncSaveCallback",
    "BestModelCallback",
    "Callback",
    "CheckpointCallback",
    "MonitorCallback",
]
