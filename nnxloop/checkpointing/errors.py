"""Errors of checkpoint I/O."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


class NonFiniteStateError(CheckpointError):
    """A save was refused because the state holds NaN or infinite values; nothing was
    committed and no older checkpoint was removed. `step` is the refused step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):
        return type(self), (str(self), self.step)
