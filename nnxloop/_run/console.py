"""What a user sees by default on stderr (process 0): the run's start (what it trains, from which
step, on which devices, where checkpoints and logs go, and its parameters per top-level module)
and one line for each event that changes what a rerun does — a resume, a run with nothing left
to do, an early stop, a preemption stop.

These go to the `nnxloop.run` logger, which writes to stderr itself: importing orbax gives the
root logger a handler, after which `logging.basicConfig(level=logging.INFO)` does nothing, so
relying on the root logger would leave these lines unseen. Silence them with
`logging.getLogger("nnxloop.run").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import logging
import sys

import jax

LOGGER_NAME = "nnxloop.run"


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (a notebook or a test may
    have replaced it since import)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("nnxloop: %(message)s"))

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _ProcessZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return jax.process_index() == 0


run_log = logging.getLogger(LOGGER_NAME)
if not run_log.handlers:
    run_log.addHandler(_Stderr())
    run_log.addFilter(_ProcessZero())
    run_log.setLevel(logging.INFO)
    run_log.propagate = False


def announce(message: str, *args: object) -> None:
    """One line on stderr, on process 0."""
    run_log.info(message, *args)
