"""nnxloop: a training loop for JAX and Flax NNX with trustworthy checkpointing."""

from nnxloop import distributed, writers
from nnxloop.callbacks import (
    AsyncSaveCallback,
    BestModelCallback,
    Callback,
    CheckpointCallback,
    EarlyStopping,
    MetricsLogger,
    MonitorCallback,
    ProfileCallback,
    TerminateOnNaN,
    TrainerView,
)
from nnxloop.checkpointing import CheckpointError
from nnxloop.engine import Step
from nnxloop.history import History
from nnxloop.load import load_model
from nnxloop.trainer import Trainer
from nnxloop.version import package_version

__version__ = package_version()

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
    "ProfileCallback",
    "Step",
    "TerminateOnNaN",
    "Trainer",
    "TrainerView",
    "__version__",
    "distributed",
    "load_model",
    "writers",
]
