"""nnxloop: a training loop for JAX and Flax NNX with trustworthy checkpointing."""

from nnxloop import distributed, writers
from nnxloop._protocol.callback import Callback
from nnxloop._protocol.view import FitPlan, TrainerView
from nnxloop._run.history import History
from nnxloop._step.engine import Step
from nnxloop.callbacks.async_save import AsyncSaveCallback
from nnxloop.callbacks.best_model import BestModelCallback
from nnxloop.callbacks.checkpoint import CheckpointCallback
from nnxloop.callbacks.early_stopping import EarlyStopping
from nnxloop.callbacks.metrics_logger import MetricsLogger
from nnxloop.callbacks.monitor import MonitorCallback
from nnxloop.callbacks.profile import ProfileCallback
from nnxloop.callbacks.terminate_on_nan import TerminateOnNaN
from nnxloop.checkpointing import CheckpointError
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
    "FitPlan",
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
