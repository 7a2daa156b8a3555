"""Metric writers: the interface (`MetricWriter`, in `base`), the built-in sinks (`files`:
TensorBoard event files, JSON lines, Python logging), writers made of writers
(`combinators`: `MultiWriter`, `BackgroundWriter`) and the trackers, each importing its
library only when built (`MLflowWriter`, `WandbWriter`).

They know nothing of the trainer or of callbacks: `MetricsLogger` drives them.
"""

from nnxloop.writers.base import MetricWriter, Scalars
from nnxloop.writers.combinators import BackgroundWriter, MultiWriter
from nnxloop.writers.files import JsonlWriter, LoggingWriter, TensorBoardWriter
from nnxloop.writers.mlflow_writer import MLflowWriter
from nnxloop.writers.wandb_writer import WandbWriter

__all__ = [
    "BackgroundWriter",
    "JsonlWriter",
    "LoggingWriter",
    "MLflowWriter",
    "MetricWriter",
    "MultiWriter",
    "Scalars",
    "TensorBoardWriter",
    "WandbWriter",
]
