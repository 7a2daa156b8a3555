"""nnxloop: a training loop for JAX and Flax NNX with trustworthy checkpointing."""

from importlib.metadata import PackageNotFoundError, version

from nnxloop import distributed
from nnxloop.callbacks import (
    AsyncSaveCallback,
    BestModelCallback,
    Callback,
    CheckpointCallback,
    EarlyStopping,
    MetricsLogger,
    MonitorCallback,
    TerminateOnNaN,
    TrainerView,
)
from nnxloop.checkpointing import CheckpointError
from nnxloop.history import History
from nnxloop.load import load_model
from nnxloop.trainer import Trainer

try:
    __version__ = version("nnxloop")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AsyncSaveCallback",
    "BestModelCallback",
    "Callback",
    "CheckpointCallback",
    "CheckpointError",
    "EarlyStopping",
    "History",
    "MetricsLogger",
    "MonitorCallback",
    "TerminateOnNaN",
    "Trainer",
    "TrainerView",
    "__version__",
    "distributed",
    "load_model",
]
