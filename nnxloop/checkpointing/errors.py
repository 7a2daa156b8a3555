"""Errors of checkpoint I/O."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


class NonFiniteStateError(CheckpointError):
    """A save was refused because the state holds NaN or infinite values; nothing was
    committed and no older checkpoint was removed."""
