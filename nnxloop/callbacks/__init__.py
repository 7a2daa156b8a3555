"""Callbacks: each owns one concern and reacts to the trainer's events."""

from nnxloop.callbacks.base import Callback

__all__ = ["Callback"]
