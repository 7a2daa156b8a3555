"""The metric writer interface (`nl.writers.MetricWriter`), on its own so that both the built-in
writers (`nnxloop.writers`) and the trackers (`nnxloop.trackers`) build on it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Scalars = Mapping[str, float]


class MetricWriter:
    """The writer interface. Every method is a no-op unless a backend overrides it."""

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        """Writes named scalar values at `step`."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Records the run's hyper-parameters."""

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes named text blocks at `step`."""

    def flush(self) -> None:
        """Makes everything written so far durable."""

    def end_run(self, status: str) -> None:
        """Called before `close` when the run did not end cleanly: `status` is `"FAILED"`
        (an exception ended `fit`) or `"KILLED"` (Ctrl-C). A tracker marks its run so."""

    def close(self) -> None:
        """Flushes and releases the writer."""
        self.flush()
