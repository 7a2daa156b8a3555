"""The callbacks every fit adds after the user's own."""

from __future__ import annotations

from collections.abc import Sequence

from nnxloop._protocol.callback import Callback
from nnxloop.callbacks.progress_bar import ProgressBar


def default_callbacks(*, progress: bool, log_every_steps: int) -> Sequence[Callback]:
    """A `ProgressBar` when `progress`, else none."""
    return [ProgressBar(log_every_steps)] if progress else []
